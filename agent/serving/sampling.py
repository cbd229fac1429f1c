"""Choosing each next token from a row of logits, for the worker's batched decode
(`agent.serving.batch`), as onnxruntime-genai's search does for its own generators:
the repetition penalty over every token of the sequence, then the request's logit
adjustments (logit_bias, OpenAI's presence and frequency penalties over the completion),
then greedy argmax, or temperature, top-k and top-p sampling.

Pure: logits in, a token (and its log-probability) out.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from agent.wire.worker import SamplingOptions

# OpenAI's floor for a log-probability: JSON has no -Infinity.
MIN_LOGPROB = -9999.0


def logit_additions(options: SamplingOptions, counts: Mapping[int, int]) -> dict[int, float]:
    """What to add to a step's logits: the request's biases, less OpenAI's penalties for every
    token the completion holds so far (`counts`: presence once, frequency per occurrence)."""
    add: dict[int, float] = {}
    for bias in options.logit_bias:
        add[bias.token_id] = add.get(bias.token_id, 0.0) + bias.bias
    if options.presence_penalty or options.frequency_penalty:
        for token, count in counts.items():
            add[token] = add.get(token, 0.0) - options.presence_penalty - options.frequency_penalty * count
    return add


class Sampler:
    """One request's choice of tokens: its options, its random stream, what it has seen."""

    def __init__(self, options: SamplingOptions, prompt_ids: Iterable[int]) -> None:
        self.options = options
        # A seeded request samples the same tokens every time it is sent; others draw fresh entropy.
        self._rng = np.random.default_rng(options.seed)
        self._seen: set[int] = set(prompt_ids)  # the repetition penalty's tokens: the whole sequence
        self._counts: collections.Counter[int] = collections.Counter()  # the completion's, for OpenAI's penalties

    @property
    def adjusts(self) -> bool:
        """Whether a row's logits change before the choice (otherwise they are used as they are)."""
        return self.options.repetition_penalty != 1.0 or self.options.adjusts_logits

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The row's logits as the choice sees them (a copy when anything changes)."""
        options = self.options
        if not self.adjusts:
            return logits
        out = logits.astype(np.float32, copy=True)
        if options.repetition_penalty != 1.0 and self._seen:
            seen = np.fromiter(self._seen, dtype=np.int64)
            values = out[seen]
            out[seen] = np.where(values < 0, values * options.repetition_penalty, values / options.repetition_penalty)
        for token, delta in logit_additions(options, self._counts).items():
            out[token] += delta
        return out

    def choose(self, logits: np.ndarray) -> int:
        """The next token from the adjusted logits of one row (then counted as seen)."""
        options = self.options
        if options.temperature == 0.0:
            token = int(np.argmax(logits))
        else:
            token = self._sample(logits)
        self._seen.add(token)
        self._counts[token] += 1
        return token

    def _sample(self, logits: np.ndarray) -> int:
        options = self.options
        scaled = logits.astype(np.float64) / options.temperature
        k = options.top_k if 0 < options.top_k < scaled.size else scaled.size
        candidates = np.argpartition(-scaled, k - 1)[:k] if k < scaled.size else np.arange(scaled.size)
        order = candidates[np.argsort(-scaled[candidates], kind="stable")]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if options.top_p < 1.0:
            # The likeliest tokens whose mass reaches top_p (at least one).
            keep = int(np.searchsorted(np.cumsum(probs), options.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self._rng.choice(len(order), p=probs)])


def log_softmax_at(logits: np.ndarray | Sequence[float], token: int,
                   top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The natural-log probability of `token` under softmax(`logits`), and the `top_n` likeliest
    token ids with theirs (best first; ties by lower id)."""
    row = np.asarray(logits, dtype=np.float64)
    peak = row.max()
    log_total = peak + np.log(np.exp(row - peak).sum())
    top: list[tuple[int, float]] = []
    if top_n:
        floor = np.partition(row, row.size - top_n)[row.size - top_n]  # the top_n-th largest
        candidates = np.flatnonzero(row >= floor)
        best = candidates[np.lexsort((candidates, -row[candidates]))][:top_n]
        top = [(int(i), max(MIN_LOGPROB, float(row[i] - log_total))) for i in best]
    return max(MIN_LOGPROB, float(row[token] - log_total)), top

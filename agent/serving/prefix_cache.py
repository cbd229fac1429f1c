"""The prefix cache's policy: which finished generation a new request continues from.

A generator that finished still holds, inside onnxruntime-genai, the KV of the tokens it
saw. A new request whose prompt starts with those tokens (a chat's history re-sent whole
each turn, a shared system prompt) rewinds that generator to the shared prefix and
prefills only the rest.

Exact, not approximate: greedy output is the same with the cache as without. Two things
change how onnxruntime-genai's CPU kernels round a token's KV, and the cache sidesteps both:
- A token decoded alone (a batch of one) gets KV a little different from the same token in a
  prefill batch, and that changes greedy text dozens of tokens later. So a kept completion's KV
  is reused only once it is *settled*: recomputed in batches while the worker is idle (between a
  chat's turns, while its user reads). A request that comes before reuses the prompt part only.
- Within a batch, the kernels work on small groups of rows (pairs, for the x86 int8 kernel of
  block-128 INT4 weights), and a row left over at a batch's end is rounded differently (measured:
  a 37-token prompt prefilled as 35 + 2 answers differently than at once). So every prefill
  batch starts on a *cell* boundary, a multiple of `CELL_TOKENS` from the sequence's start, and
  ends on one or at the prompt's end, whether the prompt is fresh, continues a kept generator or
  is prefilled a little per round beside other requests; and only whole cells are reused. A row
  then sits at the same place in its group of rows however the prompt was split.

Kept generators cost memory: onnxruntime-genai allocates a generator's KV for its whole
`max_length` up front. The cache holds at most `budget_bytes` of it and drops the least
recently used first. A generator is reused only by a request with the same search options
(onnxruntime-genai fixes them when it creates the generator) that fits its `max_length`.

Pure policy: the worker owns the model; this module chooses, counts, and calls the
generators' rewind/append/close.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class KvHolder(Protocol):
    """What the cache needs of a generator (`agent.serving.oga.Generator` is one)."""

    def rewind_to(self, length: int) -> None: ...

    def append_tokens(self, token_ids: Sequence[int]) -> None: ...

    def close(self) -> None: ...


G = TypeVar("G", bound=KvHolder)

# What `edge-agent serve` and agent.toml's `prefix_cache_mb` keep unless told.
DEFAULT_BUDGET_BYTES = 256 << 20

# Prefill batches start on multiples of this many tokens and end on one or at the prompt's end
# (see the module's docstring): a multiple of every row group the kernels use, small enough that a
# reused prefix loses little (at most CELL_TOKENS - 1 tokens recomputed).
CELL_TOKENS = 16


def cell_floor(n: int) -> int:
    """The last cell boundary at or before token `n`."""
    return n - n % CELL_TOKENS


def batch_end(start: int, total: int, max_tokens: int) -> int:
    """Where a prefill batch from `start` (a cell boundary) ends: at the prompt's `total` if that is
    within `max_tokens`, else on the last cell boundary within them (one cell at least)."""
    return min(total, start + max(CELL_TOKENS, cell_floor(max_tokens)))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Reuse(Generic[G]):
    """A kept generator taken for a request, already rewound to `keep` tokens: append the rest."""

    generator: G
    keep: int
    max_length: int


@dataclass
class _Kept(Generic[G]):
    generator: G
    token_ids: list[int]
    exact: int  # the KV of token_ids[:exact], whole cells, was computed as a prefill does: what may be reused
    max_length: int
    options_key: Hashable
    kv_bytes: int


class PrefixCache(Generic[G]):
    """Finished generators kept for their KV, within a byte budget, least recently used out first."""

    def __init__(self, budget_bytes: int, kv_bytes_per_token: int) -> None:
        self.budget_bytes = budget_bytes
        self.kv_bytes_per_token = kv_bytes_per_token
        self._kept: list[_Kept[G]] = []  # least recently kept first
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        """A budget, and a KV size to count it in (a model whose config does not say keeps nothing)."""
        return self.budget_bytes > 0 and self.kv_bytes_per_token > 0

    @property
    def used_bytes(self) -> int:
        return sum(k.kv_bytes for k in self._kept)

    @property
    def has_unsettled(self) -> bool:
        return any(k.exact < cell_floor(len(k.token_ids)) for k in self._kept)

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, prompt_ids: Sequence[int], options_key: Hashable, needed_length: int) -> Reuse[G] | None:
        """The kept generator sharing the longest exact prefix of whole cells with `prompt_ids`, rewound
        to it and removed from the cache; None when none shares a cell, has these search options and
        room for `needed_length`. At least the prompt's last token is left to prefill (its logits
        choose the first new token)."""
        best: _Kept[G] | None = None
        best_keep = 0
        for kept in self._kept:
            if kept.options_key != options_key or kept.max_length < needed_length:
                continue
            keep = cell_floor(min(common_prefix_length(kept.token_ids, prompt_ids), kept.exact, len(prompt_ids) - 1))
            if keep > best_keep:
                best, best_keep = kept, keep
        if best is None:
            self.misses += 1
            return None
        self._kept.remove(best)
        try:
            best.generator.rewind_to(best_keep)
        except Exception:
            best.generator.close()
            raise
        self.hits += 1
        self.reused_tokens += best_keep
        return Reuse(best.generator, best_keep, best.max_length)

    def put(self, generator: G, token_ids: Sequence[int], prompt_length: int, max_length: int,
            options_key: Hashable, *, held_tokens: int | None = None) -> None:
        """Keep a finished generator (`token_ids`: all it holds, its prompt first), or close it when
        it cannot fit. Its KV counts `max_length` tokens against the budget (what onnxruntime-genai
        allocated), or `held_tokens` (the batched decode's KV, copied out: the tokens it holds)."""
        kv_bytes = (max_length if held_tokens is None else held_tokens) * self.kv_bytes_per_token
        if not self.enabled or kv_bytes > self.budget_bytes or len(token_ids) < CELL_TOKENS:
            generator.close()
            return
        self._kept.append(_Kept(generator, list(token_ids), cell_floor(prompt_length), max_length, options_key,
                                kv_bytes))
        while self.used_bytes > self.budget_bytes:
            self._kept.pop(0).generator.close()

    def settle_step(self, max_tokens: int) -> None:
        """Recompute, in one batch of whole cells (at most `max_tokens`, at least one cell), the next
        tokens of the most recently kept generator whose completion is not yet exact. The last
        partial cell is never settled: a later prompt's batch there ends elsewhere.
        A generator that fails is dropped (closed) and the error raised."""
        kept = next((k for k in reversed(self._kept) if k.exact < cell_floor(len(k.token_ids))), None)
        if kept is None:
            return
        end = batch_end(kept.exact, cell_floor(len(kept.token_ids)), max_tokens)
        try:
            kept.generator.rewind_to(kept.exact)
            kept.generator.append_tokens(kept.token_ids[kept.exact:end])
        except Exception:
            self._kept.remove(kept)
            kept.generator.close()
            raise
        kept.exact = end

    def clear(self) -> None:
        """Close every kept generator (before the model is closed)."""
        while self._kept:
            self._kept.pop().generator.close()

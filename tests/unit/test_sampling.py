"""How the batched decode chooses a token from a row of logits (`agent.serving.sampling`):
greedy, the repetition penalty over the whole sequence, logit_bias and OpenAI's penalties over
the completion, temperature, top-k and top-p, and seeds."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from agent.serving.sampling import Sampler
from agent.wire.worker import SamplingOptions, TokenBias

VOCAB = 1000


def _logits(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=VOCAB).astype(np.float32)


def test_greedy_takes_the_largest_logit_and_leaves_the_row_alone() -> None:
    logits = _logits()
    sampler = Sampler(SamplingOptions(temperature=0.0), prompt_ids=[])
    assert not sampler.adjusts
    assert sampler.adjusted(logits) is logits
    assert sampler.choose(logits) == int(np.argmax(logits))


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_every_seen_token() -> None:
    logits = np.zeros(VOCAB, np.float32)
    logits[[1, 2, 3]] = [4.0, -4.0, 3.0]
    sampler = Sampler(SamplingOptions(temperature=0.0, repetition_penalty=2.0), prompt_ids=[1, 2])
    adjusted = sampler.adjusted(logits)
    assert adjusted[1] == 2.0 and adjusted[2] == -8.0 and adjusted[3] == 3.0
    assert logits[1] == 4.0  # the model's row is not changed
    assert sampler.choose(adjusted) == 3
    assert sampler.adjusted(logits)[3] == 1.5  # a chosen token is part of the sequence from then on


def test_logit_bias_and_the_penalties_count_the_completion_only() -> None:
    logits = np.zeros(VOCAB, np.float32)
    options = SamplingOptions(temperature=0.0, logit_bias=[TokenBias(token_id=7, bias=5.0)],
                              presence_penalty=1.0, frequency_penalty=0.5)
    sampler = Sampler(options, prompt_ids=[7, 8])
    assert sampler.choose(sampler.adjusted(logits)) == 7  # the prompt's 7 costs nothing
    assert sampler.adjusted(logits)[7] == pytest.approx(5.0 - 1.0 - 0.5)
    sampler.choose(sampler.adjusted(logits))
    assert sampler.adjusted(logits)[7] == pytest.approx(5.0 - 1.0 - 1.0)


def test_a_seed_draws_the_same_tokens_and_no_seed_draws_others() -> None:
    options = SamplingOptions(temperature=1.0, top_k=0, seed=11)
    assert _draws(options, 20) == _draws(options, 20)
    assert len(set(_draws(options, 20))) > 1  # a random stream, not one token repeated
    unseeded = SamplingOptions(temperature=1.0, top_k=0)
    assert _draws(unseeded, 20) != _draws(unseeded, 20)


def _draws(options: SamplingOptions, n: int) -> list[int]:
    sampler = Sampler(options, [])
    return [sampler.choose(np.zeros(VOCAB, np.float32)) for _ in range(n)]


def test_top_k_and_top_p_draw_only_from_the_likeliest_tokens() -> None:
    logits = np.linspace(0.0, 5.0, VOCAB, dtype=np.float32)  # token 999 likeliest, then 998, ...
    top_k = Sampler(SamplingOptions(temperature=1.0, top_k=3, seed=1), [])
    assert {top_k.choose(logits) for _ in range(200)} <= {997, 998, 999}
    # Three tokens of nearly all the mass: top_p 0.5 keeps the first alone.
    peaked = np.full(VOCAB, -50.0, np.float32)
    peaked[[10, 20, 30]] = [3.0, 2.0, 1.0]
    top_p = Sampler(SamplingOptions(temperature=1.0, top_k=0, top_p=0.5, seed=2), [])
    assert {top_p.choose(peaked) for _ in range(100)} == {10}


def test_temperature_follows_the_softmax() -> None:
    logits = np.full(VOCAB, -50.0, np.float32)
    logits[[1, 2]] = [np.log(3.0), 0.0]  # 3 : 1 at temperature 1
    sampler = Sampler(SamplingOptions(temperature=1.0, top_k=0, seed=5), [])
    counts = collections.Counter(sampler.choose(logits) for _ in range(4000))
    assert counts[1] / (counts[1] + counts[2]) == pytest.approx(0.75, abs=0.03)
    cold = Sampler(SamplingOptions(temperature=0.25, top_k=0, seed=5), [])  # 3^4 : 1
    counts = collections.Counter(cold.choose(logits) for _ in range(4000))
    assert counts[1] / (counts[1] + counts[2]) == pytest.approx(81 / 82, abs=0.01)

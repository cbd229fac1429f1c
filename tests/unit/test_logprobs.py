"""Per-token log-probabilities in the worker: `TokenChooser.log_softmax_at` (an onnxruntime graph
in doubles) against the textbook formula (with the max shift, in Python floats), with logits
that overflow or underflow `exp`; and token events that merge keep one log-probability per
token, in order."""

from __future__ import annotations

import array
import math
import random

import pytest

from agent.serving.sampling import MIN_LOGPROB, Logits, chooser
from agent.wire.worker import TokenEvent, TokenLogprob, TopLogprob


def log_softmax_at(logits: list[float] | array.array[float], token: int,
                   top_n: int) -> tuple[float, list[tuple[int, float]]]:
    return chooser().log_softmax_at(Logits.of(array.array("f", logits)), token, top_n)


def _reference(logits: list[float]) -> list[float]:
    peak = max(logits)
    log_total = peak + math.log(math.fsum(math.exp(x - peak) for x in logits))
    return [x - log_total for x in logits]


@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["typical", "peaked"])
def test_the_sampled_token_and_the_top_ones_match_the_reference(scale: float) -> None:
    rng = random.Random(7)
    logits = array.array("f", (rng.gauss(0, 1) * scale for _ in range(49152)))  # as the C binding returns them
    reference = _reference(list(logits))
    logprob, top = log_softmax_at(logits, 123, 5)
    assert logprob == pytest.approx(reference[123], abs=1e-9)
    best = sorted(range(len(reference)), key=lambda i: -reference[i])[:5]
    assert [i for i, _ in top] == best
    assert [lp for _, lp in top] == pytest.approx([reference[i] for i in best], abs=1e-9)
    assert math.fsum(math.exp(x) for x in reference) == pytest.approx(1.0)


def test_no_alternatives_asked_gives_none() -> None:
    assert log_softmax_at([1.0, 2.0, 3.0], 2, 0)[1] == []


def test_ties_rank_the_lower_token_id_first_and_stop_at_n() -> None:
    logprob, top = log_softmax_at([0.0, 5.0, 5.0, 5.0, 1.0], 3, 2)
    assert [i for i, _ in top] == [1, 2]
    assert top[0][1] == top[1][1] == pytest.approx(logprob)


@pytest.mark.parametrize("logits", [[800.0, 799.0, 0.0], [-1000.0, -1001.0, -1002.0]],
                         ids=["exp-overflows", "exp-underflows-to-zero"])
def test_extreme_logits_fall_back_to_the_shifted_sum(logits: list[float]) -> None:
    logprob, top = log_softmax_at(logits, 1, 3)
    assert logprob == pytest.approx(_reference(logits)[1])
    assert [i for i, _ in top] == [0, 1, 2]


def test_an_impossible_token_is_floored_not_minus_infinity() -> None:
    logprob, top = log_softmax_at([0.0, -1e6], 1, 2)
    assert logprob == MIN_LOGPROB and top[1] == (1, MIN_LOGPROB)


def _event(ids: list[int], text: str, with_logprobs: bool) -> TokenEvent:
    logprobs = [TokenLogprob(token=str(i), logprob=-float(i), top=[TopLogprob(token=str(i), logprob=-float(i))])
                for i in ids] if with_logprobs else None
    return TokenEvent(id="a", token_ids=ids, text=text, logprobs=logprobs)


def test_merged_events_keep_one_logprob_per_token_in_order() -> None:
    merged = _event([1, 2], "ab", True).merged(_event([3], "c", True))
    assert merged.token_ids == [1, 2, 3] and merged.text == "abc"
    assert merged.logprobs is not None and [t.token for t in merged.logprobs] == ["1", "2", "3"]
    plain = _event([1], "a", False).merged(_event([2], "b", False))
    assert plain.logprobs is None and plain.token_ids == [1, 2]

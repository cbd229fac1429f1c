"""How the batched decode chooses a token from a row of logits (`agent.serving.sampling`, in
onnxruntime graphs built in memory): greedy alone and in batches, the repetition penalty over the
whole sequence, logit_bias and OpenAI's penalties over the completion, temperature, top-k and
top-p, and seeds; the graphs are valid ONNX."""

from __future__ import annotations

import array
import collections
import math
import random

import onnx
import pytest

from agent.serving import sampling
from agent.serving.sampling import Logits, Sampler, chooser
from agent.wire.worker import SamplingOptions, TokenBias

VOCAB = 1000


def _row(values: dict[int, float] | None = None, fill: float = 0.0) -> Logits:
    row = array.array("f", [fill] * VOCAB)
    for token, value in (values or {}).items():
        row[token] = value
    return Logits.of(row)


def _random_rows(rows: int, seed: int = 3) -> Logits:
    rng = random.Random(seed)
    memory = array.array("f", (rng.gauss(0, 1) for _ in range(rows * VOCAB)))
    return Logits(memory, memory.buffer_info()[0], rows, VOCAB)


def _choices(sampler: Sampler, row: Logits, n: int) -> list[int]:
    return [chooser().choose(row, sampler) for _ in range(n)]


def test_the_graphs_are_valid_onnx() -> None:
    for graph in (sampling._argmax_graph(), sampling._choose_graph("ranked"), sampling._choose_graph("greedy"),
                  sampling._choose_graph("whole"), sampling._logprobs_graph(20)):
        onnx.checker.check_model(onnx.load_from_string(graph), full_check=True)


def test_greedy_takes_the_largest_logit_of_each_row_alone_and_in_batches() -> None:
    rows = _random_rows(8)
    values = [rows.row(r).values() for r in range(8)]
    expected = [max(range(VOCAB), key=values[r].__getitem__) for r in range(8)]
    assert len(set(expected)) > 4  # rows that differ
    picked = [1, 6, 2, 7]  # rows of one run, in any order: one argmax over the span they cover
    assert chooser().greedy([rows.row(r) for r in picked]) == [expected[r] for r in picked]
    other = _random_rows(2, seed=9)  # rows of another run's memory: a run of their own
    mixed = chooser().greedy([rows.row(3), other.row(1), rows.row(0)])
    assert mixed == [expected[3], max(range(VOCAB), key=other.row(1).values().__getitem__), expected[0]]
    sampler = Sampler(SamplingOptions(temperature=0.0), prompt_ids=[])
    assert sampler.is_plain_greedy
    assert chooser().choose(rows.row(5), sampler) == expected[5]


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_every_seen_token() -> None:
    options = SamplingOptions(temperature=0.0, repetition_penalty=2.0)
    # 1 (4.0) seen: 2.0, below 3 (3.0); then 3, seen, is 1.5 and 1 leads again.
    assert _choices(Sampler(options, prompt_ids=[1]), _row({1: 4.0, 3: 3.0}), 2) == [3, 1]
    # A negative logit seen is multiplied: 2 (-4.0) falls to -8.0, below 5 (-6.0).
    assert _choices(Sampler(options, prompt_ids=[2]), _row({2: -4.0, 5: -6.0}, fill=-10.0), 1) == [5]
    assert _choices(Sampler(SamplingOptions(temperature=0.0), [2]), _row({2: -4.0, 5: -6.0}, fill=-10.0), 1) == [2]


def test_logit_bias_and_the_penalties_count_the_completion_only() -> None:
    options = SamplingOptions(temperature=0.0, logit_bias=[TokenBias(token_id=7, bias=5.0)],
                              presence_penalty=1.0, frequency_penalty=0.5)
    sampler = Sampler(options, prompt_ids=[7, 8])  # the prompt's 7 costs nothing
    # 7 at 5.0 leads; once taken 5 - 1 - 0.5 = 3.5 is below 9's 3.6; 9 taken falls to 2.1 and 7
    # leads again; taken twice, 5 - 1 - 1 = 3.0 is below 10's 3.4.
    assert _choices(sampler, _row({9: 3.6, 10: 3.4}), 4) == [7, 9, 7, 10]


def test_a_seed_draws_the_same_tokens_and_no_seed_draws_others() -> None:
    options = SamplingOptions(temperature=1.0, top_k=0, seed=11)
    assert _draws(options, 20) == _draws(options, 20)
    assert len(set(_draws(options, 20))) > 1  # a random stream, not one token repeated
    unseeded = SamplingOptions(temperature=1.0, top_k=0)
    assert _draws(unseeded, 20) != _draws(unseeded, 20)


def _draws(options: SamplingOptions, n: int) -> list[int]:
    return _choices(Sampler(options, []), _row(), n)


def test_top_k_and_top_p_draw_only_from_the_likeliest_tokens() -> None:
    rising = Logits.of(array.array("f", (5.0 * i / (VOCAB - 1) for i in range(VOCAB))))  # 999 likeliest
    assert set(_choices(Sampler(SamplingOptions(temperature=1.0, top_k=3, seed=1), []), rising, 200)) \
        == {997, 998, 999}
    # Three tokens of nearly all the mass: top_p 0.5 keeps the first alone, 0.8 the first two.
    peaked = _row({10: 3.0, 20: 2.0, 30: 1.0}, fill=-50.0)
    assert set(_choices(Sampler(SamplingOptions(temperature=1.0, top_k=0, top_p=0.5, seed=2), []), peaked, 100)) \
        == {10}
    assert set(_choices(Sampler(SamplingOptions(temperature=1.0, top_k=0, top_p=0.8, seed=2), []), peaked, 200)) \
        == {10, 20}


@pytest.mark.parametrize("top_k", [0, 50], ids=["whole-vocabulary", "top-k"])
def test_temperature_follows_the_softmax(top_k: int) -> None:
    row = _row({1: math.log(3.0), 2: 0.0}, fill=-50.0)  # 3 : 1 at temperature 1
    counts = collections.Counter(_choices(Sampler(SamplingOptions(temperature=1.0, top_k=top_k, seed=5), []), row,
                                          4000))
    assert counts[1] / (counts[1] + counts[2]) == pytest.approx(0.75, abs=0.03)
    cold = Sampler(SamplingOptions(temperature=0.25, top_k=top_k, seed=5), [])  # 3^4 : 1
    counts = collections.Counter(_choices(cold, row, 4000))
    assert counts[1] / (counts[1] + counts[2]) == pytest.approx(81 / 82, abs=0.01)

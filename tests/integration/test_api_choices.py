"""`n` choices over the real API (SmolLM2): each choice is its own generation (choice i of a
seeded request samples with seed + i, so it is reproducible), streamed or not, with one usage;
a client that leaves a streamed request frees every choice's slot."""

from __future__ import annotations

import time

import openai
import requests

from testkit.serving import ServerThread, metric_value
from testkit.waits import wait_until

QUESTION = [{"role": "user", "content": "Name a fruit and say why you like it."}]


def _one(smollm2_openai: openai.OpenAI, seed: int) -> tuple[str, int]:
    response = smollm2_openai.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                                      temperature=1.0, seed=seed, max_tokens=16)
    assert response.usage is not None
    return response.choices[0].message.content or "", response.usage.completion_tokens


def test_each_seeded_choice_is_the_single_answer_with_seed_plus_its_index(smollm2_openai: openai.OpenAI) -> None:
    response = smollm2_openai.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                                      temperature=1.0, seed=40, max_tokens=16, n=3)
    singles = [_one(smollm2_openai, 40 + i) for i in range(3)]
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [text for text, _ in singles]
    assert len({text for text, _ in singles}) == 3  # sampled: the choices differ
    assert response.usage is not None and response.usage.completion_tokens == sum(n for _, n in singles)
    assert response.usage.prompt_tokens == smollm2_openai.chat.completions.create(
        model="default", messages=QUESTION, max_tokens=1).usage.prompt_tokens  # type: ignore[arg-type,union-attr]


def test_streamed_choices_interleave_and_end_with_one_usage(smollm2_openai: openai.OpenAI) -> None:
    whole = smollm2_openai.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                                   temperature=1.0, seed=7, max_tokens=16, n=3)
    chunks = list(smollm2_openai.chat.completions.create(
        model="default", messages=QUESTION, temperature=1.0, seed=7, max_tokens=16, n=3,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    finishes: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == 1 and chunks[-1].usage == usages[0] and not chunks[-1].choices
    assert whole.usage is not None and usages[0].completion_tokens == whole.usage.completion_tokens


def test_greedy_choices_are_all_the_same_answer(smollm2_openai: openai.OpenAI) -> None:
    response = smollm2_openai.completions.create(model="default", prompt="The capital of France is", temperature=0,
                                                 max_tokens=8, n=2)
    assert [c.index for c in response.choices] == [0, 1] and response.choices[0].text == response.choices[1].text


def test_leaving_a_streamed_request_frees_every_choice(smollm2_api: ServerThread) -> None:
    body = {"messages": QUESTION, "stream": True, "max_tokens": 400, "n": 3, "temperature": 1.0}
    with requests.post(f"{smollm2_api.url}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        while not next(lines).startswith(b'data: {"id"'):
            pass
        assert metric_value(smollm2_api.url, "edgefleet_active_requests") == 3
    started = time.monotonic()
    wait_until(lambda: metric_value(smollm2_api.url, "edgefleet_active_requests") == 0, 30,
               "every choice's generation cancelled")
    assert time.monotonic() - started < 10  # freed when the client left, not when 400 tokens were made


def test_more_than_eight_choices_is_a_400_naming_n(smollm2_api: ServerThread) -> None:
    r = requests.post(f"{smollm2_api.url}/v1/chat/completions", json={"messages": QUESTION, "n": 9}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"

"""The prefix cache on a real model through the OpenAI API: a chat whose whole history is re-sent
each turn prefills only what is new, and greedy answers are the very ones a server without the
cache gives, turn by turn (the cache reuses only KV computed as a prefill computes it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.serving.prefix_cache import CELL_TOKENS, cell_floor
from testkit.serving import ServerThread, metric_value

# A chat whose answers change if the cache reused KV computed token by token (measured: from the
# second turn on, with the completion's decoded KV reused as is).
QUESTIONS = ["What is a compiler?", "And an interpreter?", "Which is faster?"]


@pytest.fixture(scope="module")
def servers(smollm2_int4_raw: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    with ServerThread(smollm2_int4_raw, threads=2) as cached, \
            ServerThread(smollm2_int4_raw, threads=2, prefix_cache_bytes=0) as uncached:
        yield cached, uncached


def _turn(server: ServerThread, messages: list[dict[str, str]], max_tokens: int = 48) -> dict[str, Any]:
    r = requests.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _chat(server: ServerThread, pause_s: float) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": "You are a helpful assistant who answers in detail."}]
    replies = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        reply = _turn(server, messages)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        time.sleep(pause_s)
    return replies


def _cached(reply: dict[str, Any]) -> int:
    cached: int = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
    return cached


def test_a_chat_reuses_its_history_and_answers_exactly_as_without_the_cache(
        servers: tuple[ServerThread, ServerThread]) -> None:
    cached_server, uncached_server = servers
    plain = _chat(uncached_server, pause_s=0)
    back_to_back = _chat(cached_server, pause_s=0)
    # A pause like a user's reading time: the worker settles the last answer's KV meanwhile.
    paused = _chat(cached_server, pause_s=1.0)
    for run in (back_to_back, paused):
        assert [r["choices"][0]["message"]["content"] for r in run] == \
            [r["choices"][0]["message"]["content"] for r in plain]
    assert all(_cached(r) == 0 for r in plain)
    for turn in range(1, len(QUESTIONS)):
        previous = back_to_back[turn - 1]["usage"]
        # At least the previous prompt's whole cells: their KV came from a prefill.
        assert _cached(back_to_back[turn]) >= cell_floor(previous["prompt_tokens"]), back_to_back[turn]["usage"]
        # After a pause, the previous answer's too: only its last partial cell, the new question
        # and the template's tokens around it are prefilled.
        new_tokens = paused[turn]["usage"]["prompt_tokens"] - _cached(paused[turn])
        assert new_tokens < paused[turn]["usage"]["prompt_tokens"] - previous["total_tokens"] + CELL_TOKENS + 8, \
            paused[turn]["usage"]
    # The first turn of the second chat found the first chat's system prompt.
    assert _cached(paused[0]) > 0
    assert metric_value(cached_server.url, "edgefleet_cached_prompt_tokens_total") == \
        sum(_cached(r) for r in back_to_back + paused)


def _post(server: ServerThread, body: dict[str, Any]) -> dict[str, Any]:
    r = requests.post(f"{server.url}/v1/chat/completions", timeout=120, json=body)
    assert r.status_code == 200, r.text
    reply: dict[str, Any] = r.json()
    return reply


def test_a_kept_prefix_serves_other_sampling_options_but_not_beam_search(
        servers: tuple[ServerThread, ServerThread]) -> None:
    """The batched decode's KV does not depend on how a request samples (each samples on its own),
    so a kept prompt serves a penalty or a seed too, with the answer an uncached server gives;
    beam search runs in onnxruntime-genai's generators and reuses nothing."""
    cached_server, uncached_server = servers
    messages = [{"role": "user", "content": "Name three rivers of France, and say where each one flows."}]
    _turn(cached_server, messages)
    for options in ({"temperature": 0, "top_k": 5, "repetition_penalty": 1.3}, {"temperature": 0.7, "seed": 3}):
        body = {"messages": messages, "max_tokens": 12, **options}
        reused, fresh = _post(cached_server, body), _post(uncached_server, body)
        assert _cached(reused) > 0 and _cached(fresh) == 0, options
        assert reused["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"], options
    beams = _post(cached_server, {"messages": messages, "max_tokens": 8, "temperature": 0, "num_beams": 2})
    assert _cached(beams) == 0


def test_a_prompt_split_by_reuse_or_by_rounds_answers_as_one_prefilled_at_once(smollm2_int4_b128: Path) -> None:
    """Block-128 INT4's x86 int8 kernel works on pairs of rows and rounds a batch's leftover odd row
    differently. Reusing a kept identical prompt used to prefill its last 2 tokens as a batch of
    their own, and "What is the capital of France?" then answered otherwise than fresh."""
    prompts = ["What is the capital of France?", "Name a color.", "Count to five.", "What is two plus two?"]
    with ServerThread(smollm2_int4_b128, threads=2, parallel=4) as cached, \
            ServerThread(smollm2_int4_b128, threads=2, prefix_cache_bytes=0) as uncached:
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            fresh = _turn(uncached, messages, max_tokens=24)
            _turn(cached, messages, max_tokens=24)
            again = _turn(cached, messages, max_tokens=24)
            assert _cached(again) > 0 and _cached(fresh) == 0
            assert again["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"], prompt
        # A long prompt arriving while other requests decode is prefilled a few cells per round:
        # still the answer it gets alone.
        long_prompt = [{"role": "user", "content": " ".join(prompts * 12) + " Answer the first question."}]
        alone = _turn(uncached, long_prompt, max_tokens=16)["choices"][0]["message"]["content"]
        with ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(_turn, cached, [{"role": "user", "content": f"Write a story about river {i}."}], 96)
                    for i in range(3)]
            time.sleep(0.5)
            beside = pool.submit(_turn, cached, long_prompt, 16).result()
            for f in busy:
                f.result()
        assert beside["choices"][0]["message"]["content"] == alone

"""The OpenAI-compatible API over a real server (uvicorn + model-worker process),
spoken to with the official `openai` client and plain HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from agent.serving.runtime import ModelRuntime
from agent.wire.worker import ChatMessage, SamplingOptions
from testkit.serving import ServerThread

TOKEN = "s3cret-token"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm2_int4_raw: Path) -> Iterator[ServerThread]:
    with ServerThread(smollm2_int4_raw, threads=2, api_token=TOKEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def runtime(smollm2_int4_raw: Path) -> ModelRuntime:
    return ModelRuntime(smollm2_int4_raw, intra_op_num_threads=2)


def _runtime_chat(runtime: ModelRuntime, messages: list[dict[str, str]], **options: object) -> str:
    prompt_ids = runtime.encode(runtime.apply_chat_template([ChatMessage(**m) for m in messages]))  # type: ignore[arg-type]
    return "".join(s.text for s in runtime.generate(prompt_ids, SamplingOptions(**options)))  # type: ignore[arg-type]


def test_models_list_names_the_active_model(client: openai.OpenAI, smollm2_int4_raw: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [smollm2_int4_raw.name]
    assert models[0].model_extra is not None and models[0].model_extra["context_length"] == 8192


def test_greedy_chat_equals_runtime_greedy(client: openai.OpenAI, runtime: ModelRuntime) -> None:
    response = client.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                              temperature=0, max_tokens=24)
    expected = _runtime_chat(runtime, QUESTION, temperature=0.0, max_tokens=24)
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 24
    assert response.usage.prompt_tokens == len(runtime.encode(runtime.apply_chat_template(
        [ChatMessage(**QUESTION[0])])))  # type: ignore[arg-type]


def _runtime_steps(runtime: ModelRuntime, messages: list[dict[str, str]], max_tokens: int) -> list[str]:
    """The text of each greedy step that shows text, as the worker makes them."""
    prompt_ids = runtime.encode(runtime.apply_chat_template([ChatMessage(**m) for m in messages]))  # type: ignore[arg-type]
    steps = runtime.generate(prompt_ids, SamplingOptions(temperature=0.0, max_tokens=max_tokens))
    return [s.text for s in steps if s.text]


def _stream_contents(client: openai.OpenAI, max_tokens: int) -> tuple[list[str], list[object]]:
    stream = client.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                            temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content], chunks


def test_streamed_chat_equals_non_streamed(client: openai.OpenAI, runtime: ModelRuntime) -> None:
    contents, chunks = _stream_contents(client, 24)
    steps = _runtime_steps(runtime, QUESTION, 24)
    assert "".join(contents) == "".join(steps) == _runtime_chat(runtime, QUESTION, temperature=0.0, max_tokens=24)
    assert chunks[0].choices[0].delta.role == "assistant"  # type: ignore[attr-defined]
    # The default stream interval (50 ms) lets later tokens share a chunk, never the first one.
    assert contents[0] == steps[0] and len(contents) >= 2
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]  # type: ignore[attr-defined]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24  # type: ignore[attr-defined]


def test_stream_interval_zero_sends_a_chunk_per_token(smollm2_int4_raw: Path, runtime: ModelRuntime) -> None:
    with ServerThread(smollm2_int4_raw, threads=2, stream_interval_s=0.0) as srv:
        per_token = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=120)
        contents, _ = _stream_contents(per_token, 24)
    assert contents == _runtime_steps(runtime, QUESTION, 24)


def test_stream_interval_holds_tokens_but_never_the_first_or_the_last(runtime: ModelRuntime) -> None:
    from agent.serving.worker.process import _Active

    prompt_ids = runtime.encode(runtime.apply_chat_template([ChatMessage(role="user", content="Count to twenty.")]))
    active = _Active(runtime.start(prompt_ids, SamplingOptions(temperature=0.0, max_tokens=12, logprobs=1)),
                     len(prompt_ids), stream_interval_s=0.05)
    now, sent_at, events = 100.0, [], []
    while active.generation.finish_reason is None:
        step = active.generation.step()
        active.hold(step)
        event = active.take_due("r1", now)  # a clock of 20 ms per token, stepped by hand
        if event is not None:
            sent_at.append(now)
            events.append(event)
        now += 0.02
    assert len(events[0].token_ids) == 1  # the first token is never held
    assert all(b - a >= 0.05 for a, b in zip(sent_at, sent_at[1:-1], strict=False))  # later ones wait for the interval
    assert len(events) < 12 and sent_at[-1] == now - 0.02  # the last step sends what is held
    assert [i for e in events for i in e.token_ids] == active.generation.completion_ids
    # held log-probabilities travel with their tokens: one each, in order
    assert all(e.logprobs is not None and len(e.logprobs) == len(e.token_ids) for e in events)
    assert [runtime.decode([i]) for i in active.generation.completion_ids] == \
        [t.token for e in events for t in e.logprobs or []]
    assert "".join(e.text for e in events) == _runtime_chat(
        runtime, [{"role": "user", "content": "Count to twenty."}], temperature=0.0, max_tokens=12)
    assert {e.id for e in events} == {"r1"}


def test_completions_endpoint_uses_raw_prompt(client: openai.OpenAI, runtime: ModelRuntime) -> None:
    response = client.completions.create(model="default", prompt="The capital of France is", temperature=0,
                                         max_tokens=12)
    assert response.choices[0].text == runtime.decode(runtime.greedy_token_ids("The capital of France is", 12))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="default", prompt="The capital of France is", temperature=0, max_tokens=12, stream=True))
    assert streamed == response.choices[0].text


def test_seeded_sampling_reproducible_and_seeds_differ(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                           temperature=1.0, seed=seed, max_tokens=24)
        return r.choices[0].message.content or ""
    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_stop_sequence_and_max_tokens(client: openai.OpenAI, runtime: ModelRuntime) -> None:
    full = _runtime_chat(runtime, QUESTION, temperature=0.0, max_tokens=24)
    stop = full.split()[4]
    r = client.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                       temperature=0, max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                       temperature=0, max_tokens=3)
    assert r.usage is not None and r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_extensions_beam_search_top_k_repetition_penalty(client: openai.OpenAI, runtime: ModelRuntime) -> None:
    def chat(**extra: object) -> str:
        r = client.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                           max_tokens=20, extra_body=extra)
        return r.choices[0].message.content or ""
    greedy = _runtime_chat(runtime, QUESTION, temperature=0.0, max_tokens=20)
    beams = chat(num_beams=3, temperature=0)
    assert beams == _runtime_chat(runtime, QUESTION, num_beams=3, max_tokens=20)
    assert beams != greedy
    assert chat(top_k=1, temperature=1.3, seed=5) == greedy
    penalized = chat(repetition_penalty=1.8, temperature=0)
    assert penalized == _runtime_chat(runtime, QUESTION, temperature=0.0, max_tokens=20, repetition_penalty=1.8)
    assert penalized != greedy


def _post(server: ServerThread, body: bytes | dict[str, object], token: str | None = TOKEN) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return requests.post(f"{server.url}/v1/chat/completions", data=body, headers=headers, timeout=60)
    return requests.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(("body", "token", "status", "code", "message_part"), [
    (b'{"messages": [', TOKEN, 400, None, "not valid JSON"),
    (b'[1, 2]', TOKEN, 400, None, "JSON object"),
    ({"model": "gpt-4o", "messages": QUESTION}, TOKEN, 404, "model_not_found", "'gpt-4o' does not exist"),
    ({"model": "default", "messages": QUESTION, "max_tokens": -5}, TOKEN, 400, None, "max_tokens"),
    ({"model": "default", "messages": []}, TOKEN, 400, None, "messages"),
    ({"model": "default", "messages": QUESTION, "n": 9}, TOKEN, 400, None, "n:"),
    ({"model": "default", "messages": [{"role": "user", "content": "hello " * 9000}]}, TOKEN, 400,
     "context_length_exceeded", "maximum context length is 8192 tokens, the prompt has"),
    ({"model": "default", "messages": QUESTION, "max_tokens": 8190}, TOKEN, 400,
     "context_length_exceeded", "in max_tokens"),
    ({"model": "default", "messages": QUESTION}, "wrong", 401, "invalid_api_key", "bearer token"),
    ({"model": "default", "messages": QUESTION}, None, 401, "invalid_api_key", "bearer token"),
])
def test_bad_input_gets_openai_error_and_server_keeps_serving(
        server: ServerThread, body: bytes | dict[str, object], token: str | None, status: int, code: str | None,
        message_part: str) -> None:
    r = _post(server, body, token)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message_part in error["message"]
    assert error["type"]
    if code is not None:
        assert error["code"] == code
    ok = _post(server, {"model": "default", "messages": QUESTION, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_fields_that_change_nothing_in_the_answer_are_accepted(server: ServerThread) -> None:
    """Fields a client sends by habit: unknown ones, and the no-op values of unimplemented ones
    (a set one is refused by name: test_api_structured.py)."""
    r = _post(server, {"model": "default", "messages": QUESTION, "max_tokens": 2, "temperature": 0,
                       "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "tools": [],
                       "user": "u-1", "some_vendor_field": {"x": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == _post(
        server, {"messages": QUESTION, "max_tokens": 2, "temperature": 0}).json()["choices"][0]["message"]["content"]


def test_unknown_route_is_openai_shaped_404(server: ServerThread) -> None:
    r = requests.get(f"{server.url}/v1/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_metrics_count_requests_tokens_and_errors(server: ServerThread) -> None:
    _post(server, {"model": "default", "messages": QUESTION, "max_tokens": 4, "temperature": 0})
    _post(server, {"model": "nope", "messages": QUESTION})
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    assert 'edgefleet_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert 'edgefleet_errors_total{kind="model_not_found"}' in text
    assert "edgefleet_ttft_seconds_count" in text and "edgefleet_queue_depth 0" in text
    completion_tokens = float(next(line.split()[1] for line in text.splitlines()
                                   if line.startswith("edgefleet_completion_tokens_total ")))
    assert completion_tokens >= 4
    snapshot = server.host.metrics.snapshot()
    assert snapshot.requests_total >= 2 and snapshot.ttft_ms_median is not None and snapshot.ttft_ms_median > 0


def test_healthz_and_metrics_need_no_token(server: ServerThread, smollm2_int4_raw: Path) -> None:
    r = requests.get(f"{server.url}/healthz", timeout=5)
    assert r.status_code == 200 and r.json()["model"] == smollm2_int4_raw.name
    assert requests.get(f"{server.url}/v1/models", timeout=5).status_code == 401


def test_daemon_mount_503_until_a_model_is_switched_in(smollm2_int4_raw: Path) -> None:
    """The daemon's way: the app does not own the host; the update path calls switch()."""
    with ServerThread(None, threads=2) as srv:
        health = requests.get(f"{srv.url}/healthz", timeout=5)
        assert health.status_code == 503
        assert health.json() == {"error": {"message": "Loading model", "type": "unavailable_error", "param": None,
                                           "code": 503}}
        r = requests.post(f"{srv.url}/v1/chat/completions", json={"messages": QUESTION}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
        assert requests.get(f"{srv.url}/v1/models", timeout=5).json()["data"] == []
        identity = srv.call(srv.host.switch(smollm2_int4_raw))
        assert identity.name == smollm2_int4_raw.name
        assert requests.get(f"{srv.url}/healthz", timeout=5).status_code == 200
        r = requests.post(f"{srv.url}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200


def test_worker_exits_cleanly_when_stopped(smollm2_int4_raw: Path) -> None:
    """A worker told to shut down mid-generation exits 0 even while its stdin stays open: freeing
    the generation, the model and onnxruntime-genai's global state (OgaShutdown) on the way out must
    not crash, and its reader thread, blocked in read(), must not abort interpreter shutdown (SIGABRT)."""
    import asyncio

    from agent.serving.worker.client import WorkerClient
    from agent.wire.worker import GenerateCommand, ShutdownCommand, TokenEvent

    async def shut_down_with_stdin_open() -> int:
        worker = await WorkerClient.start(smollm2_int4_raw, threads=1)
        events = worker.generate(GenerateCommand(id="long", prompt="Once upon a time",
                                                 options=SamplingOptions(max_tokens=500)))
        async for event in events:
            if isinstance(event, TokenEvent):
                break  # the generation is open now (and stays open: the generator is not closed yet)
        worker._send(ShutdownCommand())
        code = await asyncio.wait_for(worker.proc.wait(), timeout=30)
        await events.aclose()
        await worker.stop()
        return code

    assert asyncio.run(shut_down_with_stdin_open()) == 0

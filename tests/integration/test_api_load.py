"""Backpressure, client disconnects and the hot switch, against a real server
under concurrent load from real HTTP clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from agent.serving.runtime import ModelRuntime
from agent.wire.errors import ActivationError
from testkit.serving import ServerThread, metric_value
from testkit.waits import wait_until


@pytest.fixture
def small_server(smollm2_int4_raw: Path) -> Iterator[ServerThread]:
    """One slot, one queue place: the third concurrent request is refused."""
    with ServerThread(smollm2_int4_raw, threads=2, parallel=1, queue_size=1) as srv:
        yield srv


def _chat(url: str, max_tokens: int, content: str = "Tell me a long story about a dragon.") -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0})


def test_backpressure_429_with_retry_after_and_the_rest_complete(small_server: ServerThread) -> None:
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: _chat(small_server.url, 60), range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 60
    assert metric_value(small_server.url, "edgefleet_queue_depth") == 0
    assert metric_value(small_server.url, "edgefleet_active_requests") == 0


def _open_stream(port: int) -> socket.socket:
    """A streaming request on a raw socket, read until the first token arrives."""
    body = json.dumps({"model": "default", "stream": True, "max_tokens": 4000, "temperature": 0,
                       "messages": [{"role": "user", "content": "Write a very long essay about rivers."}]})
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    while received.count(b"data: ") < 3:  # the role chunk and two tokens
        chunk = sock.recv(4096)
        assert chunk, f"server closed the stream early: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    return sock


def _read_to_end(sock: socket.socket) -> bytes:
    """The rest of a chunked SSE response, up to its last chunk; closes the socket."""
    received = b""
    while not received.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, "connection closed without ending the stream"
        received += chunk
    sock.close()
    return received


def test_disconnecting_stream_cancels_its_generation_and_frees_its_slot(small_server: ServerThread) -> None:
    sock = _open_stream(small_server.port)
    assert metric_value(small_server.url, "edgefleet_active_requests") == 1
    sock.close()
    wait_until(lambda: metric_value(small_server.url, "edgefleet_active_requests") == 0, 10, "the slot freed")
    # The worker really stopped generating: it confirms the cancel (its `done: cancelled` for a
    # request nobody reads any more), and the only slot serves the next request.
    worker = small_server.host.current_worker
    assert worker is not None
    wait_until(lambda: worker.cancels_confirmed == 1, 10, "the worker to confirm the cancel")
    r = _chat(small_server.url, 4)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_disconnecting_non_streaming_client_frees_its_slot(small_server: ServerThread) -> None:
    body = json.dumps({"model": "default", "max_tokens": 4000, "temperature": 0,
                       "messages": [{"role": "user", "content": "Write a very long essay about rivers."}]})
    sock = socket.create_connection(("127.0.0.1", small_server.port), timeout=30)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    wait_until(lambda: metric_value(small_server.url, "edgefleet_active_requests") == 1, 30, "the request generating")
    sock.close()
    wait_until(lambda: metric_value(small_server.url, "edgefleet_active_requests") == 0, 10, "the slot freed")
    worker = small_server.host.current_worker
    assert worker is not None
    wait_until(lambda: worker.cancels_confirmed == 1, 10, "the worker to confirm the cancel")
    assert _chat(small_server.url, 2).status_code == 200


PROMPTS = ["What is the capital of France?", "Name a color.", "Count to five.", "What is two plus two?"]


def test_switch_under_load_fails_nothing_and_each_answer_is_one_models(
        smollm2_int4_raw: Path, smollm2_int4_b128: Path, tmp_path: Path) -> None:
    expected: dict[str, dict[str, str]] = {}
    for model_dir in (smollm2_int4_raw, smollm2_int4_b128):
        runtime = ModelRuntime(model_dir, intra_op_num_threads=2, batch=True)  # as the server answers alone
        expected[model_dir.name] = {}
        for prompt in PROMPTS:
            from agent.wire.worker import ChatMessage, SamplingOptions
            ids = runtime.encode(runtime.apply_chat_template([ChatMessage(role="user", content=prompt)]))
            expected[model_dir.name][prompt] = "".join(
                s.text for s in runtime.generate(ids, SamplingOptions(temperature=0.0, max_tokens=20)))
        del runtime
    # The check below can only tell the models apart where their answers differ.
    assert any(expected[smollm2_int4_raw.name][p] != expected[smollm2_int4_b128.name][p] for p in PROMPTS)

    # With the prefix cache (on by default): the repeated prompts reuse kept ones, beside other
    # requests' decoding, and still answer exactly as alone.
    with ServerThread(smollm2_int4_raw, threads=2, parallel=2, queue_size=8) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)
        results: list[tuple[str, str, str]] = []
        failures: list[str] = []
        switched = threading.Event()
        after_switch = [0]

        def load(worker: int) -> None:
            i = worker
            while not switched.is_set() or after_switch[0] < 8:
                prompt = PROMPTS[i % len(PROMPTS)]
                i += 1
                try:
                    r = client.chat.completions.create(model="default", temperature=0, max_tokens=20,
                                                       messages=[{"role": "user", "content": prompt}])
                    results.append((r.model, prompt, r.choices[0].message.content or ""))
                    if switched.is_set():
                        after_switch[0] += 1
                except openai.OpenAIError as e:
                    failures.append(repr(e))
                    return

        threads = [threading.Thread(target=load, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 6 or bool(failures), 120, "six answers before the switch")
        identity = srv.call(srv.host.switch(smollm2_int4_b128))
        switched.set()
        assert identity.name == smollm2_int4_b128.name

        # A model that fails to load leaves the current one serving.
        broken = tmp_path / "broken"
        broken.mkdir()
        shutil.copy(smollm2_int4_raw / "genai_config.json", broken / "genai_config.json")
        with pytest.raises(ActivationError, match="failed to load"):
            srv.call(srv.host.switch(broken))
        for t in threads:
            t.join(120)

        assert failures == []
        models_seen = {model for model, _, _ in results}
        assert models_seen == {smollm2_int4_raw.name, smollm2_int4_b128.name}
        for model, prompt, text in results:
            assert text == expected[model][prompt], (model, prompt, text)
        assert client.models.list().data[0].id == smollm2_int4_b128.name
        assert metric_value(srv.url, "edgefleet_model_switches_total") == 1


def test_switch_checks_the_canary_before_serving(small_server: ServerThread, smollm2_int4_raw: Path,
                                                 smollm2_int4_b128: Path) -> None:
    from agent.wire.manifest import Canary

    runtime = ModelRuntime(smollm2_int4_b128, intra_op_num_threads=2)
    good = runtime.greedy_token_ids("The capital of France is", 8)
    bad = Canary(prompt="The capital of France is", max_new_tokens=8, expected_token_ids=[good[0] + 1, *good[1:]])
    with pytest.raises(ActivationError, match="failed its canary.*position 0"):
        small_server.call(small_server.host.switch(smollm2_int4_b128, canary=bad))
    assert requests.get(f"{small_server.url}/v1/models", timeout=5).json()["data"][0]["id"] == smollm2_int4_raw.name
    assert _chat(small_server.url, 2).status_code == 200
    identity = small_server.call(small_server.host.switch(
        smollm2_int4_b128, canary=Canary(prompt="The capital of France is", max_new_tokens=8,
                                         expected_token_ids=good)))
    assert identity.name == smollm2_int4_b128.name
    assert metric_value(small_server.url, "edgefleet_model_switches_total") == 1


def test_killed_worker_fails_its_request_and_is_restarted(small_server: ServerThread) -> None:
    sock = _open_stream(small_server.port)
    worker = small_server.host._current
    assert worker is not None
    worker.proc.kill()  # SIGKILL, mid-generation
    received = _read_to_end(sock)
    assert b'"code":"worker_died"' in received and b"[DONE]" not in received
    wait_until(lambda: requests.get(f"{small_server.url}/healthz", timeout=5).status_code == 200, 30,
               "the worker restarted")
    r = _chat(small_server.url, 3)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert metric_value(small_server.url, "edgefleet_worker_restarts_total") == 1
    assert small_server.host._current is not worker and small_server.host._current.proc.pid != worker.proc.pid


def test_a_worker_crash_loop_backs_off(tiny_raw: Path) -> None:
    """Each restarted worker killed as soon as it serves: the restarts wait 1, 2, then 4 s (at
    least; only a worker that served a minute ends the loop), so a crash loop cannot spin the CPU."""
    with ServerThread(tiny_raw, threads=1, parallel=1, queue_size=4) as srv:
        gaps: list[float] = []
        for _ in range(3):
            worker = srv.host.current_worker
            assert worker is not None
            killed_at = time.monotonic()
            os.kill(worker.proc.pid, signal.SIGKILL)
            wait_until(lambda w=worker: srv.host.current_worker not in (None, w) and srv.host.state == "ready", 60,
                       "the worker restarted")
            gaps.append(time.monotonic() - killed_at)
        assert [g >= floor for g, floor in zip(gaps, (1.0, 2.0, 4.0), strict=True)] == [True] * 3, gaps
        assert metric_value(srv.url, "edgefleet_worker_restarts_total") == 3
        assert _chat(srv.url, 3).status_code == 200


def test_a_restart_that_fails_answers_the_queued_request_503(smollm2_int4_raw: Path, tmp_path: Path) -> None:
    """The model dir broke under a running worker, which then dies with a request queued behind
    its stream: the restart fails, and the queued request gets a 503 in OpenAI's shape, not a hang."""
    model = tmp_path / "model"
    shutil.copytree(smollm2_int4_raw, model, copy_function=os.link)  # links: the shared build stays whole
    with ServerThread(model, threads=2, parallel=1, queue_size=1) as srv:
        running = _open_stream(srv.port)  # holds the only slot
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(_chat, srv.url, 3)
            wait_until(lambda: metric_value(srv.url, "edgefleet_queue_depth") == 1, 10, "the second request queued")
            (model / "genai_config.json").unlink()
            worker = srv.host.current_worker
            assert worker is not None
            os.kill(worker.proc.pid, signal.SIGKILL)
            r = queued.result(timeout=60)
        running.close()
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["type"] == "unavailable_error" and "failed to restart" in error["message"], error
        assert srv.host.state == "failed"
        assert requests.get(f"{srv.url}/healthz", timeout=5).status_code == 503


def test_a_switch_ends_a_request_that_outlasts_the_drain_timeout(smollm2_int4_raw: Path, tmp_path: Path) -> None:
    """A hot switch lets in-flight requests finish on the old model for at most `drain_timeout_s`:
    one that runs longer is ended with an error event in OpenAI's shape (not left hanging, and
    not holding the old model in RAM), and the switch completes."""
    twin = tmp_path / "twin"
    shutil.copytree(smollm2_int4_raw, twin, copy_function=os.link)
    with ServerThread(smollm2_int4_raw, threads=2, parallel=2, queue_size=2) as srv:
        srv.host.drain_timeout_s = 1.0
        stream = _open_stream(srv.port)  # 4000 tokens: far longer than the drain timeout
        old = srv.host.current_worker
        assert old is not None
        srv.call(srv.host.switch(twin), timeout_s=120)
        received = _read_to_end(stream)
        assert b'"error"' in received and b"drain_timeout_s" in received, received[-600:]
        assert not old.is_alive and srv.host.current_worker is not old
        assert _chat(srv.url, 3).status_code == 200


def test_client_leaving_the_queue_never_runs(small_server: ServerThread) -> None:
    running = _open_stream(small_server.port)  # holds the only slot
    body = json.dumps({"model": "default", "max_tokens": 50, "temperature": 0,
                       "messages": [{"role": "user", "content": "Count to fifty."}]})
    queued = socket.create_connection(("127.0.0.1", small_server.port), timeout=30)
    queued.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    wait_until(lambda: metric_value(small_server.url, "edgefleet_queue_depth") == 1, 10, "the second request queued")
    queued.close()
    wait_until(lambda: metric_value(small_server.url, "edgefleet_queue_depth") == 0, 10, "the queued request dropped")
    running.close()
    wait_until(lambda: metric_value(small_server.url, "edgefleet_active_requests") == 0, 10, "the slot freed")
    # Only the streaming request ever reached the worker.
    assert metric_value(small_server.url, "edgefleet_ttft_seconds_count") == 1


def test_concurrent_requests_share_the_model_token_by_token(smollm2_int4_raw: Path) -> None:
    with ServerThread(smollm2_int4_raw, threads=2, parallel=2, queue_size=0) as srv:
        first = _open_stream(srv.port)
        second = _open_stream(srv.port)  # gets its tokens while the first (4000 tokens) still runs
        assert metric_value(srv.url, "edgefleet_active_requests") == 2
        first.close()
        second.close()

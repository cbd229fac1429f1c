"""`edge-agent serve`, `prompt` and `chat` as real processes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from agent.serving.runtime import ModelRuntime
from agent.wire.worker import ChatMessage, SamplingOptions
from builder.demo.ports import free_port
from testkit.env import subprocess_env
from testkit.serving import metric_value, model_workers, wait_healthy

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def expected_answer(smollm2_int4_raw: Path) -> str:
    runtime = ModelRuntime(smollm2_int4_raw, intra_op_num_threads=2)
    ids = runtime.encode(runtime.apply_chat_template([ChatMessage(role="user", content=QUESTION)]))
    return "".join(s.text for s in runtime.generate(ids, SamplingOptions(temperature=0.0, max_tokens=16)))


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "agent.cli", *args], env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.path))


def _unix_request(path: Path, method: str, url: str, body: dict[str, object] | None = None) -> tuple[int, bytes]:
    conn = _UnixHTTPConnection(path)
    try:
        conn.request(method, url, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _workers_of(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    return model_workers(proc.pid, recursive=True)


@pytest.fixture(scope="module")
def served(smollm2_int4_raw: Path) -> Iterator[str]:
    port = free_port()
    proc = _start(["serve", "--model", str(smollm2_int4_raw), "--port", str(port), "--threads", "2"])
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prompt_streams_from_the_running_api(served: str, expected_answer: str) -> None:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "prompt", QUESTION, "--url", served,
                          "--max-tokens", "16"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected_answer + "\n"


def test_prompt_with_model_dir_streams_without_a_server(smollm2_int4_raw: Path, expected_answer: str) -> None:
    proc = _start(["prompt", QUESTION, "--model", str(smollm2_int4_raw), "--max-tokens", "16", "--threads", "2"])
    assert proc.stdout is not None
    first = proc.stdout.read(4)  # the answer arrives in pieces, before the process ends
    assert proc.poll() is None
    rest = proc.stdout.read()
    assert proc.wait(60) == 0
    assert first + rest == expected_answer + "\n"


def test_chat_keeps_the_conversation(served: str, smollm2_int4_raw: Path) -> None:
    runtime = ModelRuntime(smollm2_int4_raw, intra_op_num_threads=1)
    one_turn = len(runtime.encode(runtime.apply_chat_template([ChatMessage(role="user", content="My name is Ada.")])))
    before = metric_value(served, "edgefleet_prompt_tokens_total")
    out = subprocess.run([sys.executable, "-m", "agent.cli", "chat", "--url", served, "--max-tokens", "8"],
                         input="My name is Ada.\nWhat is my name?\n/exit\n", env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.split("> ") if line.strip()]
    assert len(answers) == 2
    # The second prompt carried the first question and its 8-token answer.
    assert metric_value(served, "edgefleet_prompt_tokens_total") - before >= 2 * one_turn + 8


def test_prompt_against_no_server_is_one_clear_error() -> None:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "prompt", "hi", "--url",
                          f"http://127.0.0.1:{free_port()}"], env=subprocess_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert "cannot reach the agent API" in out.stderr and "Traceback" not in out.stderr


def test_serve_on_unix_socket_and_worker_dies_with_a_killed_server(smollm2_int4_raw: Path, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    proc = _start(["serve", "--model", str(smollm2_int4_raw), "--bind", f"unix:{sock}", "--threads", "2"])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _unix_request(sock, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /healthz 200 on the unix socket"
            time.sleep(0.05)
        status, body = _unix_request(sock, "POST", "/v1/completions",
                                     {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3
        workers = _workers_of(proc)
        assert len(workers) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # The worker notices its stdin closing and exits: no orphaned model in memory.
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_rejects_a_dir_that_is_not_a_model(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--model", str(tmp_path)],
                         env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "not a model dir" in out.stderr


def test_serve_exits_with_activation_failed_when_the_model_does_not_load(
        smollm2_int4_raw: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(smollm2_int4_raw / "genai_config.json", tmp_path / "genai_config.json")  # no weights
    out = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--model", str(tmp_path), "--port",
                          str(free_port())], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 8, out.stderr
    assert "failed to load" in out.stderr and "Traceback" not in out.stderr


def test_serve_refuses_an_onnxruntime_genai_release_it_was_not_tested_with(
        smollm2_int4_raw: Path, tmp_path: Path) -> None:
    """A fake for what no test box has (another release installed): a dist-info that says 0.19.0,
    first on the path. The worker refuses to bind the C API rather than call it with 0.18's signatures."""
    fake = tmp_path / "site"
    dist_info = fake / "onnxruntime_genai-0.19.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-genai\nVersion: 0.19.0\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{fake}{os.pathsep}{env['PYTHONPATH']}"
    out = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--model", str(smollm2_int4_raw), "--port",
                          str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 8, out.stderr
    assert "onnxruntime-genai 0.19.0 is installed" in out.stderr, out.stderr
    assert "pip install onnxruntime-genai==0.18.0" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_caps_a_request_without_max_tokens_at_default_max_tokens(smollm2_int4_raw: Path) -> None:
    port = free_port()
    proc = _start(["serve", "--model", str(smollm2_int4_raw), "--port", str(port), "--threads", "2",
                   "--default-max-tokens", "6", "--prefix-cache-mb", "0"])
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}], "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 6 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        proc.kill()
        proc.wait()

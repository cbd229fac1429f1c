"""The local API under abuse, as a real `edge-agent serve` process: bodies up to 2 GB, 2,000
hostile JSON bodies, 1,000 idle half-open connections, a 1 MB stop string, an exposed bind
without a token. Each gets a clear error in OpenAI's shape (never a 500), the process's memory
does not grow with what it was sent, and a well-behaved client keeps getting answers.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from builder.demo.ports import free_port
from testkit.env import subprocess_env
from testkit.hostile import hostile_payloads
from testkit.serving import wait_healthy

CHAT = "/v1/chat/completions"
GOOD = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def server(smollm2_int4_raw: Path) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    # A mutated body that drops `model` and `max_tokens` is a valid request for the default budget:
    # capped, so that the test's time does not hang on how long SmolLM2 samples.
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--model", str(smollm2_int4_raw),
                             "--port", str(port), "--threads", "1", "--default-max-tokens", "16"], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}", psutil.Process(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class WellBehavedClient:
    """Keeps asking for a short answer while the abuse goes on; every answer must be a 200."""

    def __init__(self, url: str) -> None:
        self.url, self.statuses = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.statuses.append(requests.post(self.url + CHAT, json=GOOD, timeout=60).status_code)
            except requests.RequestException as e:
                self.statuses.append(repr(e))

    def __enter__(self) -> WellBehavedClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)


def _raw_post(port: int, declared_bytes: int | None, send_bytes: int) -> tuple[int, dict[str, object], int]:
    """POST a body of `send_bytes` zeros (chunked when `declared_bytes` is None) while reading: the
    server answers and closes before the body ends, so the answer is read as soon as it comes
    (a server that closes with unread data resets the connection). Returns (status, JSON body,
    bytes sent before the answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {declared_bytes}\r\n" if declared_bytes is not None else "Transfer-Encoding: chunked\r\n"
    sock.sendall((head + "\r\n").encode())
    block = b"0" * (64 << 10)
    chunk = block if declared_bytes is not None else b"%x\r\n%s\r\n" % (len(block), block)
    pending, sent, answer = b"", 0, b""
    sock.setblocking(False)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and not _whole(answer):
            want_write = sent < send_bytes or pending
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 1.0)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            elif writable:
                if not pending:
                    pending, sent = chunk, sent + len(block)
                pending = pending[sock.send(pending):]
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: what this test wants (the answer is read above)
    finally:
        sock.close()
    head_text, _, body = answer.partition(b"\r\n\r\n")
    status = int(head_text.split(b" ")[1])
    return status, json.loads(body[body.find(b"{"):body.rfind(b"}") + 1]), sent


def _whole(answer: bytes) -> bool:
    """The answer's head and its JSON body have arrived."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    return bool(sep) and body.rstrip().endswith(b"}") and body.count(b"{") <= body.count(b"}")


def test_huge_bodies_get_413_and_cost_no_memory(server: tuple[str, psutil.Process]) -> None:
    url, proc = server
    port = int(url.rsplit(":", 1)[1])
    rss_before = proc.memory_info().rss
    with WellBehavedClient(url) as client:
        # Chunked: no length to refuse up front, so the server counts while it reads.
        status, body, _ = _raw_post(port, None, 16 << 20)
        assert status == 413 and body["error"]["code"] == "request_too_large", body  # type: ignore[index]
        # 2 GB declared: refused on the header, before any of it is read.
        status, body, _ = _raw_post(port, 2 << 30, 1 << 20)
        assert status == 413 and body["error"]["code"] == "request_too_large", body  # type: ignore[index]
        # 1 MiB: under the cap, read, then refused as not JSON.
        status, body = _small_post(url, 1 << 20)
        assert status == 400, body
    growth_mb = (proc.memory_info().rss - rss_before) / 2**20
    assert growth_mb < 20, f"the API process grew {growth_mb:.1f} MB"
    assert client.statuses and all(s == 200 for s in client.statuses), client.statuses


def _small_post(url: str, size: int) -> tuple[int, dict[str, object]]:
    r = requests.post(url + CHAT, data=b"0" * size, headers={"Content-Type": "application/json"}, timeout=60)
    return r.status_code, r.json()


def test_2000_hostile_json_bodies_are_each_a_clear_4xx(server: tuple[str, psutil.Process]) -> None:
    url, _ = server
    statuses: dict[int, int] = {}
    session = requests.Session()
    # Around a request for another model: whatever validates ends in a 404, not a generation.
    for payload in hostile_payloads(2000, {**GOOD, "model": "not-this-one"}, cap_bytes=64 * 1024, seed=11):
        r = session.post(url + CHAT, data=payload, headers={"Content-Type": "application/json"}, timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code != 500, payload[:200]
        if r.status_code != 200:
            error = r.json()["error"]
            assert error["message"] and error["type"], r.text
    assert statuses.get(400, 0) > 1000, statuses


def test_long_stop_strings_and_1000_idle_connections(server: tuple[str, psutil.Process]) -> None:
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    r = requests.post(url + CHAT, json={**GOOD, "stop": ["x" * (1 << 20)]}, timeout=60)
    assert r.status_code == 400 and "stop" in r.json()["error"]["message"]
    idle = []
    try:
        for _ in range(1000):  # half a request line each, then silence (slowloris)
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            idle.append(s)
        with WellBehavedClient(url) as client:
            while len(client.statuses) < 3:
                threading.Event().wait(0.1)
        assert all(s == 200 for s in client.statuses), client.statuses
    finally:
        for s in idle:
            s.close()


def test_an_exposed_bind_without_a_token_is_refused(smollm2_int4_raw: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--model", str(smollm2_int4_raw),
                           "--host", "0.0.0.0", "--port", str(free_port())],
                          env=subprocess_env(EDGE_AGENT_API_TOKEN=""), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "listens beyond this host without an api_token" in done.stderr
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--model", str(smollm2_int4_raw),
                             "--host", "0.0.0.0", "--port", str(port), "--token-file", str(token)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        base = f"http://127.0.0.1:{port}{CHAT}"
        assert requests.post(base, json=GOOD, timeout=60).status_code == 401
        assert requests.post(base, json=GOOD, headers={"Authorization": "Bearer "}, timeout=60).status_code == 401
        ok = requests.post(base, json=GOOD, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200
        assert "s3cret" not in " ".join(psutil.Process(proc.pid).cmdline())
    finally:
        proc.kill()
        proc.wait()

"""A real uvicorn server in a thread of the test process, over a real ModelHost
(whose model workers are real subprocesses), so tests can also call
`host.switch()` on the server's own event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import psutil
import pytest
import requests
import uvicorn

from agent.serving.api import create_app
from agent.serving.host import ModelHost
from agent.serving.prefix_cache import DEFAULT_BUDGET_BYTES
from builder.demo.ports import free_port
from testkit.waits import is_listening, wait_until

T = TypeVar("T")


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    """Bounded wait for /healthz 200 (503 while loading)."""
    last = ["no answer"]

    def is_healthy() -> bool:
        try:
            r = requests.get(f"{url}/healthz", timeout=2)
        except requests.ConnectionError as e:
            last[0] = str(e)
            return False
        last[0] = f"{r.status_code} {r.text}"
        return r.status_code == 200

    wait_until(is_healthy, timeout_s, f"{url}/healthz to answer 200", interval_s=0.05, detail=lambda: last[0])


def wait_listening(port: int, timeout_s: float = 30.0) -> None:
    wait_until(lambda: is_listening(port), timeout_s, f"something to listen on port {port}", interval_s=0.05)


class ServerThread:
    def __init__(self, model_dir: Path | None, *, threads: int = 2, parallel: int = 4, queue_size: int = 16,
                 api_token: str | None = None, stream_interval_s: float = 0.05,
                 prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES, image_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = ModelHost(threads=threads, parallel=parallel, queue_size=queue_size,
                              stream_interval_s=stream_interval_s, prefix_cache_bytes=prefix_cache_bytes)
        app = create_app(self.host, api_token=api_token, model_dir=model_dir, image_dir=image_dir)
        self.owns_host = model_dir is not None
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def __enter__(self) -> ServerThread:
        self.thread.start()
        if self.owns_host:
            wait_healthy(self.url)
        else:
            wait_listening(self.port)
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 300.0) -> T:
        """Run `coro` on the server's loop (e.g. host.switch) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __exit__(self, *exc: object) -> None:
        if not self.owns_host:
            self.call(self.host.close())
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop within 30 s"


def model_workers(pid: int, model_dir: str | None = None, *, recursive: bool = False) -> list[psutil.Process]:
    """The live model-worker processes under `pid` (of `model_dir` when given). A worker that has
    exited but is not reaped yet (a zombie for a moment) or that exits while we look is not one."""
    workers = []
    for child in psutil.Process(pid).children(recursive=recursive):
        try:
            cmdline = child.cmdline()
        except psutil.NoSuchProcess:  # ZombieProcess is one
            continue
        if "agent.serving.worker" in cmdline and (model_dir is None or model_dir in cmdline):
            workers.append(child)
    return workers


@pytest.fixture(scope="module")
def smollm2_api(smollm2_int4_raw: Path) -> Iterator[ServerThread]:
    """The API over SmolLM2 INT4 (2 threads, no token), one per test module."""
    with ServerThread(smollm2_int4_raw, threads=2) as server:
        yield server


@pytest.fixture(scope="module")
def smollm2_openai(smollm2_api: ServerThread) -> openai.OpenAI:
    """The official `openai` client of `smollm2_api`: no retries, so every error reaches the test."""
    return openai.OpenAI(base_url=f"{smollm2_api.url}/v1", api_key="unused", max_retries=0, timeout=120)


def metric_value(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)

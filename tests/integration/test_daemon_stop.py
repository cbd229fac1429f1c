"""SIGTERM drains the API: a request in flight finishes however long it takes within
`stop_drain_s`, and one still running past it ends with a 503 that says why, never a bare 500.

The model worker is held with SIGSTOP (a real process paused) to make a request outlast
uvicorn's own 5 s graceful period: a CI run once cut a slow request there."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from testkit.agents import Agent, Release, installed_agent
from testkit.serving import model_workers

pytestmark = pytest.mark.slow


class HeldRequest:
    """A chat request sent while the model worker is stopped (SIGSTOP), so it stays in flight
    until the test lets the worker go on (SIGCONT)."""

    def __init__(self, agent: Agent) -> None:
        assert agent.proc is not None
        [self.worker] = model_workers(agent.proc.pid)
        self.status: int | None = None
        self.body: dict[str, Any] = {}
        self.worker.send_signal(signal.SIGSTOP)
        self._thread = threading.Thread(target=self._send, args=(agent,))
        self._thread.start()
        agent.wait(lambda: "edgefleet_active_requests 1" in requests.get(f"{agent.url}/metrics", timeout=5).text,
                   30, "the request in flight")

    def _send(self, agent: Agent) -> None:
        r = agent.chat("Tell me about lighthouses.", max_tokens=16, timeout_s=120)
        json_body = r.headers.get("content-type", "").startswith("application/json")
        self.status, self.body = r.status_code, r.json() if json_body else {"not json": r.text}

    def resume(self) -> None:
        self.worker.send_signal(signal.SIGCONT)

    def answer(self) -> tuple[int | None, dict[str, Any]]:
        self._thread.join(60)
        assert not self._thread.is_alive(), "no answer within 60 s"
        return self.status, self.body


def test_sigterm_lets_a_request_finish_that_outlasts_uvicorns_grace(release: Release, tiny_raw: Path,
                                                                    tmp_path: Path) -> None:
    with installed_agent(release, tiny_raw, tmp_path / "a") as agent:
        held = HeldRequest(agent)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        time.sleep(7)  # past uvicorn's default 5 s, within stop_drain_s (45 s)
        held.resume()
        status, body = held.answer()
        assert status == 200, body
        assert body["usage"]["completion_tokens"] > 0, body
        assert agent.kill(signal.SIGTERM) == 0, agent.log_tail()
        assert "event=stop_drain_timeout" not in agent.log()


def test_a_request_past_stop_drain_s_ends_with_a_503_that_says_so(release: Release, tiny_raw: Path,
                                                                  tmp_path: Path) -> None:
    with installed_agent(release, tiny_raw, tmp_path / "a") as agent:
        agent.write_config({**agent.config_values, "stop_drain_s": 1})
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)  # a reload applies it
        agent.wait(lambda: "event=config_reloaded" in agent.log(), 30, "the config reloaded")
        held = HeldRequest(agent)
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        try:
            status, body = held.answer()
        finally:
            held.resume()
        assert time.monotonic() - started < 5, "the drain outlasted stop_drain_s"
        assert status == 503, body
        assert body["error"]["code"] == "agent_stopping" and "stop_drain_s = 1 s" in body["error"]["message"], body
        assert agent.kill(signal.SIGTERM) == 0, agent.log_tail()
        assert "event=stop_drain_timeout stop_drain_s=1" in agent.log()

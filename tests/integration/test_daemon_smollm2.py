"""The daemon with the real SmolLM2-135M INT4 artifact (`edge-builder build` output):
hot switches both-in-RAM and drain-and-switch with a client calling the API throughout
(zero failed requests), and SIGTERM letting an in-flight generation finish."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.update.statemachine import Phase
from testkit.agents import Agent, Poller, release_repo
from testkit.serving import model_workers

pytestmark = pytest.mark.slow
NAME = "smollm2-135m"


class WorkerCount:
    """Samples the agent's model-worker processes every 10 ms; `most` is the most alive at once."""

    def __init__(self, agent: Agent) -> None:
        assert agent.proc is not None
        self._daemon_pid = agent.proc.pid
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _alive(self) -> int:
        return len(model_workers(self._daemon_pid))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, self._alive())
            self._stop.wait(0.01)

    def __enter__(self) -> WorkerCount:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _reload(agent: Agent, **changes: object) -> None:
    agent.write_config({**agent.config_values, **changes})
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)  # re-reads the config and runs a check


def test_smollm2_hot_switches_and_sigterm_drain(smollm2_artifact: Path, tmp_path: Path) -> None:
    with release_repo(tmp_path) as release:
        release.repo.publish(smollm2_artifact)  # the builder's own artifact, its own canary
        release.set_channel(NAME, 1)
        agent = Agent(tmp_path / "a", release, extra={"intra_op_num_threads": 2})
        agent.start()
        try:
            agent.wait_serving(NAME, 1, timeout_s=180)
            agent.wait(lambda: agent.phase() is Phase.ACTIVE and agent.store.current() is not None, 60, "v1")
            for version, mode in ((2, "both"), (3, "drain")):
                release.publish(smollm2_artifact, NAME, version)
                with Poller(agent) as poller, WorkerCount(agent) as workers:
                    _reload(agent, switch_mode=mode)
                    agent.wait_serving(NAME, version, timeout_s=180)
                    vdir = agent.store.model_dir(NAME, version).resolve()
                    agent.wait(lambda: agent.store.current() == vdir, 60, f"v{version} current")
                assert poller.failures() == [] and len(poller.results) >= 3, poller.results[-5:]
                assert f"event=activated model={NAME} version={version} mode={mode}" in agent.log()
                # What the host did, seen from outside: both models in RAM at once, or never.
                assert workers.most == (2 if mode == "both" else 1), (mode, workers.most)
            assert agent.store.check_invariants() == []

            # SIGTERM while a generation runs: it finishes, then the agent exits 0.
            result: dict[str, object] = {}

            def long_request() -> None:
                r = agent.chat("Write a long story about a lighthouse.", max_tokens=120, timeout_s=120)
                result["status"], result["body"] = r.status_code, r.json()
            t = threading.Thread(target=long_request)
            t.start()
            agent.wait(lambda: "edgefleet_active_requests 1" in requests.get(f"{agent.url}/metrics", timeout=5).text,
                       30, "the long request generating")
            assert agent.kill(signal.SIGTERM) == 0, agent.log_tail()
            t.join(60)
            assert result["status"] == 200, result
            # Finished, not cut short: all 120 tokens, or the model's own end of text.
            body: dict[str, Any] = result["body"]  # type: ignore[assignment]
            finish, tokens = body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]
            assert (finish, tokens) == ("length", 120) or (finish == "stop" and tokens < 120), body
            assert "event=stopped" in agent.log()
        finally:
            agent.stop()
    shutil.rmtree(tmp_path / "a", ignore_errors=True)

"""Rollback and refusal in the real daemon, with the old model answering throughout.

Correctly signed but broken releases (a canary that does not reproduce, a
`genai_config.json` that does not load, a worker that dies during probation) are rolled
back with zero failed requests while a client keeps calling /v1/chat/completions; models
the device cannot run (RAM, disk, architecture, onnxruntime-genai version) are refused
with a specific reason and not one byte of them is downloaded.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.update.journal import Journal
from agent.update.statemachine import ModelRef, Phase
from testkit.agents import Agent, Poller, Release, installed_agent, measured_canary
from testkit.serving import model_workers


@pytest.fixture
def agent(tiny_raw: Path, release: Release, tmp_path: Path) -> Iterator[Agent]:
    with installed_agent(release, tiny_raw, tmp_path / "a") as a:
        yield a


def _switch_channel(agent: Agent, channel: str) -> None:
    """SIGHUP with a new channel in the config: the reload runs a check."""
    agent.write_config({**agent.config_values, "channel": channel})
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)


def _check_count(agent: Agent) -> int:
    return agent.log().count("event=check_requested")


def test_signed_but_broken_releases_roll_back_while_the_old_model_serves(
        tiny_raw: Path, release: Release, agent: Agent) -> None:
    v1 = agent.store.model_dir("tiny", 1).resolve()
    with Poller(agent) as poller:
        # v3: loads, but its canary (as signed) does not reproduce.
        expected = list(measured_canary(str(tiny_raw)))
        release.publish(tiny_raw, "tiny", 3, canary_ids=[expected[0] + 1, *expected[1:]])
        n = _check_count(agent)
        _switch_channel(agent, "stable")
        agent.wait(lambda: _check_count(agent) > n and agent.phase() is Phase.FAILED, 60, "v3 rolled back")
        state = Journal(agent.store.journal_path).load()
        assert "failed its canary" in (state.reason or "") and ModelRef(name="tiny", version=3) in state.refused

        # v4: its genai_config.json names a decoder file that is not there: the load fails.
        release.publish(tiny_raw, "tiny", 4, config_edit={"filename": "missing.onnx"})
        n = _check_count(agent)
        _switch_channel(agent, "stable")
        agent.wait(lambda: _check_count(agent) > n and agent.phase() is Phase.FAILED
                   and "tiny v4" in (Journal(agent.store.journal_path).load().reason or ""), 60, "v4 rolled back")
        state = Journal(agent.store.journal_path).load()
        assert "failed to load" in (state.reason or "") and ModelRef(name="tiny", version=4) in state.refused
        assert agent.store.current() == v1 and agent.store.check_invariants() == []
        # Refused: a new check does not download v4 again.
        gets = len(release.artifact_gets("tiny", 4))
        refusals = agent.log().count("is refused until a newer version")
        _switch_channel(agent, "stable")
        agent.wait(lambda: agent.log().count("is refused until a newer version") > refusals
                   and agent.phase() is Phase.FAILED, 60, "v4 refused again")
        assert len(release.artifact_gets("tiny", 4)) == gets
        n_during = len(poller.results)
    assert n_during >= 10, "the client must have kept asking during the updates"
    assert poller.failures() == [] and {m for _, m in poller.results} == {"tiny"}
    assert agent.health() == {"status": "ok", "model": "tiny", "version": 1}


def _zombie_children(pid: int) -> list[int]:
    zombies = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return zombies


def _worker_of(agent: Agent, version: int) -> psutil.Process | None:
    assert agent.proc is not None
    workers = model_workers(agent.proc.pid, str(agent.store.model_dir("tiny", version)), recursive=True)
    return workers[0] if workers else None


def test_a_drain_first_switch_that_fails_reloads_the_old_model_and_fails_no_request(
        tiny_raw: Path, release: Release, agent: Agent) -> None:
    """switch_mode "drain" (no RAM for two models): the old worker is stopped before the new one
    loads; when the new one fails its canary, the old model is loaded again, and the requests that
    waited in the queue meanwhile are answered by it, none failed."""
    assert agent.proc is not None
    daemon_pid = agent.proc.pid

    def worker_pids() -> set[int]:
        return {worker.pid for worker in model_workers(daemon_pid)}
    v1_worker = worker_pids()
    assert len(v1_worker) == 1
    expected = list(measured_canary(str(tiny_raw)))
    release.publish(tiny_raw, "tiny", 2, canary_ids=[expected[0] + 1, *expected[1:]])
    agent.write_config({**agent.config_values, "switch_mode": "drain"})
    with Poller(agent) as poller:
        n = _check_count(agent)
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait(lambda: _check_count(agent) > n and agent.phase() is Phase.FAILED, 60, "v2 rolled back")
        agent.wait(lambda: agent.health() == {"status": "ok", "model": "tiny", "version": 1}, 60, "v1 serving")
        answered_after = len(poller.results)
        agent.wait(lambda: len(poller.results) > answered_after + 2, 30, "answers after the rollback")
    log = agent.log()
    assert "event=drained model=tiny" in log and "mode=drain error=" in log and "reloading" in log, log[-3000:]
    assert poller.failures() == [], poller.failures()[:5]
    # v1 really went away and came back: another worker process serves it now.
    assert len(worker_pids()) == 1 and worker_pids() != v1_worker
    # and every child that exited on the way (two workers, the update job) is reaped, none left a zombie
    agent.wait(lambda: _zombie_children(daemon_pid) == [], 10, "no zombie children")
    state = Journal(agent.store.journal_path).load()
    assert "failed its canary" in (state.reason or "") and ModelRef(name="tiny", version=2) in state.refused
    assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()


def test_new_model_crashing_in_probation_rolls_back_to_previous(tiny_raw: Path, release: Release,
                                                                agent: Agent) -> None:
    release.publish(tiny_raw, "tiny", 2)
    agent.write_config({**agent.config_values, "probation_s": 20.0})
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)  # the reload runs the check
    agent.wait_serving("tiny", 2)
    agent.wait(lambda: agent.store.current() == agent.store.model_dir("tiny", 2).resolve(), 30, "v2 current")
    agent.proc.send_signal(signal.SIGHUP)  # a check requested during probation waits for its end
    agent.wait(lambda: agent.log().count("event=config_reloaded") == 2, 10, "second reload")
    worker = _worker_of(agent, 2)
    assert worker is not None
    worker.kill()  # a real crash of the new model's worker, inside its 20 s probation window
    agent.wait(lambda: "trigger=PROBATION_FAILED" in agent.log() and agent.phase() is Phase.FAILED, 60,
               "probation rollback")
    agent.wait_serving("tiny", 1)
    # The held check runs after the rollback and refuses v2 without downloading it again.
    agent.wait(lambda: "is refused until a newer version" in agent.log(), 30, "v2 refused by the held check")
    state = Journal(agent.store.journal_path).load()
    assert ModelRef(name="tiny", version=2) in state.refused
    assert "probation window" in agent.log().split("trigger=PROBATION_FAILED")[1].splitlines()[0]
    assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()
    assert agent.store.check_invariants() == [] and agent.chat().status_code == 200
    assert "event=probation_failed" in agent.log()


REFUSALS = [
    ("ram", {"min_ram_bytes": 1 << 50}, "RAM, this device has"),
    ("disk", {"min_free_disk_bytes": 1 << 55}, "free disk, this device has"),
    ("arch", {"arch": ["riscv64"]}, "is built for riscv64, this device is"),
    ("ortgenai", {"min_onnxruntime_genai_version": "99.0"}, "needs onnxruntime-genai 99.0 or later, this device has"),
]


def test_refusals_name_the_requirement_and_download_nothing(tiny_raw: Path, release: Release,
                                                            agent: Agent) -> None:
    for i, (channel, requirements, reason) in enumerate(REFUSALS):
        version = 10 + i
        release.publish(tiny_raw, "tiny", version, channel=channel, requirements=requirements)
        n = _check_count(agent)
        _switch_channel(agent, channel)
        agent.wait(lambda: _check_count(agent) > n and agent.phase() is Phase.INCOMPATIBLE
                   and f"model tiny v{version} " in (Journal(agent.store.journal_path).load().reason or ""),
                   60, f"{channel} refused")
        state = Journal(agent.store.journal_path).load()
        assert reason in (state.reason or ""), state.reason
        assert f"model tiny v{version}" in (state.reason or "")
        assert release.artifact_gets("tiny", version) == []  # not one file requested from the server
        assert [p.name for p in agent.store.staging_dir.iterdir()] == []
        assert not agent.store.has_model("tiny", version)
    assert agent.health() == {"status": "ok", "model": "tiny", "version": 1}
    assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()

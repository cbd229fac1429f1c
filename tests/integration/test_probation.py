"""Probation across restarts of the daemon: the decision (pure) and real `edge-agent run`
processes killed with SIGKILL inside the window."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.update.journal import Journal
from agent.update.probation import ProbationFile, ProbationRecord, decide_on_start
from agent.update.statemachine import ModelRef, Phase
from testkit.agents import Agent, Release
from testkit.serving import model_workers

V2 = Path("/s/models/tiny/2")


@pytest.mark.parametrize(("record", "current", "action", "unclean_after"), [
    (None, V2, "none", None),
    (ProbationRecord(model_dir=str(V2), until_unix=200.0), Path("/s/models/tiny/1"), "none", None),  # never switched
    (ProbationRecord(model_dir=str(V2), until_unix=90.0), V2, "none", None),  # window passed
    (ProbationRecord(model_dir=str(V2), until_unix=200.0, clean_stop=True), V2, "rearm", 0),
    (ProbationRecord(model_dir=str(V2), until_unix=200.0), V2, "rearm", 1),  # first death: maybe a power cut
    (ProbationRecord(model_dir=str(V2), until_unix=200.0, unclean_starts=1), V2, "roll_back", None),
])
def test_decide_on_start(record: ProbationRecord | None, current: Path, action: str,
                         unclean_after: int | None) -> None:
    verdict = decide_on_start(record, current, now_unix=100.0, window_s=150.0)
    assert verdict.action == action
    if action == "rearm":
        assert verdict.remaining_s == 100.0
        assert verdict.record is not None and verdict.record.unclean_starts == unclean_after
        assert verdict.record.clean_stop is False
    else:
        assert verdict.record is None  # the record is dropped
    if action == "roll_back":
        assert "died 2 times within the probation window" in verdict.reason


@pytest.mark.parametrize(("now_unix", "remaining"), [
    (0.0, 60.0),  # booted in 1970 (no RTC): one window at most, not 56 years
    (1_800_000_000 - 86_400, 60.0),  # a day behind
    (1_800_000_000 - 30, 30.0),  # inside the window: the time really left
    (1_800_000_000 + 86_400, None),  # a day ahead: the window has passed
    (1_800_000_000 + 10 * 365 * 86_400, None),  # ten years ahead
])
def test_a_skewed_clock_never_holds_probation_longer_than_one_window(now_unix: float,
                                                                     remaining: float | None) -> None:
    """A FAKE wall clock (the `now_unix` argument): no test can set the machine's clock."""
    record = ProbationRecord(model_dir=str(V2), until_unix=1_800_000_000.0, clean_stop=True)
    verdict = decide_on_start(record, V2, now_unix=now_unix, window_s=60.0)
    if remaining is None:
        assert verdict.action == "none"
    else:
        assert verdict.action == "rearm" and verdict.remaining_s == remaining


@pytest.fixture
def on_probation(tiny_raw: Path, release: Release, tmp_path: Path) -> Iterator[Agent]:
    """An agent that just switched from v1 to v2, with 60 s of probation left."""
    release.publish(tiny_raw, "tiny", 1)
    # v1's own window is short: checks wait out a window, and v2's check must not wait a minute.
    agent = Agent(tmp_path / "a", release, extra={"probation_s": 0.5})
    try:
        agent.start()
        agent.wait_serving("tiny", 1)
        agent.wait(lambda: agent.phase() is Phase.ACTIVE and agent.store.current() is not None, 30, "v1 installed")
        agent.wait(lambda: "event=probation_passed" in agent.log(), 30, "v1's probation passed")
        agent.write_config({**agent.config_values, "probation_s": 60.0})
        release.publish(tiny_raw, "tiny", 2)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)  # the reload takes the 60 s window and runs the check
        agent.wait_serving("tiny", 2)
        agent.wait(lambda: agent.store.current() == agent.store.model_dir("tiny", 2).resolve(), 30, "v2 current")
        record = ProbationFile(agent.state_dir).read()
        assert record is not None and record.model_dir == str(agent.store.model_dir("tiny", 2).resolve())
        yield agent
    finally:
        agent.stop()


def _restart(agent: Agent, sig: int) -> None:
    agent.kill(sig)
    agent.start()
    agent.wait(lambda: agent.health() is not None, 60, "serving again")


def test_restarts_inside_the_window_rearm_it_and_a_second_death_rolls_back(on_probation: Agent) -> None:
    agent = on_probation
    _restart(agent, signal.SIGTERM)  # a clean stop: re-armed, not counted
    agent.wait(lambda: "event=probation_resumed action=rearm" in agent.log(), 30, "re-armed after SIGTERM")
    record = ProbationFile(agent.state_dir).read()
    assert record is not None and record.unclean_starts == 0 and not record.clean_stop
    _restart(agent, signal.SIGKILL)  # the first death: maybe a power cut, re-armed and counted
    agent.wait(lambda: agent.log().count("event=probation_resumed action=rearm") == 2, 30, "re-armed after kill")
    record = ProbationFile(agent.state_dir).read()
    assert record is not None and record.unclean_starts == 1
    assert agent.store.current() == agent.store.model_dir("tiny", 2).resolve()
    _restart(agent, signal.SIGKILL)  # the second death inside the window: roll back
    agent.wait(lambda: "trigger=PROBATION_FAILED" in agent.log() and agent.phase() is Phase.FAILED, 60,
               "rollback at start")
    agent.wait_serving("tiny", 1)
    assert "died 2 times within the probation window" in agent.log()
    assert ModelRef(name="tiny", version=2) in Journal(agent.store.journal_path).load().refused
    assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()
    assert ProbationFile(agent.state_dir).read() is None
    assert agent.store.check_invariants() == [] and agent.chat().status_code == 200


def test_a_rearmed_window_still_rolls_back_a_crashing_worker(on_probation: Agent) -> None:
    agent = on_probation
    _restart(agent, signal.SIGKILL)
    agent.wait(lambda: "event=probation_resumed action=rearm" in agent.log(), 30, "re-armed")
    assert agent.proc is not None
    v2 = str(agent.store.model_dir("tiny", 2))
    workers = model_workers(agent.proc.pid, v2)
    assert len(workers) == 1
    workers[0].kill()  # the new model's worker crashes inside the re-armed window
    agent.wait(lambda: "trigger=PROBATION_FAILED" in agent.log() and agent.phase() is Phase.FAILED, 60,
               "probation rollback")
    agent.wait_serving("tiny", 1)
    assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()

"""The update driver in a real process SIGKILLed (or frozen) at each journaled state, then restarted."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.store.store import Store
from agent.update.journal import Journal
from agent.update.statemachine import ModelRef, Phase
from agent.update.updater import TEST_STOP_AT_ENV
from testkit.env import subprocess_env
from testkit.updater import UPDATE_PHASES, activator_of, make_updater, publish

P = Phase


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The local artifact tree the test doubles read (laid out like the TUF targets)."""
    return tmp_path / "repo"


# -- crash recovery: a real process killed by the test hook at each journaled state ----------------
_AGENT = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from testkit.updater import make_updater
u = make_updater(Path(sys.argv[1]), Path(sys.argv[2]))
u.start()
print(u.check_now().phase.value, flush=True)
"""


def _run_agent(repo: Path, state_dir: Path, stop_at: str | None) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(**({TEST_STOP_AT_ENV: stop_at} if stop_at else {}))
    return subprocess.run([sys.executable, "-c", _AGENT, str(repo), str(state_dir)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("stop_at", [p.value for p in UPDATE_PHASES])
def test_sigkill_at_each_state_then_restart_completes(repo: Path, tmp_path: Path, stop_at: str) -> None:
    state_dir = tmp_path / "state"
    publish(repo, 1)
    assert _run_agent(repo, state_dir, None).stdout.strip() == "ACTIVE"
    publish(repo, 2)
    killed = _run_agent(repo, state_dir, stop_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = Store(state_dir)
    assert Journal(store.journal_path).load().phase.value == stop_at  # journaled, then killed
    v1, v2 = store.model_dir("m", 1).resolve(), store.model_dir("m", 2).resolve()
    # Whatever instant it died at, current is a complete model: the old one until ACTIVE's switch.
    assert store.current() in ({v1} if stop_at != "ACTIVE" else {v1, v2})

    u = make_updater(repo, state_dir)
    state = u.start()
    assert state.phase is P.ACTIVE and state.active == ModelRef(name="m", version=2)
    assert (store.current(), store.previous()) == (v2, v1)
    assert activator_of(u).serving[-1] == v2
    assert store.check_invariants() == [] and list(store.staging_dir.iterdir()) == []


@pytest.mark.parametrize("stop_at", ["ACTIVATING", "ROLLING_BACK", "FAILED"])
def test_sigkill_during_a_failing_update_keeps_the_old_model(repo: Path, tmp_path: Path, stop_at: str) -> None:
    state_dir = tmp_path / "state"
    publish(repo, 1)
    assert _run_agent(repo, state_dir, None).stdout.strip() == "ACTIVE"
    publish(repo, 2, broken_config=True)
    assert _run_agent(repo, state_dir, stop_at).returncode == -signal.SIGKILL
    store = Store(state_dir)
    v1 = store.model_dir("m", 1).resolve()
    assert store.current() == v1
    state = make_updater(repo, state_dir).start()
    assert state.phase is P.FAILED and store.current() == v1
    assert store.check_invariants() == [] and list(store.staging_dir.iterdir()) == []


def test_stop_hook_can_freeze_the_agent_for_inspection(repo: Path, tmp_path: Path) -> None:
    import psutil

    from agent.update.updater import TEST_STOP_SIGNAL_ENV

    state_dir = tmp_path / "state"
    publish(repo, 1)
    assert _run_agent(repo, state_dir, None).stdout.strip() == "ACTIVE"
    publish(repo, 2)
    env = subprocess_env(**{TEST_STOP_AT_ENV: "ACTIVATING", TEST_STOP_SIGNAL_ENV: "STOP"})
    proc = subprocess.Popen([sys.executable, "-c", _AGENT, str(repo), str(state_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        status = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while status.status() != psutil.STATUS_STOPPED:
            assert proc.poll() is None and time.monotonic() < deadline, "the agent never stopped at ACTIVATING"
            time.sleep(0.01)
        store = Store(state_dir)
        assert Journal(store.journal_path).load().phase is P.ACTIVATING
        assert store.current() == store.model_dir("m", 1).resolve()  # canary not run: current has not moved
        assert store.has_model("m", 2)
        # A GC sweep from elsewhere, with the driver's view of the frozen update, keeps the model under test.
        observer = make_updater(repo, state_dir)
        observer.state = Journal(store.journal_path).load()
        report = store.gc(1, keep=observer.work_in_progress())
        assert store.has_model("m", 2) and store.has_model("m", 1) and not report.is_within_cap
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert make_updater(repo, state_dir).start().phase is P.ACTIVE

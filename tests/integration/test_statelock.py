"""One agent per state dir: `update --once` never runs beside the daemon on the same store,
and a killed holder never leaves the lock behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.store.lock import StateLock
from agent.wire.errors import ExitCode, StateDirBusyError
from testkit.agents import Agent, Release
from testkit.env import subprocess_env


def _update_once(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "update", "--once", "--config", str(config_path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)


def test_update_once_refuses_a_state_dir_the_daemon_holds(tiny_raw: Path, release: Release, tmp_path: Path) -> None:
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "a", release)
    try:
        agent.start()
        agent.wait_serving("tiny", 1)
        assert agent.proc is not None
        release.publish(tiny_raw, "tiny", 2)  # something to install, if the pass ran
        journal = (agent.state_dir / "state.json").read_bytes()
        out = _update_once(agent.config_path)
        assert out.returncode == ExitCode.FAILED, out.stderr
        assert f"is in use by another edge-agent process (pid {agent.proc.pid})" in out.stderr
        assert (agent.state_dir / "state.json").read_bytes() == journal  # the pass did not start
        assert not agent.store.model_dir("tiny", 2).exists()
        agent.kill(signal.SIGKILL)
        out = _update_once(agent.config_path)  # the kernel dropped the dead daemon's lock
        assert out.returncode == 0, out.stderr
        assert agent.store.current() == agent.store.model_dir("tiny", 2).resolve()
    finally:
        agent.stop()


def test_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom agent.store.lock import StateLock\n"
         "lock = StateLock(Path(sys.argv[1])).acquire()\nprint('held', flush=True)\ntime.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StateDirBusyError, match=rf"in use by another edge-agent process \(pid {holder.pid}\)"):
            StateLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with StateLock(tmp_path):  # no stale lock after kill -9
        assert (tmp_path / "agent.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(StateDirBusyError, match=rf"in use by another edge-agent process \(pid {os.getpid()}\)"):
            StateLock(tmp_path).acquire()  # exclusive within one process too
    StateLock(tmp_path).acquire().release()  # released on exit from the block

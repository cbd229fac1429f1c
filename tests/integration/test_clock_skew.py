"""The clock-skew matrix for TUF (design section 2): a real `edge-agent update --once` whose wall
clock is faked by libfaketime (a FAKE CLOCK, named as such: the process reads 1970, a day
behind, a day ahead or ten years ahead; durations stay real), against a real repository whose
metadata was signed with the real clock. No stale metadata is accepted past its expiry, a clock
that was never set reads no metadata at all, and every refusal names its reason.

Probation under the same clocks (clamped to `probation_s` across a restart) is in test_probation.py.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

from agent.store.store import Store
from agent.wire.errors import ExitCode
from testkit.agents import Agent, Release
from testkit.env import subprocess_env

CLOCKS = {"1970": "@1970-01-02 00:00:00", "-1 d": "-1d", "+1 d": "+1d", "+10 y": "+3650d"}


def _update_once(agent: Agent, clock: str | None) -> subprocess.CompletedProcess[str]:
    """`edge-agent update --once` on the agent's config, its wall clock faked by libfaketime."""
    faked = ["faketime", "-f", CLOCKS.get(clock, clock)] if clock is not None else []
    return subprocess.run([*faked, sys.executable, "-m", "agent.cli", "update", "--once", "--config",
                           str(agent.config_path)], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)


def _error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("edge-agent: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _metadata_gets(release: Release) -> list[str]:
    with release.faults.lock:
        return [path for path, _ in release.faults.requests if "/metadata/" in path]


def _current(store: Store) -> str | None:
    current = store.current()
    return None if current is None else "/".join(current.parts[-2:])


@pytest.mark.parametrize("clock", list(CLOCKS))
def test_first_boot_under_a_skewed_clock(tiny_raw: Path, release: Release, tmp_path: Path, clock: str) -> None:
    """A device with root.json only."""
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "dev", release)
    proc = _update_once(agent, clock)
    if clock == "-1 d":  # a plausible skew: every expiry is still ahead of it
        assert proc.returncode == 0 and proc.stdout.startswith("installed"), proc.stderr[-3000:]
        assert _current(agent.store) == "tiny/1"
        return
    assert proc.returncode == ExitCode.VERIFICATION_FAILED, proc.stderr[-3000:]
    error = _error(proc)
    if clock == "1970":
        assert "the wall clock reads 1970-01-02" in error and "never set" in error, error
        assert _metadata_gets(release) == []  # judged before anything is fetched
    else:
        assert "ExpiredMetadataError" in error and "the wall clock reads" in error, error
    assert agent.store.current() is None and release.artifact_gets("tiny", 1) == []


@pytest.mark.parametrize("clock", list(CLOCKS))
def test_a_running_device_whose_clock_goes_wrong_keeps_its_model(tiny_raw: Path, release: Release,
                                                                 tmp_path: Path, clock: str) -> None:
    """v1 installed with a right clock; the device restarts with a wrong one and v2 is published."""
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "dev", release)
    assert _update_once(agent, None).returncode == 0
    release.publish(tiny_raw, "tiny", 2, extra_files={"notes.bin": b"v2" * 1000})
    proc = _update_once(agent, clock)
    if clock == "-1 d":
        assert proc.returncode == 0 and proc.stdout.startswith("installed"), proc.stderr[-3000:]
        assert _current(agent.store) == "tiny/2"
        return
    assert proc.returncode == ExitCode.VERIFICATION_FAILED, proc.stderr[-3000:]
    assert ("never set" if clock == "1970" else "ExpiredMetadataError") in _error(proc)
    assert _current(agent.store) == "tiny/1" and release.artifact_gets("tiny", 2) == []


def test_a_clock_before_the_build_of_the_running_model_reads_no_metadata(tiny_raw: Path, release: Release,
                                                                       tmp_path: Path) -> None:
    """Past the agent's own floor, but ten days before the signed build time of the model the
    device already runs: its clock was set wrong, not skewed."""
    release.publish(tiny_raw, "tiny", 1, created_at=dt.datetime.now(dt.UTC))
    agent = Agent(tmp_path / "dev", release)
    assert _update_once(agent, None).returncode == 0
    before = len(_metadata_gets(release))
    proc = _update_once(agent, "-10d")
    assert proc.returncode == ExitCode.VERIFICATION_FAILED, proc.stderr[-3000:]
    assert "before the build of the model it runs" in _error(proc)
    assert len(_metadata_gets(release)) == before and _current(agent.store) == "tiny/1"

"""Crash safety of the real daemon: `edge-agent run` killed with SIGKILL at every journaled
state of the update state machine (the EDGEFLEET_TEST_STOP_AT hook makes the process kill
itself right after journaling that state), and at random byte offsets during a download.

After each kill `current` still points at a complete model; after the restart the store's
invariants hold (`check_invariants()` is empty) and the update either completes or is
cleanly abandoned. Every agent is a real process with real tiny models from a real TUF
repository served over HTTP.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.update.journal import Journal
from agent.update.statemachine import ModelRef, Phase
from agent.update.updater import TEST_STOP_AT_ENV
from testkit.agents import Agent, Release, release_repo

PAD = 2_000_000  # v2's extra file: big enough for a rate-limited download to be killed in


@dataclass
class Scene:
    release: Release
    template: Path  # a state dir with tiny v1 installed and serving (copied per test)
    pad: bytes


@pytest.fixture(scope="module")
def scene(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    root = tmp_path_factory.mktemp("crash")
    pad = os.urandom(PAD)
    with release_repo(root) as release:
        release.publish(tiny_raw, "tiny", 1)  # stable -> v1 for the template
        agent = Agent(root / "template", release)
        agent.start()
        try:
            agent.wait_serving("tiny", 1)
            agent.wait(lambda: agent.phase() is Phase.UP_TO_DATE or (
                agent.phase() is Phase.ACTIVE and agent.store.current() is not None), 60, "v1 installed")
            assert agent.kill(signal.SIGTERM) == 0, agent.log_tail()
        finally:
            agent.stop()
        release.publish(tiny_raw, "tiny", 2, extra_files={"pad.bin": pad})                     # stable
        release.publish(tiny_raw, "tiny", 3, channel="broken", canary_ids=[1, 2, 3, 4, 5, 6])  # signed, wrong canary
        release.set_channel("tiny", 1, channel="same")
        release.publish(tiny_raw, "tiny", 4, channel="toobig", requirements={"min_ram_bytes": 1 << 50})
        yield Scene(release, agent.state_dir, pad)


def _agent(scene: Scene, tmp_path: Path, channel: str, **extra: object) -> Agent:
    return Agent(tmp_path, scene.release, state_from=scene.template, extra={"channel": channel, **extra})


def _killed_at(agent: Agent, phase: Phase) -> None:
    """Start with the stop hook, wait for the self-SIGKILL, check what a crash leaves."""
    agent.start(**{TEST_STOP_AT_ENV: phase.value})
    assert agent.proc is not None
    agent.proc.wait(timeout=120)
    assert agent.proc.returncode == -signal.SIGKILL, agent.log_tail()
    assert f"event=test_stop phase={phase.value}" in agent.log()
    agent.stop()  # its model workers too
    assert agent.phase() is phase
    current = agent.store.current()
    assert current is not None and agent.store.check_model_dir(current, verify_hashes=True) == []


GOOD_UPDATE = [Phase.CHECKING, Phase.DOWNLOADING, Phase.VERIFYING, Phase.INSTALLING, Phase.ACTIVATING, Phase.ACTIVE]


@pytest.mark.parametrize("phase", GOOD_UPDATE, ids=lambda p: p.value)
def test_killed_during_a_good_update_completes_after_restart(scene: Scene, tmp_path: Path, phase: Phase) -> None:
    agent = _agent(scene, tmp_path, "stable")
    try:
        _killed_at(agent, phase)
        agent.start()
        agent.wait_serving("tiny", 2)
        v2 = agent.store.model_dir("tiny", 2).resolve()
        # The restart's own check has run (UP_TO_DATE); then the agent stops, so that the store is read
        # at rest: a journal write in flight (its .tmp file) is not a leftover.
        agent.wait(lambda: agent.store.current() == v2 and agent.phase() is Phase.UP_TO_DATE,
                   60, "v2 current and the restart's check done")
        assert agent.kill(signal.SIGTERM) == 0, agent.log_tail()
        assert agent.store.previous() == agent.store.model_dir("tiny", 1).resolve()
        assert agent.store.check_invariants() == []
        assert list(agent.store.staging_dir.iterdir()) == []  # staging discarded once the update is done
        assert (agent.store.current() / "pad.bin").read_bytes() == scene.pad
    finally:
        agent.stop()


@pytest.mark.parametrize("phase", [Phase.ACTIVATING, Phase.ROLLING_BACK, Phase.FAILED], ids=lambda p: p.value)
def test_killed_during_a_failing_update_is_cleanly_abandoned(scene: Scene, tmp_path: Path, phase: Phase) -> None:
    agent = _agent(scene, tmp_path, "broken")
    try:
        _killed_at(agent, phase)
        agent.start()
        agent.wait_serving("tiny", 1)
        # The restart finishes the rollback, then its own check refuses v3 without downloading it.
        agent.wait(lambda: "is refused until a newer version" in agent.log().split("---- start ----")[-1]
                   and agent.phase() is Phase.FAILED, 60, "v3 refused after the restart")
        state = Journal(agent.store.journal_path).load()
        assert ModelRef(name="tiny", version=3) in state.refused
        assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()
        assert agent.store.check_invariants() == []
        assert agent.chat().status_code == 200
    finally:
        agent.stop()


@pytest.mark.parametrize("channel,phase", [("same", Phase.CHECKING), ("same", Phase.UP_TO_DATE),
                                           ("toobig", Phase.INCOMPATIBLE)], ids=lambda v: getattr(v, "value", v))
def test_killed_in_resting_states_restarts_serving_v1(scene: Scene, tmp_path: Path, channel: str,
                                                      phase: Phase) -> None:
    agent = _agent(scene, tmp_path, channel)
    try:
        _killed_at(agent, phase)
        agent.start()
        agent.wait_serving("tiny", 1)
        want = Phase.UP_TO_DATE if channel == "same" else Phase.INCOMPATIBLE
        agent.wait(lambda: agent.phase() is want, 60, want.value)
        assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()
        assert agent.store.check_invariants() == []
        assert not agent.store.has_model("tiny", 4) and scene.release.artifact_gets("tiny", 4) == []
    finally:
        agent.stop()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_killed_at_random_byte_offsets_during_the_download(scene: Scene, tmp_path: Path) -> None:
    """Rate-limited (500 kB/s) download of v2's 2 MB file, SIGKILLed three times at random sizes of the
    partial file; each restart resumes from where the partial stands, the last one completes."""
    import hashlib

    from agent.update.download import partial_path

    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    # One random offset in each third of the first 1.5 MB, 200 kB apart at least (more than one
    # 100 kB write chunk of the rate-limited downloader), so every kill lands in a new stretch.
    lo, seg = 50_000, (PAD - 550_000) // 3
    offsets = [rng.randrange(lo + k * seg, lo + (k + 1) * seg - 200_000) for k in range(3)]
    # 500 kB/s leaves over a second between the last kill point and the end of the file,
    # so a slow poll on a loaded machine still kills mid-file.
    agent = _agent(scene, tmp_path, "stable", download_rate_limit_bytes_per_s=500_000)
    part = partial_path(agent.store, hashlib.sha256(scene.pad).hexdigest())
    faults = scene.release.faults

    def first_pad_range_since(mark: int) -> str | None:
        """The Range header of the first GET of the file after request number `mark` (the
        module's server is shared: only this test's requests after the mark count)."""
        with faults.lock:
            return next(r for p, r in faults.requests[mark:] if p.endswith("pad.bin"))

    try:
        seen: list[int] = []
        for offset in offsets:
            mark = len(faults.requests)
            agent.start()
            # A kill overshoots its offset by however late the poll sees it; asking for progress
            # past the previous kill too keeps every kill on bytes fetched after a restart.
            target = max(offset, seen[-1] + 50_000) if seen else offset
            agent.wait(lambda: _size(part) >= target, 60, f"partial >= {target}")
            agent.kill(signal.SIGKILL)
            size = part.stat().st_size
            assert size < PAD and (not seen or size > seen[-1])
            # Resumed exactly where the partial stood, never restarted from zero.
            assert first_pad_range_since(mark) == (f"bytes={seen[-1]}-" if seen else None)
            seen.append(size)
            assert agent.phase() is Phase.DOWNLOADING
            assert agent.store.current() == agent.store.model_dir("tiny", 1).resolve()
            assert scene.pad.startswith(part.read_bytes())  # what is kept is a prefix of the real bytes
        mark = len(faults.requests)
        agent.start()
        agent.wait_serving("tiny", 2)
        v2 = agent.store.model_dir("tiny", 2).resolve()
        agent.wait(lambda: agent.store.current() == v2, 60, "v2 current")
        assert agent.store.check_invariants() == []
        assert first_pad_range_since(mark) == f"bytes={seen[-1]}-"
    finally:
        agent.stop()

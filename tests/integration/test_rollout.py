"""`edge-builder rollout` / `rollback` as real processes against a real Mosquitto,
a real signed repository served by the real server, and stand-in devices that
read the channel through the real TUF client (testkit/rollout_standins.py; the
fleet of real agents is in tests/test_rollout_fleet.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.wire.channel import ChannelFile, Rollout, channel_target_path, cohort_bucket
from builder.fleet.rollout import RolloutController, RolloutPlan, utc_now
from builder.fleet.state import RolloutPhase, load_state, save_state
from builder.release.repository import TufRepo
from testkit.artifacts import make_artifact, new_repo, serving
from testkit.brokers import Mosquitto
from testkit.env import subprocess_env
from testkit.rollout_standins import StandIn, StandInFleet
from testkit.waits import wait_until

FLEET = "roll"
N_DEVICES = 10
WAVES = (30, 60, 100)


@dataclass
class Setup:
    repo: TufRepo
    url: str
    broker: Mosquitto
    salt: str
    ids: list[str]

    def wave(self, percent: int) -> set[str]:
        return {d for d in self.ids if cohort_bucket(self.salt, d) < percent}

    def fleet(self, tmp: Path, **kwargs: object) -> StandInFleet:
        devices = [StandIn(d, "stable", "tiny", 1) for d in self.ids]
        devices += [StandIn(f"beta-{i}", "beta", "tiny", 1) for i in range(2)]
        return StandInFleet(self.broker.port, FLEET, self.url, self.repo.metadata_dir / "root.json", tmp / "standins",
                            devices, **kwargs)  # type: ignore[arg-type]


def _pick_salt(ids: list[str]) -> str:
    """A salt whose three waves are non-empty and strictly growing, so every wave has work."""
    for i in range(1000):
        salt = f"t-{i}"
        sizes = [sum(cohort_bucket(salt, d) < p for d in ids) for p in WAVES]
        if 0 < sizes[0] < sizes[1] < sizes[2]:
            return salt
    raise AssertionError("no salt found")


@pytest.fixture
def setup(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Setup]:  # noqa: F811
    repo = new_repo(tmp_path / "repo")
    for v in (1, 2, 3):
        repo.publish(make_artifact(tmp_path / f"art{v}", "tiny", v))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    repo.set_channel(ChannelFile(channel="beta", model="tiny", version=1))
    ids = [f"dev-{i:02d}" for i in range(N_DEVICES)]
    with serving(repo.www_dir) as (url, _faults):
        yield Setup(repo, url, mosquitto, _pick_salt(ids), ids)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "builder.cli", *args]


def _rollout_args(s: Setup, version: int, wait: str = "30s") -> list[str]:
    return _cli("rollout", "stable", "tiny", str(version), "--repo", str(s.repo.dir), "--broker", s.broker.url,
                "--fleet", FLEET, "--waves", ",".join(map(str, WAVES)), "--min-success", "0.95", "--wait", wait,
                "--salt", s.salt, "--json")


def _run(args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=timeout_s)


def _channel(s: Setup) -> ChannelFile | None:
    return TufRepo.load(s.repo.dir).read_channel("stable")


def test_three_waves_complete_then_rollback_cli(setup: Setup, tmp_path: Path) -> None:
    s = setup
    fleet = s.fleet(tmp_path)
    try:
        result = _run(_rollout_args(s, 2))
        assert result.returncode == 0, result.stderr
        state = json.loads(result.stdout)
        assert state["phase"] == "SUCCEEDED"
        # One salt for the whole rollout: each wave judged exactly the devices of its cohort.
        assert [(w["percent"], w["outcome"], w["expected"]) for w in state["history"]] == [
            (p, "passed", len(s.wave(p))) for p in WAVES]
        assert _channel(s) == ChannelFile(channel="stable", model="tiny", version=2,
                                          rollout=Rollout(percent=100, salt=s.salt))
        wait_until(lambda: all(v == 2 for d, v in fleet.versions().items() if d.startswith("dev-")), 10,
                   "every stable device on v2")
        assert {d: v for d, v in fleet.versions().items() if d.startswith("beta-")} == {"beta-0": 1, "beta-1": 1}
        for p in WAVES:
            assert f"({p}%)" in result.stderr
        assert "succeeded" in result.stderr

        # Running it again is a no-op: the saved state says it is done.
        again = _run(_rollout_args(s, 2))
        assert again.returncode == 0 and "already succeeded" in again.stderr

        # The operator changes their mind: rollback signs v1 back with allow_downgrade and rings.
        back = _run(_cli("rollback", "stable", "--repo", str(s.repo.dir), "--broker", s.broker.url,
                         "--fleet", FLEET, "--json"))
        assert back.returncode == 0, back.stderr
        assert json.loads(back.stdout)["phase"] == "ROLLED_BACK"
        assert _channel(s) == ChannelFile(channel="stable", model="tiny", version=1,
                                          rollout=Rollout(percent=100), allow_downgrade=True)
        wait_until(lambda: all(v == 1 for v in fleet.versions().values()), 10, "every device back on v1")
    finally:
        fleet.close()


def test_broken_version_stops_at_first_wave_and_rolls_back(setup: Setup, tmp_path: Path) -> None:
    s = setup
    fleet = s.fleet(tmp_path, broken={2})
    try:
        result = _run(_rollout_args(s, 2))
        assert result.returncode == 1, result.stderr
        state = json.loads(result.stdout)
        assert state["phase"] == "ROLLED_BACK"
        assert [(w["percent"], w["outcome"]) for w in state["history"]] == [(WAVES[0], "failed")]
        assert "canary mismatch" in state["reason"]
        assert _channel(s) == ChannelFile(channel="stable", model="tiny", version=1,
                                          rollout=Rollout(percent=100), allow_downgrade=True)
        attempted = fleet.attempted()
        first = s.wave(WAVES[0])
        assert {d for d, vs in attempted.items() if 2 in vs} <= first
        assert any(2 in attempted[d] for d in first)
        assert all(v == 1 for v in fleet.versions().values())
        assert "rolled back" in result.stderr
    finally:
        fleet.close()


def test_wave_that_never_reports_times_out_and_rolls_back(setup: Setup, tmp_path: Path) -> None:
    s = setup
    fleet = s.fleet(tmp_path, silent=s.wave(WAVES[0]))
    try:
        result = _run(_rollout_args(s, 2, wait="2s"))
        assert result.returncode == 1, result.stderr
        state = json.loads(result.stdout)
        assert state["phase"] == "ROLLED_BACK"
        assert "timed out after 2 s" in state["reason"]
        assert _channel(s).version == 1  # type: ignore[union-attr]
        assert not any(2 in vs for vs in fleet.attempted().values())
    finally:
        fleet.close()


def _in_wave_2(s: Setup) -> bool:
    """The controller has signed wave 2 and saved when it started."""
    st = load_state(s.repo.dir, "stable")
    return st is not None and st.wave_index == 1 and st.wave_started_at is not None


def test_killed_controller_resumes_from_saved_wave(setup: Setup, tmp_path: Path) -> None:
    s = setup
    later = set(s.ids) - s.wave(WAVES[0])
    fleet = s.fleet(tmp_path, paused=set(later))  # wave 1 passes, wave 2 waits on paused devices
    first = subprocess.Popen(_rollout_args(s, 2, wait="60s"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=subprocess_env())
    try:
        wait_until(lambda: _in_wave_2(s), 60, "the controller to sign wave 2")
        # One controller per channel.
        second = _run(_rollout_args(s, 2))
        assert second.returncode == 2 and "another rollout controller" in second.stderr
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        saved = load_state(s.repo.dir, "stable")
        assert saved is not None and saved.phase is RolloutPhase.RUNNING
        targets_version = TufRepo.load(s.repo.dir).targets().version

        # Another version cannot start over it.
        other = _run(_rollout_args(s, 3))
        assert other.returncode == 2 and "under way" in other.stderr

        fleet.paused.clear()
        result = _run(_rollout_args(s, 2, wait="60s"))
        assert result.returncode == 0, result.stderr
        assert "wave 2/3 (60%): resumed" in result.stderr
        assert "wave 1/3" not in result.stderr
        state = load_state(s.repo.dir, "stable")
        assert state is not None and state.phase is RolloutPhase.SUCCEEDED
        # Wave 1 was not redone, and wave 2 kept its signing time (its wait counts from then).
        assert state.history[0] == saved.history[0]
        assert state.history[1].started_at == saved.wave_started_at
        # Wave 2's file was not signed again: only the 100% wave added a targets version.
        assert TufRepo.load(s.repo.dir).targets().version == targets_version + 1
        wait_until(lambda: all(v == 2 for d, v in fleet.versions().items() if d.startswith("dev-")), 10,
                   "every stable device on v2")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        if first.stderr:
            first.stderr.close()
        fleet.close()


def test_rollback_while_controller_runs_stops_it(setup: Setup, tmp_path: Path) -> None:
    s = setup
    fleet = s.fleet(tmp_path, paused=set(s.ids) - s.wave(WAVES[0]))
    controller = subprocess.Popen(_rollout_args(s, 2, wait="60s"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=subprocess_env())
    try:
        wait_until(lambda: _in_wave_2(s), 60, "the controller to sign wave 2")
        back = _run(_cli("rollback", "stable", "--repo", str(s.repo.dir), "--broker", s.broker.url, "--fleet", FLEET))
        assert back.returncode == 0, back.stderr
        _out, err = controller.communicate(timeout=30)
        assert controller.returncode == 1 and "changed under this controller" in err, err
        assert _channel(s) == ChannelFile(channel="stable", model="tiny", version=1,
                                          rollout=Rollout(percent=100), allow_downgrade=True)
        state = load_state(s.repo.dir, "stable")
        assert state is not None and state.phase is RolloutPhase.ROLLED_BACK and state.reason == "operator rollback"
        wait_until(lambda: all(v == 1 for v in fleet.versions().values()), 10, "wave 1 devices back on v1")
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.communicate(timeout=10)
        fleet.close()


def test_restart_in_rolling_back_finishes_the_rollback(setup: Setup, tmp_path: Path) -> None:
    """The journal a controller killed right after deciding to roll back leaves behind."""
    s = setup
    controller = RolloutController(s.repo.dir, None)
    state = controller.begin(RolloutPlan(channel="stable", model="tiny", version=2, waves=list(WAVES),
                                         min_success=0.95, wait_s=30, salt=s.salt))
    s.repo.set_channel(state.wave_channel())  # wave 1 was signed ...
    save_state(s.repo.dir, state.model_copy(update={"phase": RolloutPhase.ROLLING_BACK,  # ... then it failed
                                                    "reason": "wave 1/3 (30%) failed: test"}), utc_now())
    result = _run(_rollout_args(s, 2))
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["phase"] == "ROLLED_BACK"
    assert _channel(s) == ChannelFile(channel="stable", model="tiny", version=1,
                                      rollout=Rollout(percent=100), allow_downgrade=True)
    assert "rolled back" in result.stderr and "wave 1/3 (30%): signed" not in result.stderr


def test_restart_after_a_kill_inside_the_signing_finishes_it(setup: Setup, tmp_path: Path) -> None:
    """A controller killed inside `set_channel`, after targets.json and before snapshot/timestamp:
    the wave's channel file is in the targets but devices cannot see it yet."""
    s = setup
    controller = RolloutController(s.repo.dir, None)
    state = controller.begin(RolloutPlan(channel="stable", model="tiny", version=2, waves=list(WAVES),
                                         min_success=0.95, wait_s=30, salt=s.salt))
    wanted = state.wave_channel()
    info = s.repo._store_target_bytes(channel_target_path("stable"), wanted.model_dump_json(indent=2).encode())
    with s.repo.edit_targets() as targets:  # the first half of set_channel, as the kill left it
        targets.targets[info.path] = info
    assert TufRepo.load(s.repo.dir).read_channel("stable") == wanted
    fleet = s.fleet(tmp_path)
    try:
        result = _run(_rollout_args(s, 2, wait="20s"))
        assert result.returncode == 0, result.stderr
        wait_until(lambda: all(v == 2 for d, v in fleet.versions().items() if d.startswith("dev-")), 10,
                   "every stable device on v2")
    finally:
        fleet.close()


def test_usage_errors_are_one_line(setup: Setup) -> None:
    s = setup
    cases = [
        (_cli("rollout", "stable", "tiny", "2", "--repo", str(s.repo.dir), "--broker", s.broker.url,
              "--waves", "50,20"), "strictly increase"),
        (_cli("rollout", "stable", "tiny", "2", "--repo", str(s.repo.dir), "--broker", s.broker.url,
              "--wait", "soon"), "duration 'soon'"),
        (_cli("rollout", "stable", "tiny", "2", "--repo", str(s.repo.dir)), "no broker"),
        (_cli("rollback", "beta", "--repo", str(s.repo.dir)), "no rollout state for channel beta"),
    ]
    for args, needle in cases:
        result = _run(args)
        assert result.returncode == 2, (args, result.stderr)
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    missing = _run(_cli("rollout", "stable", "tiny", "9", "--repo", str(s.repo.dir), "--broker", s.broker.url))
    assert missing.returncode == 1 and "tiny v9 is not published" in missing.stderr
    assert load_state(s.repo.dir, "stable") is None  # nothing was started
    assert _channel(s).version == 1  # type: ignore[union-attr]

"""Staged rollouts across a fleet of real `edge-agent run` processes (20, each with its
own state dir, device id and API port) against a real Mosquitto and the real repository
server, with tiny random-weight INT4 models built once per session (testkit/fleet.py).

The agents poll rarely (1 h): what moves them is the doorbell `rollout` rings.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.update.journal import Journal
from agent.update.statemachine import ModelRef
from agent.wire.channel import ChannelFile, Rollout, cohort_bucket
from agent.wire.errors import JournalError
from agent.wire.mqtt import all_devices_topic
from builder.fleet.state import RolloutPhase, load_state
from builder.release.repository import TufRepo
from testkit.artifacts import new_repo, serving
from testkit.brokers import Mosquitto, Recorder
from testkit.env import subprocess_env
from testkit.fleet import Fleet, make_fleet, make_fleet_artifact, retained_statuses, status_summary, tiny_int4_build
from testkit.waits import wait_until

pytestmark = pytest.mark.slow

FLEET = "fleet"
N_AGENTS = 12  # enough for three waves of distinct sizes (the salt is picked for it); each agent costs a model load
WAVES = (10, 50, 100)
SETTLE_S = 240.0


@pytest.fixture(scope="session")
def tiny_builds(model_cache_dir: Path, smollm2_hf_dir: Path) -> tuple[Path, Path]:
    return tiny_int4_build(model_cache_dir, smollm2_hf_dir, 1), tiny_int4_build(model_cache_dir, smollm2_hf_dir, 2)


@dataclass
class Env:
    repo: TufRepo
    url: str
    broker: Mosquitto
    fleet: Fleet
    recorder: Recorder
    requests: list[tuple[str, str | None]]
    salt: str

    @property
    def ids(self) -> list[str]:
        return [a.device_id for a in self.fleet.agents]

    def wave(self, percent: int) -> set[str]:
        return {d for d in self.ids if cohort_bucket(self.salt, d) < percent}

    def statuses(self) -> dict[str, dict[str, object]]:
        with self.recorder._cond:
            return retained_statuses(list(self.recorder.messages))

    def wait_all_on(self, version: int, timeout_s: float = SETTLE_S) -> None:
        def done() -> bool:
            st = self.statuses()
            dead = self.fleet.dead()
            if dead:
                raise AssertionError(f"agents exited: {dead}\n{self.fleet.log_tail(dead[0])}")
            return len(st) == N_AGENTS and all(
                s["online"] and s["version"] == version and s["state"] in ("ACTIVE", "UP_TO_DATE") for s in st.values())
        try:
            wait_until(done, timeout_s, f"all {N_AGENTS} agents on v{version}", interval_s=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}: {status_summary(self.statuses())}") from None

    def events(self) -> list[dict[str, object]]:
        with self.recorder._cond:
            return [json.loads(m.payload) for m in self.recorder.messages if m.topic.endswith("/events")]


def _pick_salt(ids: list[str]) -> str:
    for i in range(1000):
        salt = f"f-{i}"
        sizes = [sum(cohort_bucket(salt, d) < p for d in ids) for p in WAVES]
        if 2 <= sizes[0] < sizes[1] < sizes[2]:
            return salt
    raise AssertionError("no salt found")


def _env(tmp_path: Path, broker: Mosquitto, builds: tuple[Path, Path], *, v2_broken: bool) -> Iterator[Env]:
    repo = new_repo(tmp_path / "repo")
    repo.publish(make_fleet_artifact(builds[0], tmp_path / "art1", "tiny", 1))
    repo.publish(make_fleet_artifact(builds[1], tmp_path / "art2", "tiny", 2, is_broken=v2_broken))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    recorder = Recorder(broker.port, [all_devices_topic(FLEET, "status"), all_devices_topic(FLEET, "events")])
    with serving(repo.www_dir) as (url, faults):
        # A switch's probation defers the next check (60 s by default): v1's would hold the rollout
        # back that long. Probation is tests/integration/test_probation.py's subject, not this one's.
        fleet = make_fleet(tmp_path / "devices", repo, url, broker.url, FLEET, N_AGENTS, probation_s=5.0)
        fleet.start()
        try:
            salt = _pick_salt([a.device_id for a in fleet.agents])
            env = Env(repo, url, broker, fleet, recorder, faults.requests, salt)
            env.wait_all_on(1)
            yield env
        finally:
            fleet.close()
            recorder.close()


@pytest.fixture
def good_env(tmp_path: Path, mosquitto: Mosquitto, tiny_builds: tuple[Path, Path]) -> Iterator[Env]:  # noqa: F811
    yield from _env(tmp_path, mosquitto, tiny_builds, v2_broken=False)


@pytest.fixture
def broken_env(tmp_path: Path, mosquitto: Mosquitto, tiny_builds: tuple[Path, Path]) -> Iterator[Env]:  # noqa: F811
    yield from _env(tmp_path, mosquitto, tiny_builds, v2_broken=True)


def _rollout_args(env: Env) -> list[str]:
    return [sys.executable, "-m", "builder.cli", "rollout", "stable", "tiny", "2", "--repo", str(env.repo.dir),
            "--broker", env.broker.url, "--fleet", FLEET, "--waves", ",".join(map(str, WAVES)),
            "--min-success", "0.95", "--wait", "3m", "--salt", env.salt, "--json"]


def _took_up_v2(state_dir: Path) -> bool:
    """The device began on v2: its journal names it, or its store holds v2's model dir."""
    if (state_dir / "models" / "tiny" / "2").exists():
        return True
    try:
        state = Journal(state_dir / "state.json").load()
    except JournalError:
        return False
    return ModelRef(name="tiny", version=2) in (state.target, state.active)


def _current_version(state_dir: Path) -> int | None:
    current = state_dir / "current"
    if not current.exists():
        return None
    return int(json.loads((current / "manifest.json").read_text())["version"])


def test_three_wave_rollout_across_real_agents_survives_a_controller_kill(good_env: Env) -> None:
    env = good_env
    first = subprocess.Popen(_rollout_args(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=subprocess_env())
    # Seen on the devices themselves while wave 1 runs (the controller saves wave_index 1 before
    # it signs wave 2): which ones took up v2, from their journals and stores.
    took_up_v2_in_wave_1: set[str] = set()
    try:
        def past_wave_1() -> bool:
            st = load_state(env.repo.dir, "stable")
            if st is None or st.wave_index == 0:
                took_up_v2_in_wave_1.update(a.device_id for a in env.fleet.agents if _took_up_v2(a.state_dir))
            return st is not None and st.wave_index >= 1
        wait_until(past_wave_1, SETTLE_S, "the first wave to pass", interval_s=0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    saved = load_state(env.repo.dir, "stable")
    assert saved is not None and saved.phase is RolloutPhase.RUNNING and saved.history[0].outcome == "passed"
    # Wave 1 had exactly its cohort; nobody outside it had started on v2 while it ran.
    assert saved.history[0].expected == len(env.wave(WAVES[0]))
    assert took_up_v2_in_wave_1 and took_up_v2_in_wave_1 <= env.wave(WAVES[0]), took_up_v2_in_wave_1

    result = subprocess.run(_rollout_args(env), capture_output=True, text=True, env=subprocess_env(),
                            timeout=SETTLE_S * 2)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["phase"] == "SUCCEEDED"
    assert state["history"][0] == json.loads(saved.history[0].model_dump_json())  # not redone
    assert [(w["percent"], w["outcome"]) for w in state["history"]] == [(p, "passed") for p in WAVES]
    assert f"resuming the rollout of tiny v2 on stable at wave 2/3 ({WAVES[1]}%)" in result.stderr
    env.wait_all_on(2, timeout_s=60)
    assert {a.device_id: _current_version(a.state_dir) for a in env.fleet.agents} == {d: 2 for d in env.ids}
    assert TufRepo.load(env.repo.dir).read_channel("stable") == ChannelFile(
        channel="stable", model="tiny", version=2, rollout=Rollout(percent=100, salt=env.salt))


def test_broken_version_stops_at_first_wave_and_only_that_wave_downloads_it(broken_env: Env) -> None:
    env = broken_env
    v2_data_sha = TufRepo.load(env.repo.dir).targets().targets["models/tiny/2/model.onnx.data"].hashes["sha256"]
    result = subprocess.run(_rollout_args(env), capture_output=True, text=True, env=subprocess_env(),
                            timeout=SETTLE_S * 2)
    assert result.returncode == 1, result.stderr
    state = json.loads(result.stdout)
    assert state["phase"] == "ROLLED_BACK"
    assert [(w["percent"], w["outcome"]) for w in state["history"]] == [(WAVES[0], "failed")]
    assert TufRepo.load(env.repo.dir).read_channel("stable") == ChannelFile(
        channel="stable", model="tiny", version=1, rollout=Rollout(percent=100), allow_downgrade=True)
    env.wait_all_on(1, timeout_s=60)

    first_wave = env.wave(WAVES[0])
    downloaders = {str(e["device_id"]) for e in env.events()
                   if e.get("to_state") == "DOWNLOADING" and e.get("version") == 2}
    assert downloaders and downloaders <= first_wave, (downloaders, first_wave)
    # The server saw v2's weights fetched at most once per first-wave device (a resumed
    # download adds Range requests, which fetch the rest of the same file).
    full_gets = [p for p, rng in env.requests if v2_data_sha in p and rng is None]
    assert 1 <= len(full_gets) <= len(first_wave), full_gets
    for a in env.fleet.agents:
        assert _current_version(a.state_dir) == 1, a.device_id
        if a.device_id not in first_wave:
            assert not (a.state_dir / "models" / "tiny" / "2").exists()
            assert not (a.state_dir / "blobs" / "sha256" / v2_data_sha).exists()

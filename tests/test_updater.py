"""The update driver over a real store and real files: every state to ACTIVE, failures to FAILED
with the previous model serving, refused versions, restart recovery after SIGKILL at each state.

TEST DOUBLES (named as such): `LocalDirChecker` and `LocalDirDownloader` stand in for the TUF
client and the resumable network downloader (the trust helper builds those); they read an
artifact tree from local disk laid out like the TUF targets. `ConfigParsingActivator` stands in
for the serving layer's load + canary: it parses `genai_config.json` and fails when it does not
parse, the way a real load fails on such a file. The store, the journal, the state machine and
the driver are the real ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.channel import ChannelFile
from agent.errors import ActivationError, JournalError, VerificationError
from agent.hardware import probe
from agent.journal import Journal
from agent.manifest import MANIFEST_FILENAME, Manifest
from agent.statemachine import MAX_STORE_COUNT, Event, EventKind, ModelRef, Phase, UpdateState
from agent.store import Store
from agent.update_check import CheckResult, decide_check
from agent.updater import TEST_STOP_AT_ENV, Transition, Updater
from tests.conftest import subprocess_env
from tests.storekit import manifest_for, model_files, publish_channel, write_artifact

SHARED = b"tokenizer-json" * 64
DEVICE_ID = "dev-1"
P = Phase


class LocalDirChecker:
    """TEST DOUBLE for the TUF checker: reads channels/ and models/ of a local artifact tree."""

    def __init__(self, repo: Path, store: Store, channel: str = "stable", disk_cap_bytes: int | None = None) -> None:
        self.repo, self.store, self.channel, self.disk_cap_bytes = repo, store, channel, disk_cap_bytes

    def check(self, active: ModelRef | None) -> CheckResult:
        channel = ChannelFile.model_validate_json((self.repo / "channels" / f"{self.channel}.json").read_bytes())

        def load(ref: ModelRef) -> Manifest:
            return Manifest.model_validate_json(
                (self.repo / "models" / ref.name / str(ref.version) / MANIFEST_FILENAME).read_bytes())

        return decide_check(channel, active, DEVICE_ID, load, probe(self.store.root), self.disk_cap_bytes, self.store)


class LocalDirDownloader:
    """TEST DOUBLE for the resumable TUF downloader: copies from a local artifact tree into staging."""

    def __init__(self, repo: Path, store: Store) -> None:
        self.repo, self.store = repo, store
        self.fetched: list[str] = []  # file paths copied, for "a shared file is fetched once"

    def _manifest(self, target: ModelRef) -> tuple[Path, bytes, Manifest]:
        src = self.repo / "models" / target.name / str(target.version)
        data = (src / MANIFEST_FILENAME).read_bytes()
        return src, data, Manifest.model_validate_json(data)

    def _part(self, sha256: str) -> Path:
        return self.store.staging_file(f"{sha256}.part")

    def download(self, target: ModelRef) -> None:
        src, _, manifest = self._manifest(target)
        for f in manifest.files:
            if not self.store.has_blob(f.sha256) and not self._part(f.sha256).is_file():
                shutil.copyfile(src / f.path, self._part(f.sha256))
                self.fetched.append(f"{target.name}/{target.version}/{f.path}")

    def verify(self, target: ModelRef) -> bytes:
        _, data, manifest = self._manifest(target)
        for f in manifest.files:
            if self.store.has_blob(f.sha256):
                continue
            part = self._part(f.sha256)
            digest = hashlib.sha256(part.read_bytes()).hexdigest()
            if digest != f.sha256:
                part.unlink()
                raise VerificationError(f"{target}: {f.path} has sha256 {digest[:12]}, expected {f.sha256[:12]}")
            self.store.adopt_blob(part, f.sha256)
        return data

    def discard(self, target: ModelRef) -> None:
        _, _, manifest = self._manifest(target)
        for f in manifest.files:
            self._part(f.sha256).unlink(missing_ok=True)


class ConfigParsingActivator:
    """TEST DOUBLE for the serving layer: "loads" by parsing genai_config.json; records what serves."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.serving: list[Path | None] = []
        self.journal_phase_at_activate: list[Phase] = []

    def activate(self, model_dir: Path, manifest: Manifest) -> None:
        self.journal_phase_at_activate.append(Journal(self.store.journal_path).load().phase)
        try:
            json.loads((model_dir / "genai_config.json").read_text())
        except ValueError as e:
            raise ActivationError(f"{manifest.name} v{manifest.version}: genai_config.json does not load: {e}") from e

    def serve(self, model_dir: Path | None) -> None:
        self.serving.append(model_dir)


class ListSink:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.transitions: list[Transition] = []
        self.usage_bytes: list[int] = []  # store usage at each transition

    def publish(self, transition: Transition) -> None:
        self.transitions.append(transition)
        self.usage_bytes.append(self.store.disk_usage_bytes())

    def phases(self) -> list[Phase]:
        return [t.to_phase for t in self.transitions]


def make_updater(repo: Path, state_dir: Path, disk_cap_bytes: int | None = None) -> Updater:
    store = Store(state_dir)
    return Updater(store, checker=LocalDirChecker(repo, store, disk_cap_bytes=disk_cap_bytes),
                   downloader=LocalDirDownloader(repo, store), activator=ConfigParsingActivator(store),
                   sink=ListSink(store), disk_cap_bytes=disk_cap_bytes)


def publish(repo: Path, version: int, *, broken_config: bool = False, **req: object) -> Manifest:
    files = model_files(version, shared=SHARED)
    if broken_config:
        files["genai_config.json"] = b'{"model": {"type": '  # signed fine, fails to load
    manifest = manifest_for("m", version, files, **req)
    write_artifact(repo, manifest, files)
    publish_channel(repo, "stable", "m", version)
    return manifest


UPDATE_PHASES = [P.CHECKING, P.DOWNLOADING, P.VERIFYING, P.INSTALLING, P.ACTIVATING, P.ACTIVE]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def updater(repo: Path, tmp_path: Path) -> Updater:
    u = make_updater(repo, tmp_path / "state")
    u.start()
    return u


def _sink(u: Updater) -> ListSink:
    assert isinstance(u.sink, ListSink)
    return u.sink


def _activator(u: Updater) -> ConfigParsingActivator:
    assert isinstance(u.activator, ConfigParsingActivator)
    return u.activator


def test_update_runs_through_every_state_to_active(updater: Updater, repo: Path) -> None:
    store = updater.store
    publish(repo, 1)
    state = updater.check_now()
    assert state.phase is P.ACTIVE and state.active == ModelRef(name="m", version=1)
    assert _sink(updater).phases() == UPDATE_PHASES
    assert store.current() == store.model_dir("m", 1).resolve() and store.previous() is None
    assert Journal(store.journal_path).load() == state  # what the journal says is what the driver holds
    # The journal named ACTIVATING before the canary ran.
    assert _activator(updater).journal_phase_at_activate == [P.ACTIVATING]
    assert _activator(updater).serving[-1] == store.current()

    publish(repo, 2)
    _sink(updater).transitions.clear()
    state = updater.check_now()
    assert state.phase is P.ACTIVE and state.active == ModelRef(name="m", version=2)
    assert [(t.from_phase, t.to_phase) for t in _sink(updater).transitions] == list(
        zip([P.ACTIVE, *UPDATE_PHASES[:-1]], UPDATE_PHASES, strict=True))
    assert (store.current(), store.previous()) == (store.model_dir("m", 2).resolve(), store.model_dir("m", 1).resolve())
    downloader = updater.downloader
    assert isinstance(downloader, LocalDirDownloader)
    assert [p for p in downloader.fetched if p.endswith("tokenizer.json")] == ["m/1/tokenizer.json"]  # fetched once
    assert list(store.staging_dir.iterdir()) == []  # the finished update left no work behind
    assert store.check_invariants() == []

    state = updater.check_now()
    assert state.phase is P.UP_TO_DATE and state.store_count == 2


def test_broken_artifact_rolls_back_and_is_refused_until_a_newer_one(updater: Updater, repo: Path) -> None:
    store = updater.store
    publish(repo, 1)
    updater.check_now()
    v1 = store.model_dir("m", 1).resolve()
    publish(repo, 2, broken_config=True)
    state = updater.check_now()
    assert state.phase is P.FAILED and state.refused == (ModelRef(name="m", version=2),)
    assert "ACTIVATING m v2 failed: m v2: genai_config.json does not load" in (state.reason or "")
    assert _sink(updater).phases()[-3:] == [P.ACTIVATING, P.ROLLING_BACK, P.FAILED]
    assert store.current() == v1  # the old model never stopped being current
    serving = _activator(updater).serving
    assert set(serving[serving.index(v1):]) == {v1}
    assert store.check_invariants() == []

    # The same version again: refused without a download.
    downloader = updater.downloader
    assert isinstance(downloader, LocalDirDownloader)
    fetched = len(downloader.fetched)
    state = updater.check_now()
    assert state.phase is P.FAILED and "refused until a newer version of m is published" in (state.reason or "")
    assert len(downloader.fetched) == fetched and _sink(updater).phases()[-2:] == [P.CHECKING, P.FAILED]

    publish(repo, 3)
    state = updater.check_now()
    assert state.phase is P.ACTIVE and state.refused == () and store.current() == store.model_dir("m", 3).resolve()


def test_probation_failure_rolls_back_to_previous(updater: Updater, repo: Path) -> None:
    store = updater.store
    publish(repo, 1)
    updater.check_now()
    publish(repo, 2)
    updater.check_now()
    state = updater.handle(Event(kind=EventKind.PROBATION_FAILED, reason="model worker exited with -11 after 3 s"))
    assert state.phase is P.FAILED and state.active == ModelRef(name="m", version=1)
    assert store.current() == store.model_dir("m", 1).resolve() and store.previous() is None
    assert _activator(updater).serving[-1] == store.current()
    assert ModelRef(name="m", version=2) in state.refused


def test_first_install_failing_leaves_no_current(updater: Updater, repo: Path) -> None:
    publish(repo, 1, broken_config=True)
    state = updater.check_now()
    assert state.phase is P.FAILED and updater.store.current() is None
    assert updater.store.check_invariants() == []


def test_tampered_file_fails_verification_and_is_not_refused(updater: Updater, repo: Path) -> None:
    store = updater.store
    publish(repo, 1)
    updater.check_now()
    publish(repo, 2)
    (repo / "models/m/2/model.onnx.data").write_bytes(b"evil" * 1024)  # same size, other bytes
    state = updater.check_now()
    assert state.phase is P.FAILED and "VERIFYING m v2 failed" in (state.reason or "") and state.refused == ()
    assert store.current() == store.model_dir("m", 1).resolve() and not store.has_model("m", 2)
    assert list(store.staging_dir.iterdir()) == []
    assert store.check_invariants() == []


@pytest.mark.parametrize(("req", "reason"), [
    ({"arch": ["riscv64"]}, "is built for riscv64"),
    ({"min_ram_bytes": 1 << 50}, "GiB RAM, this device has"),
    ({"min_onnxruntime_genai_version": "9.0"}, "needs onnxruntime-genai 9.0 or later, this device has 0.18.0"),
])
def test_incompatible_model_is_refused_before_download(updater: Updater, repo: Path, req: dict[str, object],
                                                       reason: str) -> None:
    publish(repo, 1, **req)
    state = updater.check_now()
    assert state.phase is P.INCOMPATIBLE and reason in (state.reason or "")
    assert (state.reason or "").startswith("model m v1 ")
    downloader = updater.downloader
    assert isinstance(downloader, LocalDirDownloader) and downloader.fetched == []
    assert list(updater.store.blobs_dir.iterdir()) == []


def test_downgrade_needs_the_signed_flag(updater: Updater, repo: Path) -> None:
    publish(repo, 1)
    publish(repo, 2)
    updater.check_now()
    publish_channel(repo, "stable", "m", 1)
    state = updater.check_now()
    assert state.phase is P.UP_TO_DATE and "without allow_downgrade" in (state.reason or "")
    publish_channel(repo, "stable", "m", 1, allow_downgrade=True)
    state = updater.check_now()
    assert state.phase is P.ACTIVE and state.active == ModelRef(name="m", version=1)


def test_disk_cap_holds_at_every_transition_and_gc_keeps_the_newest(repo: Path, tmp_path: Path) -> None:
    cap = 24_000  # room for three of these small models at once (current, previous, new), not four
    u = make_updater(repo, tmp_path / "state", disk_cap_bytes=cap)
    u.start()
    for v in range(1, 5):
        publish(repo, v)
        assert u.check_now().phase is P.ACTIVE, u.state.reason
    assert [v for v in range(1, 5) if u.store.has_model("m", v)] == [2, 3, 4]
    assert max(_sink(u).usage_bytes) <= cap and u.store.disk_usage_bytes() <= cap
    assert u.store.check_invariants() == []


def test_model_that_cannot_fit_next_to_current_and_previous_is_incompatible(repo: Path, tmp_path: Path) -> None:
    cap = 16_000  # two models fit, a third next to them does not
    u = make_updater(repo, tmp_path / "state", disk_cap_bytes=cap)
    u.start()
    for v in (1, 2):
        publish(repo, v)
        assert u.check_now().phase is P.ACTIVE
    publish(repo, 3)
    state = u.check_now()
    assert state.phase is P.INCOMPATIBLE
    assert (state.reason or "").startswith("model m v3 needs ") and "under its cap of 15.6 KiB" in (state.reason or "")
    downloader = u.downloader
    assert isinstance(downloader, LocalDirDownloader) and not any(p.startswith("m/3/") for p in downloader.fetched)
    assert u.store.current() == u.store.model_dir("m", 2).resolve() and max(_sink(u).usage_bytes) <= cap


def test_download_refuses_to_break_the_cap_even_if_the_checker_did_not_look(repo: Path, tmp_path: Path) -> None:
    cap = 16_000
    u = make_updater(repo, tmp_path / "state", disk_cap_bytes=cap)
    assert isinstance(u.checker, LocalDirChecker)
    u.checker.disk_cap_bytes = None  # a checker that only checks the hardware
    u.start()
    for v in (1, 2, 3):
        publish(repo, v)
        state = u.check_now()
    assert state.phase is P.FAILED and "DOWNLOADING m v3 failed: m v3 needs" in (state.reason or "")
    assert state.refused == ()  # a full disk is no reason to refuse the version
    downloader = u.downloader
    assert isinstance(downloader, LocalDirDownloader) and not any(p.startswith("m/3/") for p in downloader.fetched)
    assert max(_sink(u).usage_bytes) <= cap and u.store.check_invariants() == []


def test_restart_loop_past_the_store_count_abandons_the_update(updater: Updater, repo: Path) -> None:
    publish(repo, 1)
    updater.check_now()
    publish(repo, 2)
    store = updater.store
    # As if the agent had died in ACTIVATING over and over: the journal holds the last count.
    Journal(store.journal_path).save(UpdateState(phase=P.ACTIVATING, target=ModelRef(name="m", version=2),
                                                 active=ModelRef(name="m", version=1),
                                                 store_count=MAX_STORE_COUNT))
    again = make_updater(repo, store.root)
    state = again.start()
    assert state.phase is P.FAILED and f"bound {MAX_STORE_COUNT}" in (state.reason or "")
    assert store.current() == store.model_dir("m", 1).resolve()
    assert _activator(again).journal_phase_at_activate == []  # the looping step did not run again


def test_corrupt_journal_stops_start_with_a_clear_error(repo: Path, tmp_path: Path) -> None:
    u = make_updater(repo, tmp_path / "state")
    u.store.ensure_layout()
    u.store.journal_path.write_text('{"schema_version": 1, "state": {"phase": "DOWNLOADING", "store_count": -1}')
    with pytest.raises(JournalError, match="move it aside"):
        u.start()


# -- crash recovery: a real process killed by the test hook at each journaled state ----------------
_AGENT = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from tests.test_updater import make_updater
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
    assert _activator(u).serving[-1] == v2
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

    from agent.updater import TEST_STOP_SIGNAL_ENV

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

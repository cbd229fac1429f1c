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

import datetime as dt
from pathlib import Path

import pytest

from agent.update.journal import Journal, JournalRecord
from agent.update.statemachine import MAX_STORE_COUNT, Event, EventKind, ModelRef, Phase, UpdateState
from agent.update.updater import Updater
from agent.wire.errors import JournalError
from testkit.store import publish_channel
from testkit.updater import (
    UPDATE_PHASES,
    LocalDirChecker,
    LocalDirDownloader,
    activator_of,
    make_updater,
    publish,
    sink_of,
)

P = Phase


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def updater(repo: Path, tmp_path: Path) -> Updater:
    u = make_updater(repo, tmp_path / "state")
    u.start()
    return u


def test_update_runs_through_every_state_to_active(updater: Updater, repo: Path) -> None:
    store = updater.store
    publish(repo, 1)
    state = updater.check_now()
    assert state.phase is P.ACTIVE and state.active == ModelRef(name="m", version=1)
    assert sink_of(updater).phases() == UPDATE_PHASES
    assert store.current() == store.model_dir("m", 1).resolve() and store.previous() is None
    assert Journal(store.journal_path).load() == state  # what the journal says is what the driver holds
    # The journal named ACTIVATING before the canary ran.
    assert activator_of(updater).journal_phase_at_activate == [P.ACTIVATING]
    assert activator_of(updater).serving[-1] == store.current()

    publish(repo, 2)
    sink_of(updater).transitions.clear()
    state = updater.check_now()
    assert state.phase is P.ACTIVE and state.active == ModelRef(name="m", version=2)
    assert [(t.from_phase, t.to_phase) for t in sink_of(updater).transitions] == list(
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
    assert sink_of(updater).phases()[-3:] == [P.ACTIVATING, P.ROLLING_BACK, P.FAILED]
    assert store.current() == v1  # the old model never stopped being current
    serving = activator_of(updater).serving
    assert set(serving[serving.index(v1):]) == {v1}
    assert store.check_invariants() == []

    # The same version again: refused without a download.
    downloader = updater.downloader
    assert isinstance(downloader, LocalDirDownloader)
    fetched = len(downloader.fetched)
    state = updater.check_now()
    assert state.phase is P.FAILED and "refused until a newer version of m is published" in (state.reason or "")
    assert len(downloader.fetched) == fetched and sink_of(updater).phases()[-2:] == [P.CHECKING, P.FAILED]

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
    assert activator_of(updater).serving[-1] == store.current()
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
    assert max(sink_of(u).usage_bytes) <= cap and u.store.disk_usage_bytes() <= cap
    assert u.store.check_invariants() == []


@pytest.mark.parametrize("cap", range(14_000, 32_001, 1_000))
def test_no_transition_ever_exceeds_the_cap_whatever_it_is(repo: Path, tmp_path: Path, cap: int) -> None:
    """Four versions of ~6 KB each under caps from "one fits" to "all four fit": each is installed or
    declined, and disk use stays under the cap at every transition (staged manifests included)."""
    u = make_updater(repo, tmp_path / "state", disk_cap_bytes=cap)
    u.start()
    for v in range(1, 5):
        publish(repo, v)
        assert u.check_now().phase in (P.ACTIVE, P.INCOMPATIBLE, P.FAILED), u.state.reason
    assert max(sink_of(u).usage_bytes) <= cap and u.store.disk_usage_bytes() <= cap
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
    assert u.store.current() == u.store.model_dir("m", 2).resolve() and max(sink_of(u).usage_bytes) <= cap


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
    assert max(sink_of(u).usage_bytes) <= cap and u.store.check_invariants() == []


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
    assert activator_of(again).journal_phase_at_activate == []  # the looping step did not run again


def test_corrupt_journal_stops_start_with_a_clear_error(repo: Path, tmp_path: Path) -> None:
    u = make_updater(repo, tmp_path / "state")
    u.store.ensure_layout()
    u.store.journal_path.write_text('{"schema_version": 1, "state": {"phase": "DOWNLOADING", "store_count": -1}')
    with pytest.raises(JournalError, match="move it aside"):
        u.start()




class JournalThatFailsOnce(Journal):
    """TEST DOUBLE (named as such): the real journal, whose save of one phase fails once as on
    a full disk. The real full disk, through the daemon, is in tests/integration/test_disk_full.py."""

    def __init__(self, path: Path, fail_at: Phase) -> None:
        super().__init__(path)
        self.fail_at: Phase | None = fail_at

    def save(self, state: UpdateState, now: dt.datetime | None = None) -> JournalRecord:
        if state.phase is self.fail_at:
            self.fail_at = None
            raise JournalError(f"cannot write the update journal {self.path}: [Errno 28] No space left on device")
        return super().save(state, now)


@pytest.mark.parametrize("fail_at", [*UPDATE_PHASES[1:], P.ROLLING_BACK], ids=lambda p: p.value)
def test_a_pass_cut_short_by_the_journal_resumes_at_the_next_check(repo: Path, tmp_path: Path, fail_at: Phase) -> None:
    """Without the resume the phase left in progress coalesced every later check: no update ever again."""
    u = make_updater(repo, tmp_path / "state")
    u.start()
    publish(repo, 1)
    assert u.check_now().phase is P.ACTIVE
    publish(repo, 2, broken_config=fail_at is P.ROLLING_BACK)  # a broken v2 reaches ROLLING_BACK
    u.journal = JournalThatFailsOnce(u.store.journal_path, fail_at)
    saved_before = Journal(u.store.journal_path).load()
    with pytest.raises(JournalError, match="No space left"):
        u.check_now()
    assert Journal(u.store.journal_path).load().phase is not fail_at  # nothing past the last saved state
    assert saved_before.phase is P.ACTIVE and u.store.current() == u.store.model_dir("m", 1).resolve()

    state = u.check_now()  # the disk has room again
    if fail_at is P.ROLLING_BACK:
        assert state.phase is P.FAILED and ModelRef(name="m", version=2) in state.refused
        assert u.store.current() == u.store.model_dir("m", 1).resolve()
    else:
        assert state.phase in (P.ACTIVE, P.UP_TO_DATE) and state.active == ModelRef(name="m", version=2)
        assert u.store.current() == u.store.model_dir("m", 2).resolve()
    assert Journal(u.store.journal_path).load() == state
    assert u.store.check_invariants() == [] and list(u.store.staging_dir.iterdir()) == []

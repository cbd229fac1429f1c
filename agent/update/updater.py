"""The thin driver of the update state machine: journal, publish, act.

For each event it (1) asks the pure `statemachine.step()` for the next state,
(2) writes that state to `state.json` (tmp + fsync + rename + fsync dir)
*before* anything the state names is done, (3) publishes the transition
through an `EventSink`, and (4) runs the actions, each of which yields the next
event. The I/O is pluggable, so that the network (TUF + download), the serving
layer (load + canary) and MQTT plug in without this module knowing them:

    Checker      what the signed channel says: up to date, incompatible, or a target
    Downloader   fetch the target into staging, verify it into blobs, discard staging
    Installer    assemble the model dir from blobs (default: `StoreInstaller`)
    Activator    load + canary the new model; serve whatever `current` is
    EventSink    publish each transition (MQTT `devices/<id>/events`; a list in tests)

Crash safety: every action is idempotent and the journal names the one that
was about to run, so `start()` after `kill -9` recovers the store (`.tmp-*`
leftovers, dangling links) and replays the RESTARTED event: the interrupted
step runs again, or the update is abandoned once its store count passes the
bound. `current` only moves in SWITCH_CURRENT (after the canary passed) and
ROLLBACK, each one rename(2).

Test hook: `EDGEFLEET_TEST_STOP_AT=<PHASE>` makes the process kill itself
with SIGKILL (or `EDGEFLEET_TEST_STOP_SIGNAL=STOP`: stop itself, for a test to
inspect and then kill) right after journaling that phase for the first time in
this process. It is read on each transition and does nothing when unset. (Not
`EDGE_AGENT_*`: that prefix is reserved for config keys, and an unknown one is
a config error.)
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from pydantic import ValidationError

from agent.store.store import Store
from agent.update.compat import human_bytes
from agent.update.decision import CheckResult
from agent.update.journal import Journal
from agent.update.statemachine import IN_PROGRESS, Action, Event, EventKind, ModelRef, Phase, UpdateState, step
from agent.wire.base import FrozenModel
from agent.wire.durable import atomic_write_bytes
from agent.wire.errors import EdgefleetError, ManifestError, StoreError, VerificationError, require
from agent.wire.manifest import MANIFEST_FILENAME, Manifest

log = logging.getLogger(__name__)

TEST_STOP_AT_ENV = "EDGEFLEET_TEST_STOP_AT"
TEST_STOP_SIGNAL_ENV = "EDGEFLEET_TEST_STOP_SIGNAL"


class Transition(FrozenModel):
    """One journaled transition, as published on `devices/<id>/events`."""

    schema_version: Literal[1] = 1
    from_phase: Phase
    to_phase: Phase
    event: EventKind
    target: ModelRef | None
    active: ModelRef | None
    reason: str | None
    store_count: int
    at: dt.datetime


class Checker(Protocol):
    def check(self, active: ModelRef | None) -> CheckResult:
        """Read the (TUF-verified) channel file and decide; includes the hardware check and
        the downgrade rule. `active` is what `current` serves now (None if nothing).

        Raises:
            EdgefleetError: the check could not be made (network, verification, ...).
        """
        ...


class Downloader(Protocol):
    def download(self, target: ModelRef) -> None:
        """Fetch every file of `target` into staging; resumes partial files; idempotent.

        Raises:
            EdgefleetError: e.g. DownloadError after bounded retries.
        """
        ...

    def verify(self, target: ModelRef) -> bytes:
        """Check the staged files against their TUF lengths and hashes, adopt them as blobs
        (`Store.adopt_blob`) and return the TUF-verified manifest bytes; idempotent.

        Raises:
            VerificationError: a file does not match.
        """
        ...

    def discard(self, target: ModelRef) -> None:
        """Remove what staging holds for `target` (the update finished or was abandoned).
        Local only: it runs during a rollback, when the network may be what failed."""
        ...


class Installer(Protocol):
    def install(self, manifest: Manifest, manifest_bytes: bytes) -> Path:
        """Make the complete model dir for `manifest`; idempotent. Raises StoreError."""
        ...


class Activator(Protocol):
    def activate(self, model_dir: Path, manifest: Manifest) -> None:
        """Load the model and run its canary while the old one keeps serving.

        Raises:
            ActivationError: the load failed or the canary did not reproduce exactly.
        """
        ...

    def serve(self, model_dir: Path | None) -> None:
        """Serve `model_dir` (what `current` points at now; None: nothing to serve)."""
        ...


class EventSink(Protocol):
    def publish(self, transition: Transition) -> None:
        """Best effort: the journal is the record; a failed publish never stops an update."""
        ...


class StoreInstaller:
    """The default Installer: `Store.assemble_model`, then a full check of the result."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def install(self, manifest: Manifest, manifest_bytes: bytes) -> Path:
        model_dir = self.store.assemble_model(manifest, manifest_bytes)
        problems = self.store.check_model_dir(model_dir, verify_hashes=True)
        if problems:
            raise StoreError(f"assembled {manifest.name} v{manifest.version} is not intact: {'; '.join(problems)}")
        return model_dir


def _maybe_stop_for_test(phase: Phase, fired: set[Phase]) -> None:
    wanted = os.environ.get(TEST_STOP_AT_ENV)
    if not wanted or wanted != phase.value or phase in fired:
        return
    fired.add(phase)
    sig = signal.SIGSTOP if os.environ.get(TEST_STOP_SIGNAL_ENV, "KILL").upper() == "STOP" else signal.SIGKILL
    log.warning("event=test_stop phase=%s signal=%s", phase.value, sig.name)
    for h in logging.getLogger().handlers:
        h.flush()
    os.kill(os.getpid(), sig)


class Updater:
    """Drives one device's updates. Not thread-safe: one caller feeds events."""

    def __init__(self, store: Store, *, checker: Checker, downloader: Downloader, activator: Activator,
                 sink: EventSink, installer: Installer | None = None, journal: Journal | None = None,
                 disk_cap_bytes: int | None = None,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.store = store
        self.journal = journal or Journal(store.journal_path)
        self.checker = checker
        self.downloader = downloader
        self.installer = installer or StoreInstaller(store)
        self.activator = activator
        self.sink = sink
        self.disk_cap_bytes = disk_cap_bytes
        self.clock = clock
        self.state = UpdateState()
        self._fired_test_stops: set[Phase] = set()
        # True while a pass runs and after one that an exception cut short.
        self._interrupted = False

    # -- entry points --------------------------------------------------------------
    def start(self) -> UpdateState:
        """Recover after whatever stopped the last run, finish or abandon its update, serve `current`.

        Raises:
            JournalError: state.json is unreadable (the message says what to do).
        """
        self.store.ensure_layout()
        self._interrupted = False
        return self._replay_journal("start")

    def check_now(self) -> UpdateState:
        """One full check (and update, if any) until a resting state."""
        return self.handle(Event(kind=EventKind.CHECK_REQUESTED))

    def handle(self, event: Event) -> UpdateState:
        """Feed `event` and every event the actions produce, until nothing follows.

        A pass that an exception cut short (a journal that could not be written on a full disk,
        a failed switch) is resumed from the journal at the next call, as a restart would resume
        it: without this, the phase left in progress would coalesce every later check forever.

        Raises:
            JournalError: state.json could not be written; nothing past the last saved state ran.
            InvalidTransition: `event` does not fit the current state (a caller bug).
        """
        if self._interrupted:
            self._interrupted = False
            self._replay_journal("resume")
        self._interrupted = True
        pending: Event | None = event
        while pending is not None:
            pending = self._transition(pending)
        self._interrupted = False
        return self.state

    def _replay_journal(self, why: Literal["start", "resume"]) -> UpdateState:
        """Recover the store and replay the journaled state's RESTARTED event."""
        self.store.recover()
        self.state = self.journal.load()
        log.log(logging.INFO if why == "start" else logging.WARNING, "event=%s phase=%s target=%s store_count=%d",
                why, self.state.phase.value, self.state.target, self.state.store_count)
        return self.handle(Event(kind=EventKind.RESTARTED))

    # -- the loop ----------------------------------------------------------------------
    def _transition(self, event: Event) -> Event | None:
        old = self.state
        new, actions = step(old, event)
        if new != old:
            started = time.monotonic()
            # Journal first: the action below may be interrupted at any instant.
            self.journal.save(new, now=self.clock())
            self.state = new
            log.info("event=state_change from=%s to=%s trigger=%s target=%s store_count=%d journal_s=%.4f%s",
                     old.phase.value, new.phase.value, event.kind.value, new.target, new.store_count,
                     time.monotonic() - started, f" reason={new.reason!r}" if new.phase is not old.phase
                     and new.reason else "")
            _maybe_stop_for_test(new.phase, self._fired_test_stops)
            self._publish(old, new, event)
        follow: Event | None = None
        for action in actions:
            result = self._run(action)
            if result is not None:
                follow = result
        return follow

    def _publish(self, old: UpdateState, new: UpdateState, event: Event) -> None:
        t = Transition(from_phase=old.phase, to_phase=new.phase, event=event.kind, target=new.target,
                       active=new.active, reason=new.reason, store_count=new.store_count, at=self.clock())
        try:
            self.sink.publish(t)
        except Exception:  # a broken sink must not stop an update; the journal is the record
            log.exception("event=publish_failed to=%s", new.phase.value)

    def _run(self, action: Action) -> Event | None:
        target = self.state.target
        try:
            if action is Action.CHECK:
                return self._check()
            if action is Action.DOWNLOAD:
                target = require(target, f"the target of {action.value}")
                self._make_room(target)
                self.downloader.download(target)
                return Event(kind=EventKind.DOWNLOADED, target=target)
            if action is Action.VERIFY:
                target = require(target, f"the target of {action.value}")
                self._verify(target)
                return Event(kind=EventKind.VERIFIED, target=target)
            if action is Action.INSTALL:
                target = require(target, f"the target of {action.value}")
                manifest_bytes = self._staged_manifest(target).read_bytes()
                manifest = Manifest.model_validate_json(manifest_bytes)
                self.installer.install(manifest, manifest_bytes)
                return Event(kind=EventKind.INSTALLED, target=target)
            if action is Action.ACTIVATE:
                target = require(target, f"the target of {action.value}")
                model_dir = self.store.model_dir(target.name, target.version)
                manifest = Manifest.model_validate_json((model_dir / MANIFEST_FILENAME).read_bytes())
                self.activator.activate(model_dir, manifest)
                return Event(kind=EventKind.ACTIVATED, target=target)
            if action is Action.ROLLBACK:
                self._rollback(target)
                return Event(kind=EventKind.ROLLED_BACK, target=target)
        except (EdgefleetError, OSError, ValidationError) as e:
            log.error("event=step_failed phase=%s action=%s target=%s error=%r",
                      self.state.phase.value, action.value, target, str(e))
            return Event(kind=EventKind.STEP_FAILED, target=target, reason=str(e))

        if action is Action.SWITCH_CURRENT:
            target = require(target, f"the target of {action.value}")
            self.store.switch_current(self.store.model_dir(target.name, target.version))
            log.info("event=switch_current target=%s", target)
        elif action is Action.COLLECT_GARBAGE:
            self._collect_garbage(target)
        elif action is Action.SERVE_CURRENT:
            self.activator.serve(self.store.current())
        return None

    # -- actions -------------------------------------------------------------------------
    def current_ref(self) -> ModelRef | None:
        """What `current` serves, read from its manifest (the store is the truth, not the journal)."""
        current = self.store.current()
        if current is None:
            return None
        try:
            m = Manifest.model_validate_json((current / MANIFEST_FILENAME).read_bytes())
        except (OSError, ValidationError):
            return None
        return ModelRef(name=m.name, version=m.version)

    def _check(self) -> Event:
        result = self.checker.check(self.current_ref())
        if result.outcome == "up_to_date":
            return Event(kind=EventKind.NO_UPDATE, reason=result.reason)
        if result.outcome == "incompatible":
            return Event(kind=EventKind.INCOMPATIBLE, reason=result.reason)
        if result.target is not None and result.manifest is not None and not self.state.is_refused(result.target):
            # Staged before DOWNLOADING is journaled: the download plans disk room with it.
            atomic_write_bytes(self._plan(result.target), result.manifest.model_dump_json().encode())
        return Event(kind=EventKind.UPDATE_AVAILABLE, target=result.target)

    def _staged_manifest(self, target: ModelRef) -> Path:
        return self.store.staging_file(f"{target.name}-{target.version}.{MANIFEST_FILENAME}")

    def _plan(self, target: ModelRef) -> Path:
        return self.store.staging_file(f"{target.name}-{target.version}.plan.json")

    def _read_plan(self, target: ModelRef) -> Manifest | None:
        try:
            return Manifest.model_validate_json(self._plan(target).read_bytes())
        except (FileNotFoundError, ValidationError):
            return None

    def _verify(self, target: ModelRef) -> None:
        manifest_bytes = self.downloader.verify(target)
        try:
            manifest = Manifest.model_validate_json(manifest_bytes)
        except ValidationError as e:
            raise ManifestError(f"the verified manifest of {target} does not validate: {e.errors()[0]['msg']}") from e
        if (manifest.name, manifest.version) != (target.name, target.version):
            raise VerificationError(f"the channel names {target} but its manifest says {manifest.name}"
                                    f" v{manifest.version}: refusing to mix versions; republish the channel")
        plan = self._read_plan(target)
        if plan is not None and plan != manifest:
            raise VerificationError(f"the manifest of {target} changed between the check and the download:"
                                    " refusing to mix two builds; the next check starts over")
        missing = [f.path for f in manifest.files if not self.store.has_blob(f.sha256)]
        if missing:
            raise VerificationError(f"{target}: verify returned but blobs are missing for {missing}")
        # Kept in staging so that INSTALLING can run again after a restart.
        atomic_write_bytes(self._staged_manifest(target), manifest_bytes)

    def _rollback(self, target: ModelRef | None) -> None:
        if target is not None:
            target_dir = self.store.model_dir(target.name, target.version).resolve()
            if self.store.current() == target_dir:
                if self.store.previous() is not None:
                    self.store.rollback()
                else:
                    # A first install has nothing to go back to: serve nothing rather than a bad model.
                    self.store.remove_current()
                    log.error("event=rollback_no_previous target=%s", target)
            self._discard_work(target)

    def _discard_work(self, target: ModelRef) -> None:
        self.downloader.discard(target)
        self._staged_manifest(target).unlink(missing_ok=True)
        self._plan(target).unlink(missing_ok=True)

    def work_in_progress(self) -> set[Path]:
        """What a GC run from elsewhere (a periodic sweep) must keep while an update is under way."""
        if self.state.phase in IN_PROGRESS and self.state.target is not None:
            return self._work_in_progress(self.state.target)
        return {self.store.staging_dir} if self.state.phase in IN_PROGRESS else set()

    def _work_in_progress(self, target: ModelRef) -> set[Path]:
        keep = {self.store.staging_dir, self.store.model_dir(target.name, target.version)}
        staged = self._staged_manifest(target)
        if staged.is_file():
            try:
                manifest = Manifest.model_validate_json(staged.read_bytes())
                keep |= {self.store.blob_path(f.sha256) for f in manifest.files}
            except ValidationError:
                pass
        return keep

    def _make_room(self, target: ModelRef) -> None:
        """GC so that the target's new files fit under the cap next to everything else.

        Raises:
            StoreError: even without every removable model they would not fit.
        """
        if self.disk_cap_bytes is None:
            return
        plan = self._read_plan(target)
        missing = self.store.missing_bytes(plan) if plan is not None else 0
        report = self.store.gc(max(0, self.disk_cap_bytes - missing), keep=self._work_in_progress(target))
        if not report.is_within_cap:
            raise StoreError(
                f"{target} needs {human_bytes(missing)} more in the store, which uses {human_bytes(report.after_bytes)}"
                f" for current, previous and work in progress under its cap of {human_bytes(self.disk_cap_bytes)}:"
                " raise disk_cap_bytes (EDGE_AGENT_DISK_CAP_BYTES) or publish a smaller build")

    def _collect_garbage(self, target: ModelRef | None) -> None:
        try:
            if target is not None:
                self._discard_work(target)
            if self.disk_cap_bytes is not None:
                self.store.gc(self.disk_cap_bytes)
        except (EdgefleetError, OSError):
            # The update is done and `current` moved; a GC failure only delays reclaiming space.
            log.exception("event=gc_failed")

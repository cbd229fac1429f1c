"""The staged-rollout controller behind `edge-builder rollout` and `rollback`.

One rollout moves a channel to `model` v`version` wave by wave:

1. journal the wave (REPO/rollouts/<channel>.json, see builder.fleet.state),
2. sign `channels/<channel>.json` with the wave's percent and the rollout's
   fixed salt (so each cohort contains the previous one), journal the time
   it was signed, ring the MQTT doorbell,
3. watch the devices' retained statuses and their events until
   `rollout_policy.judge_wave` says the wave passed or failed (too many
   failures, or `wait_s` ran out since the signing),
4. next wave; after the 100% wave the rollout SUCCEEDED. On a failed wave it
   journals ROLLING_BACK, then signs the channel file it replaced with
   `allow_downgrade` at 100% and rings again (ROLLED_BACK). With no previous
   channel file there is nothing to go back to: the new version is held at 0%
   (HALTED) so no further device installs it.

Which devices exist and which channel they follow comes from their retained
status, so a restarted controller knows the fleet after one quiet spell; the
journal says which wave it was in and since when, so it continues rather than
starting over, and a wave's wait keeps counting from its signing.

Trust: this module holds the signing keys' power (it signs channel files);
MQTT only tells it how devices fare. A forged status can make it roll back
early or wait longer, never install anything on a device.

Concurrency: one controller per channel, enforced by an flock on
REPO/rollouts/<channel>.lock (released by the kernel on `kill -9`). An operator's
`rollback` while a controller runs rewrites the journal; the controller sees
the file change under it and stops.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.wire.broker import BrokerCredentials
from agent.wire.channel import ChannelFile, Rollout
from agent.wire.errors import RepositoryError, UsageError, require
from agent.wire.mqtt import Doorbell, all_devices_topic
from builder.fleet.observer import RolloutObserver
from builder.fleet.policy import WaveOutcome, WaveVerdict, devices_in_wave, judge_wave
from builder.fleet.session import QUIET_S, OperatorSession, ring_doorbell
from builder.fleet.state import (
    ROLLOUTS_DIRNAME,
    RolloutPhase,
    RolloutState,
    WaveRecord,
    load_state,
    save_state,
    state_path,
)
from builder.release.repository import TufRepo

log = logging.getLogger(__name__)

# How often the wave is judged when no message arrives (the timeout needs a clock tick).
TICK_S = 0.5
# A watch disconnected from the broker this long cannot see the fleet: its wave fails.
BLIND_AFTER_S = 30.0
# Retained statuses arrive in one burst after the SUBACK; at most this long is spent on it.
RETAINED_WAIT_S = 5.0

Progress = Callable[[str], None]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Broker:
    url: str
    creds: BrokerCredentials
    fleet: str


@dataclass(frozen=True)
class RolloutPlan:
    channel: str
    model: str
    version: int
    waves: list[int]
    min_success: float
    wait_s: float
    salt: str | None = None  # None: a fresh random salt per rollout


class FleetWatch:
    """A live MQTT subscription to every device's status and events, folded into a RolloutObserver."""

    def __init__(self, broker: Broker, model: str, version: int) -> None:
        self.observer = RolloutObserver(broker.fleet, model, version)
        self.messages = 0  # every message received, valid or not
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self._session = OperatorSession(broker.url, broker.creds, self._on_message)
        try:
            self._session.subscribe([all_devices_topic(broker.fleet, "status"),
                                     all_devices_topic(broker.fleet, "events")])
            # Let the retained statuses arrive before anyone judges a wave on an empty fleet.
            deadline = time.monotonic() + RETAINED_WAIT_S
            self._session.last_message_at = time.monotonic()
            while time.monotonic() < deadline and time.monotonic() - self._session.last_message_at < QUIET_S:
                time.sleep(0.05)
        except BaseException:
            self._session.close()
            raise

    def _on_message(self, topic: str, payload: bytes | bytearray) -> None:
        with self.lock:
            self.messages += 1
            if self.observer.apply(topic, payload):
                self.changed.set()

    def blind_reason(self, after_s: float = BLIND_AFTER_S) -> str | None:
        """Why this watch cannot see the fleet now (disconnected for `after_s`), or None while it can."""
        return self._session.blind_reason(after_s)

    @property
    def callback_errors(self) -> int:
        """Messages whose handling raised (each logged): counted, never the end of the session."""
        return self._session.callback_errors

    def close(self) -> None:
        self._session.close()


@contextmanager
def channel_lock(repo_dir: Path, channel: str) -> Iterator[None]:
    """Hold the one-controller-per-channel lock.

    Raises:
        UsageError: another process holds it.
    """
    path = repo_dir / ROLLOUTS_DIRNAME / f"{channel}.lock"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UsageError(f"another rollout controller runs on channel {channel} (lock {path} is held): "
                             "wait for it, or stop it first") from e
        yield
    finally:
        os.close(fd)


def _doorbell(repo: TufRepo, channel: str) -> Doorbell:
    return Doorbell(repo_timestamp_version=repo.timestamp().version, channels=[channel], published_at=utc_now())


class RolloutController:
    """Runs (or resumes) one channel's rollout; see the module docstring."""

    def __init__(self, repo_dir: Path, broker: Broker | None, *, progress: Progress = lambda line: None,
                 clock: Callable[[], dt.datetime] = utc_now) -> None:
        self.repo_dir = repo_dir
        self.broker = broker
        self.progress = progress
        self.clock = clock
        TufRepo.load(repo_dir)  # fail early on a dir that is not a repository

    # -- journal -------------------------------------------------------------------------
    def _save(self, state: RolloutState, **changes: object) -> RolloutState:
        return save_state(self.repo_dir, state.model_copy(update=changes), self.clock())

    def _check_not_changed(self, state: RolloutState) -> None:
        on_disk = load_state(self.repo_dir, state.channel)
        if on_disk is None or on_disk.store_count != state.store_count:
            raise RepositoryError(
                f"rollout state {state_path(self.repo_dir, state.channel)} changed under this controller "
                f"(now: {on_disk.phase.value if on_disk else 'removed'}), e.g. by `edge-builder rollback`: stopping")

    # -- signing -------------------------------------------------------------------------
    def _sign(self, channel_file: ChannelFile) -> None:
        repo = TufRepo.load(self.repo_dir)
        if repo.read_channel(channel_file.channel) != channel_file:
            repo.set_channel(channel_file)
        else:
            # Signed by a run that was killed: set_channel writes targets first, then snapshot and
            # timestamp, so a kill in between leaves a file devices cannot see yet. Finish the chain
            # (idempotent: snapshot only changes if targets did; a new timestamp costs nothing).
            repo.refresh()
        if self.broker is not None:
            ring_doorbell(self.broker.url, self.broker.creds, self.broker.fleet, _doorbell(repo, channel_file.channel))

    # -- entry points ----------------------------------------------------------------------
    def begin(self, plan: RolloutPlan) -> RolloutState:
        """The journal to run: the saved one when it is this rollout, else a new one.

        Raises:
            UsageError: another rollout on this channel is under way.
            RepositoryError: the version is not published, or the state file is invalid.
        """
        saved = load_state(self.repo_dir, plan.channel)
        if saved is not None and (saved.model, saved.version) == (plan.model, plan.version) \
                and saved.phase is not RolloutPhase.ROLLED_BACK and saved.phase is not RolloutPhase.HALTED:
            if saved.waves != plan.waves:
                self.progress(f"resuming with the saved waves {saved.waves} (not {plan.waves})")
            if not saved.is_finished:
                self.progress(f"resuming the rollout of {saved.model} v{saved.version} on {saved.channel} at wave "
                              f"{saved.wave_index + 1}/{len(saved.waves)} ({saved.percent}%), {saved.phase.value}")
            log.info("event=rollout_resume channel=%s model=%s version=%d phase=%s wave_index=%d",
                     saved.channel, saved.model, saved.version, saved.phase.value, saved.wave_index)
            return saved
        if saved is not None and not saved.is_finished:
            raise UsageError(
                f"channel {plan.channel} has a rollout of {saved.model} v{saved.version} under way "
                f"(wave {saved.wave_index + 1}/{len(saved.waves)}, {saved.phase.value}): resume it with the same "
                f"MODEL VERSION, or `edge-builder rollback {plan.channel}` first")
        repo = TufRepo.load(self.repo_dir)
        if plan.version not in repo.published_versions(plan.model):
            raise RepositoryError(
                f"{plan.model} v{plan.version} is not published in {self.repo_dir} "
                f"(published: {repo.published_versions(plan.model) or 'none'}): run `edge-builder publish` first")
        previous = repo.read_channel(plan.channel)
        if previous is not None and (previous.model, previous.version) == (plan.model, plan.version):
            # The channel names this version already (a rollout whose journal is gone, or a re-run):
            # "going back" to it would be a no-op, so there is no previous version to offer.
            self.progress(f"{plan.channel} already names {plan.model} v{plan.version}: no previous version to roll "
                          "back to")
            previous = None
        now = self.clock()
        state = RolloutState(channel=plan.channel, model=plan.model, version=plan.version,
                             salt=plan.salt if plan.salt is not None else f"{plan.channel}-{secrets.token_hex(4)}",
                             waves=plan.waves, min_success=plan.min_success, wait_s=plan.wait_s,
                             previous=previous, started_at=now, updated_at=now)
        state = self._save(state)
        log.info("event=rollout_start channel=%s model=%s version=%d waves=%s salt=%s previous=%s",
                 state.channel, state.model, state.version, state.waves, state.salt,
                 f"{previous.model}:v{previous.version}" if previous else None)
        return state

    def run(self, state: RolloutState) -> RolloutState:
        """Drive `state` to a finished phase.

        Raises:
            BrokerError: the broker is unreachable.
            RepositoryError: signing failed, or the journal changed under us.
            UsageError: another controller holds this channel.
        """
        with channel_lock(self.repo_dir, state.channel):
            return self._drive(state)

    def start(self, plan: RolloutPlan) -> RolloutState:
        """`begin` and `run` under one hold of the channel lock (what the CLI does).

        Raises: as `begin` and `run`.
        """
        with channel_lock(self.repo_dir, plan.channel):
            return self._drive(self.begin(plan))

    def _drive(self, state: RolloutState) -> RolloutState:
        if self.broker is None:
            raise UsageError("a rollout watches the fleet: pass --broker")
        if state.phase is RolloutPhase.SUCCEEDED:
            self.progress(f"rollout of {state.model} v{state.version} on {state.channel} already succeeded")
            return state
        watch = FleetWatch(self.broker, state.model, state.version)
        try:
            while state.phase is RolloutPhase.RUNNING:
                state = self._run_wave(state, watch)
        finally:
            watch.close()
        if state.phase is RolloutPhase.ROLLING_BACK:
            state = self._roll_back(state)
        return state

    def rollback(self, channel: str, reason: str) -> RolloutState:
        """`edge-builder rollback`: sign the saved previous version back (idempotent).

        Raises:
            UsageError: no rollout state for this channel.
            RepositoryError: the rollout had no previous version.
        """
        state = load_state(self.repo_dir, channel)
        if state is None:
            raise UsageError(f"no rollout state for channel {channel} in {state_path(self.repo_dir, channel)}: "
                             f"sign the version you want explicitly with `edge-builder channel set {channel} MODEL "
                             "VERSION --allow-downgrade`")
        if state.previous is None:
            raise RepositoryError(f"the rollout of {state.model} v{state.version} on {channel} replaced no channel "
                                  "file, so there is no previous version: sign one with `edge-builder channel set "
                                  f"{channel} MODEL VERSION --allow-downgrade`")
        state = self._save(state, phase=RolloutPhase.ROLLING_BACK, reason=reason)
        return self._roll_back(state)

    # -- one wave --------------------------------------------------------------------------
    def _run_wave(self, state: RolloutState, watch: FleetWatch) -> RolloutState:
        n_waves = len(state.waves)
        label = f"wave {state.wave_index + 1}/{n_waves} ({state.percent}%)"
        wanted = state.wave_channel()
        if state.wave_started_at is None:
            # The signing is journaled by its start time right after it; a crash in between
            # re-signs the same file on restart (`_sign` skips an identical one).
            self._sign(wanted)
            state = self._save(state, wave_started_at=self.clock())
            self.progress(f"{label}: signed {state.channel} -> {state.model} v{state.version} "
                          f"at {state.percent}% (salt {state.salt}), doorbell rung")
        else:
            current = TufRepo.load(self.repo_dir).read_channel(state.channel)
            if current != wanted:
                raise RepositoryError(
                    f"channel {state.channel} is no longer what this rollout signed ({wanted.model} v{wanted.version} "
                    f"at {wanted.rollout.percent}%): someone ran `channel set`; move "
                    f"{state_path(self.repo_dir, state.channel)} away to start over")
            self._sign(wanted)  # rings the doorbell again for devices that missed it while we were down
            self.progress(f"{label}: resumed, signed at {state.wave_started_at.isoformat(timespec='seconds')}")
        wave_started_at = require(state.wave_started_at, "the start of the running wave")
        members: set[str] = set()
        shown: tuple[int, int, int] | None = None
        while True:
            with watch.lock:
                watch.changed.clear()
                obs = watch.observer
                # A member stays a member when it goes offline: a crash under the new model must count.
                on_channel = obs.on_channel(state.channel)
                members |= devices_in_wave(on_channel, state.salt, state.percent)
                active, failed = obs.active(), obs.failed()
                reasons = obs.failure_reasons(failed & members)
            elapsed_s = (self.clock() - wave_started_at).total_seconds()
            verdict = judge_wave(members, active, failed, known_on_channel=len(on_channel | members),
                                 min_success=state.min_success, elapsed_s=elapsed_s, wait_s=state.wait_s,
                                 blind_reason=watch.blind_reason())
            counts = (verdict.expected, verdict.active, verdict.failed)
            if counts != shown:
                shown = counts
                self.progress(f"{label}: {verdict.active}/{verdict.expected} active, {verdict.failed} failed "
                              f"({elapsed_s:.0f} s of {state.wait_s:.0f} s)")
                for device, why in reasons.items():
                    log.warning("event=device_failed device=%s version=%d reason=%r", device, state.version, why)
            if verdict.outcome is not WaveOutcome.WAITING:
                return self._finish_wave(state, verdict, reasons)
            self._check_not_changed(state)
            watch.changed.wait(TICK_S)

    def _finish_wave(self, state: RolloutState, verdict: WaveVerdict, reasons: dict[str, str]) -> RolloutState:
        wave_started_at = require(state.wave_started_at, "the start of the finished wave")
        label = f"wave {state.wave_index + 1}/{len(state.waves)} ({state.percent}%)"
        record = WaveRecord(percent=state.percent, started_at=wave_started_at, finished_at=self.clock(),
                            outcome="passed" if verdict.outcome is WaveOutcome.PASSED else "failed",
                            expected=verdict.expected, active=verdict.active, failed=verdict.failed,
                            reason=verdict.reason)
        history = [*state.history, record]
        log.info("event=wave_done channel=%s percent=%d outcome=%s expected=%d active=%d failed=%d reason=%r",
                 state.channel, state.percent, record.outcome, record.expected, record.active, record.failed,
                 record.reason)
        if verdict.outcome is WaveOutcome.PASSED:
            self.progress(f"{label} passed: {verdict.reason}")
            if state.wave_index + 1 >= len(state.waves):
                self.progress(f"rollout of {state.model} v{state.version} on {state.channel} succeeded")
                return self._save(state, history=history, phase=RolloutPhase.SUCCEEDED, reason=verdict.reason)
            return self._save(state, history=history, wave_index=state.wave_index + 1, wave_started_at=None)
        detail = "; ".join(f"{d}: {r}" for d, r in list(reasons.items())[:3])
        reason = f"{label} failed: {verdict.reason}" + (f" ({detail})" if detail else "")
        self.progress(reason)
        return self._save(state, history=history, phase=RolloutPhase.ROLLING_BACK, reason=reason)

    # -- rollback -----------------------------------------------------------------------------
    def _roll_back(self, state: RolloutState) -> RolloutState:
        """Sign the previous channel file at 100% with allow_downgrade (or hold the new one at 0%)."""
        previous = state.previous
        if previous is None:
            held = ChannelFile(channel=state.channel, model=state.model, version=state.version,
                               rollout=Rollout(percent=0, salt=state.salt))
            self._sign(held)
            self.progress(f"no previous version on {state.channel}: {state.model} v{state.version} held at 0%; "
                          "devices that installed it keep it until you publish a fix")
            log.error("event=rollout_halted channel=%s model=%s version=%d reason=%r", state.channel, state.model,
                      state.version, state.reason)
            return self._save(state, phase=RolloutPhase.HALTED)
        back = ChannelFile(channel=state.channel, model=previous.model, version=previous.version,
                           rollout=Rollout(percent=100, salt=previous.rollout.salt), allow_downgrade=True)
        self._sign(back)
        self.progress(f"rolled back: {state.channel} -> {back.model} v{back.version} at 100% (allow_downgrade)"
                      + (", doorbell rung" if self.broker is not None else ""))
        log.error("event=rollout_rolled_back channel=%s from=%s:v%d to=%s:v%d reason=%r", state.channel, state.model,
                  state.version, back.model, back.version, state.reason)
        return self._save(state, phase=RolloutPhase.ROLLED_BACK)

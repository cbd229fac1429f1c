"""`edge-agent update --once`: one pass of the daemon's update path, without the daemon.

The pass is the journaled `agent.update.updater.Updater` with the same real steps as
`edge-agent run` (TUF check with hardware and disk decisions, verified resumable
download, install, load + canary, atomic switch): first it finishes or abandons
whatever an interrupted earlier pass left in `state.json`, then it checks once.
The one difference: activation loads the new model in a temporary model-worker
process, runs the manifest's canary there, and stops it; `current` moves only
after the canary reproduced exactly.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from agent.store.lock import StateLock
from agent.store.store import Store
from agent.system.hardware import probe
from agent.update.activation import WorkerCanaryActivator
from agent.update.compat import HardwareReport
from agent.update.statemachine import Phase
from agent.update.updater import Activator, Transition, Updater
from agent.wire.base import StrictModel
from agent.wire.cli import HelpFormatter, print_json
from agent.wire.errors import (
    DowngradeRefusedError,
    EdgefleetError,
    ExitCode,
    IncompatibleModelError,
    UpdateFailedError,
    UsageError,
)
from agent.wire.manifest import MANIFEST_FILENAME, Manifest

log = logging.getLogger(__name__)


class UpdateOutcome(StrictModel):
    """`update --once --json` output."""

    schema_version: Literal[1] = 1
    status: Literal["up_to_date", "not_in_cohort", "installed"]
    channel: str
    model: str
    version: int
    bytes_downloaded: int = 0
    files_downloaded: int = 0
    blobs_reused: int = 0


class _TtyProgress:
    """A one-line progress display on stderr (only used when stderr is a TTY)."""

    def __init__(self) -> None:
        self.bytes_done = 0
        self._last_mib = -1

    def __call__(self, n: int) -> None:
        self.bytes_done += n
        mib = self.bytes_done >> 20
        if mib != self._last_mib:
            self._last_mib = mib
            sys.stderr.write(f"\rdownloading: {mib} MiB")
            sys.stderr.flush()


class _ErrorRecorder:
    """Wraps a step implementation and remembers the last typed error it raised, so the
    one-shot CLI can exit with that error's code and message (the driver itself turns
    errors into STEP_FAILED events with the message as the reason)."""

    def __init__(self) -> None:
        self.last: EdgefleetError | None = None

    def wrap(self, obj: Any) -> Any:
        recorder = self

        class _Proxy:
            def __getattr__(self, name: str) -> Any:
                attr = getattr(obj, name)
                if not callable(attr):
                    return attr

                def call(*args: Any, **kwargs: Any) -> Any:
                    try:
                        return attr(*args, **kwargs)
                    except EdgefleetError as e:
                        recorder.last = e
                        raise
                return call
        return _Proxy()


class _LogSink:
    def publish(self, transition: Transition) -> None:
        """The updater logs each transition itself; a one-shot pass has no MQTT link."""


def run_update_once(config: AgentConfig, store: Store, *, activator: Activator | None = None,
                    progress: Callable[[int], None] | None = None,
                    hardware: Callable[[Path], HardwareReport] | None = None) -> UpdateOutcome:
    """One journaled update pass: finish an interrupted update, then check and install once.

    Raises:
        StateDirBusyError: another edge-agent (the daemon) holds the state dir.
        EdgefleetError: the typed error of the step that refused or failed (VerificationError,
            DownloadError, IncompatibleModelError, ActivationError, DowngradeRefusedError, ...);
            `current` then still points at the previous complete model.
    """
    with StateLock(store.root):
        return _update_pass(config, store, activator, progress, hardware)


def _update_pass(config: AgentConfig, store: Store, activator: Activator | None,
                 progress: Callable[[int], None] | None,
                 hardware: Callable[[Path], HardwareReport] | None) -> UpdateOutcome:
    # Imported here, not at the top: `edge-agent run` builds this subcommand's parser too,
    # and the daemon keeps TUF, its crypto and the HTTP client out of its process.
    from agent.update.source import TufUpdateSource

    store.ensure_layout()
    source = TufUpdateSource(config, store, progress=progress, hardware=hardware or probe)
    errors = _ErrorRecorder()
    updater = Updater(store, checker=errors.wrap(source), downloader=errors.wrap(source),
                      activator=errors.wrap(activator or WorkerCanaryActivator(config.intra_op_num_threads,
                                                                                config.allow_custom_ops)),
                      sink=_LogSink(), disk_cap_bytes=config.disk_cap_bytes)
    try:
        before = store.current()
        updater.start()
        state = updater.check_now()
        after = store.current()
        if state.phase in (Phase.FAILED, Phase.ROLLING_BACK):
            raise errors.last or UpdateFailedError(f"update failed: {state.reason}")
        if state.phase is Phase.INCOMPATIBLE:
            raise IncompatibleModelError(state.reason or "this device cannot run the channel's model")
        channel, check = source.last_channel, source.last_check
        if channel is None or check is None:
            raise UpdateFailedError(f"the pass ended in {state.phase.value} without reading the channel:"
                                    f" {state.reason}")
        if after is not None and after != before:
            active = Manifest.model_validate_json((after / MANIFEST_FILENAME).read_bytes())
            log.info("event=update_done status=installed model=%s version=%d bytes=%d", active.name,
                     active.version, source.bytes_downloaded)
            return UpdateOutcome(status="installed", channel=channel.channel, model=active.name,
                                 version=active.version, bytes_downloaded=source.bytes_downloaded,
                                 files_downloaded=source.files_downloaded, blobs_reused=source.blobs_reused)
        # Nothing installed: say why, in the words of the one decision the pass made.
        if check.outcome != "up_to_date":
            raise UpdateFailedError(f"channel {channel.channel} names {channel.model} v{channel.version} but the"
                                    f" pass ended in {state.phase.value}: {state.reason}")
        if check.declined == "downgrade":
            raise DowngradeRefusedError(
                f"{check.reason}: refused; an operator rolls back with `edge-builder channel set {channel.channel}"
                f" {channel.model} {channel.version} --allow-downgrade`")
    except EdgefleetError as e:
        log.error("event=update_refused error=%s reason=%s", type(e).__name__, e)
        raise
    status: Literal["up_to_date", "not_in_cohort"] = "not_in_cohort" if check.declined == "not_in_cohort" \
        else "up_to_date"
    log.info("event=update_done status=%s channel=%s", status, channel.channel)
    return UpdateOutcome(status=status, channel=channel.channel, model=channel.model, version=channel.version)


def _cmd_update(args: argparse.Namespace) -> int:
    if not args.once:
        raise UsageError("update runs one pass only: pass --once (the daemon is `edge-agent run`)")
    config = load_config(Path(args.config))
    progress = _TtyProgress() if sys.stderr.isatty() and not args.json else None
    try:
        outcome = run_update_once(config, Store(config.state_dir), progress=progress)
    finally:
        if progress is not None and progress.bytes_done:
            sys.stderr.write("\n")
    if args.json:
        print_json(outcome)
    else:
        print(f"{outcome.status}: channel {outcome.channel} -> {outcome.model} v{outcome.version}"
              + (f" ({outcome.bytes_downloaded} bytes downloaded)" if outcome.status == "installed" else ""),
              file=sys.stdout)
    return ExitCode.OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "update", help="check the signed repository once and install the channel's release",
        formatter_class=HelpFormatter,
        description="One journaled update pass (the daemon's path): finish an interrupted update, then TUF "
                    "refresh, signed channel file, cohort, hardware and disk checks, verified download, install, "
                    "load + canary in a temporary model worker, atomic switch. Exit 0 when up to date or installed.",
        epilog="example:\n  edge-agent update --once --config /etc/edge-agent/agent.toml\n" + ExitCode.help_text())
    p.add_argument("--once", action="store_true", help="run one pass and exit (required for now)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH),
                   help="agent TOML config; every key can be overridden by EDGE_AGENT_<KEY>")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    p.set_defaults(handler=_cmd_update)

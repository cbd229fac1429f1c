"""`edge-agent update --once`: one refresh-and-install pass without the daemon.

The orchestration is `run_update_once` and nothing else: the update state
machine (issue 6) replaces it with journaled steps calling the same
`agent.fetch` functions.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agent.clikit import HelpFormatter, print_json
from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from agent.download import DownloadPolicy, Downloader
from agent.errors import EdgefleetError, ExitCode, UsageError
from agent.fetch import CheckStatus, fetch_release
from agent.store import Store

log = logging.getLogger(__name__)


class UpdateOutcome(BaseModel):
    """`update --once --json` output."""

    model_config = ConfigDict(extra="forbid")

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


def run_update_once(config: AgentConfig, store: Store, downloader: Downloader | None = None) -> UpdateOutcome:
    """Fetch (verified) and, when there is a release, assemble it and switch `current`.

    Raises:
        EdgefleetError: any refusal; nothing is installed and `current` is untouched.
    """
    try:
        result = fetch_release(config, store, downloader=downloader)
        check = result.check
        if check.release is None:
            log.info("event=update_done status=%s channel=%s", check.status.value, check.channel.channel)
            return UpdateOutcome(status=check.status.value, channel=check.channel.channel,  # type: ignore[arg-type]
                                 model=check.channel.model, version=check.channel.version)
        release = check.release
        model_dir = store.assemble_model(release.manifest, release.manifest_bytes)
        store.switch_current(model_dir)
    except EdgefleetError as e:
        log.error("event=update_refused error=%s reason=%s", type(e).__name__, e)
        raise
    m = release.manifest
    log.info("event=update_done status=installed model=%s version=%d bytes=%d", m.name, m.version,
             result.stats.bytes_transferred)
    assert check.status is CheckStatus.AVAILABLE
    return UpdateOutcome(status="installed", channel=check.channel.channel, model=m.name, version=m.version,
                         bytes_downloaded=result.stats.bytes_transferred,
                         files_downloaded=result.stats.files_downloaded, blobs_reused=result.stats.blobs_reused)


def _cmd_update(args: argparse.Namespace) -> int:
    if not args.once:
        raise UsageError("update runs one pass only: pass --once (the daemon is `edge-agent run`)")
    config = load_config(Path(args.config))
    downloader = None
    if sys.stderr.isatty() and not args.json:
        downloader = Downloader(DownloadPolicy(rate_limit_bytes_per_s=config.download_rate_limit_bytes_per_s),
                                progress=_TtyProgress())
    try:
        outcome = run_update_once(config, Store(config.state_dir), downloader)
    finally:
        if downloader is not None and downloader.stats.bytes_transferred:
            sys.stderr.write("\n")
    if args.json:
        print_json(outcome)
    else:
        print(f"{outcome.status}: channel {outcome.channel} -> {outcome.model} v{outcome.version}"
              + (f" ({outcome.bytes_downloaded} bytes downloaded)" if outcome.status == "installed" else ""),
              file=sys.stdout)
    return ExitCode.OK


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "update", help="check the signed repository once and install the channel's release",
        formatter_class=HelpFormatter,
        description="One refresh-and-install pass: TUF refresh, signed channel file, cohort, verified "
                    "download, install, switch. Exit 0 when up to date or installed.",
        epilog="example:\n  edge-agent update --once --config /etc/edge-agent/agent.toml\n" + ExitCode.help_text())
    p.add_argument("--once", action="store_true", help="run one pass and exit (required for now)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH),
                   help="agent TOML config; every key can be overridden by EDGE_AGENT_<KEY>")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    p.set_defaults(handler=_cmd_update)

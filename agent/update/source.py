"""The real Checker and Downloader of the update driver, over TUF (`agent.update.trust`) and the
resumable downloader (`agent.update.download`).

What is trusted: only what `tuf.ngclient` verified. The checker reads the signed channel
file and the signed manifest; `check_channel` then applies the one decision
(`agent.update.decision`: the cohort, the downgrade rule, the hardware requirements and the
disk cap), so nothing is downloaded for a model this device refuses. The downloader
fetches each file of the signed manifest and accepts it
only when its length and sha256 match the signed `TargetFile` (`Downloader.fetch_blob`
verifies before `Store.adopt_blob`), so `blobs/` only ever holds verified bytes.

Crash safety: partial files live in `staging/<sha256>.part` and resume after `kill -9`
(a new TUF session is opened when the process restarts mid-update). `discard` is local
only: it runs during a rollback, when the network may be what failed.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
from pydantic import ValidationError
from tuf.api.metadata import TargetFile

from agent.config import AgentConfig
from agent.store.store import Store
from agent.system.hardware import probe
from agent.update.compat import HardwareReport
from agent.update.decision import CheckResult, StoreRoom, decide_fit, decide_offer, offered
from agent.update.download import Downloader, DownloadPolicy, ExpectedFile
from agent.update.statemachine import ModelRef
from agent.update.trust import TrustedRepository
from agent.wire.channel import ChannelFile
from agent.wire.errors import VerificationError
from agent.wire.manifest import MANIFEST_FILENAME, Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Release:
    manifest: Manifest
    manifest_bytes: bytes
    targets: dict[str, TargetFile]
    urls: dict[str, str]


class TufUpdateSource:
    """Checker + Downloader for `agent.update.updater.Updater`. Used from one thread (the updater's).

    `config` may be replaced between checks (SIGHUP reload): each check reads it anew.
    """

    def __init__(self, config: AgentConfig, store: Store, *,
                 hardware: Callable[[Path], HardwareReport] = probe,
                 progress: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.store = store
        self._hardware = hardware
        self._progress = progress
        self._trust: TrustedRepository | None = None
        self.last_channel: ChannelFile | None = None
        self.last_check: CheckResult | None = None
        self._releases: dict[ModelRef, _Release] = {}
        self._lock = threading.Lock()
        self.bytes_downloaded = 0
        self.files_downloaded = 0
        self.blobs_reused = 0

    # -- Checker -----------------------------------------------------------------
    def check(self, active: ModelRef | None) -> CheckResult:
        """Refresh TUF, read the signed channel file and decide (cohort, downgrade, hardware, disk).

        Raises:
            VerificationError, ManifestError: refused by TUF or the manifest checks.
            DownloadError: the repository is unreachable.
        """
        self._trust = None
        self._releases.clear()
        trust = self._session()
        channel = trust.read_channel(self.config.channel)
        self.last_channel = channel
        result = check_channel(channel, active, self.config.device_id, lambda ref: self._release(ref).manifest,
                               self._hardware(self.store.root), self.config.disk_cap_bytes, self.store,
                               prefix_cache_bytes=self.config.prefix_cache_mb << 20)
        self.last_check = result
        log.info("event=channel_read channel=%s offered=%s:%d active=%s outcome=%s%s", channel.channel,
                 channel.model, channel.version, active, result.outcome,
                 f" reason={result.reason!r}" if result.reason else "")
        return result

    # -- Downloader --------------------------------------------------------------
    def download(self, target: ModelRef) -> None:
        """Fetch every file of `target` (resuming partials), each verified into `blobs/`."""
        release = self._release(target)
        log.info("event=download_start target=%s files=%d bytes=%d", target, len(release.manifest.files),
                 release.manifest.total_file_bytes)
        with requests.Session() as session:
            if (authorization := self._session().authorization) is not None:
                session.headers["Authorization"] = authorization
            downloader = Downloader(DownloadPolicy(rate_limit_bytes_per_s=self.config.download_rate_limit_bytes_per_s,
                                                   min_rate_bytes_per_s=self.config.download_min_rate_bytes_per_s,
                                                   budget_s=self.config.download_budget_s),
                                    session=session, progress=self._progress)
            for f in release.manifest.files:
                downloader.fetch_blob(ExpectedFile.from_target(release.targets[f.path], release.urls[f.path]),
                                      self.store)
        stats = downloader.stats
        self.bytes_downloaded += stats.bytes_transferred
        self.files_downloaded += stats.files_downloaded
        self.blobs_reused += stats.blobs_reused
        log.info("event=download_done target=%s bytes=%d files=%d reused=%d", target, stats.bytes_transferred,
                 stats.files_downloaded, stats.blobs_reused)

    def verify(self, target: ModelRef) -> bytes:
        """Every file of the signed manifest is a blob of the signed length; returns the signed manifest bytes.

        The sha256 of each blob was checked against its TargetFile before it was adopted
        (and the installer re-hashes the assembled dir), so this checks presence and length.

        Raises:
            VerificationError: a blob is missing or has another length than signed.
        """
        release = self._release(target)
        for f in release.manifest.files:
            info = release.targets[f.path]
            blob = self.store.blob_path(f.sha256)
            try:
                size = blob.stat().st_size
            except FileNotFoundError:
                raise VerificationError(f"{target}: {f.path} is not in the store after its download: "
                                        "the next check downloads it again") from None
            if size != info.length or info.hashes.get("sha256") != f.sha256:
                raise VerificationError(f"{target}: blob of {f.path} has {size} bytes, the signed target "
                                        f"{info.length}: refused")
        return release.manifest_bytes

    def discard(self, target: ModelRef) -> None:
        cached = self._releases.get(target)
        manifest = cached.manifest if cached is not None else self.store.local_manifest(target.name, target.version)
        if manifest is not None:
            self.store.discard_partials(manifest)

    # -- helpers -----------------------------------------------------------------
    def _session(self) -> TrustedRepository:
        if self._trust is None:
            trust = TrustedRepository(self.config.repo_url, self.store.trust_dir)
            trust.refresh(self._running_model_built_at())
            self._trust = trust
        return self._trust

    def _running_model_built_at(self) -> dt.datetime | None:
        """The signed build time of the model `current` serves (TUF verified it when it came)."""
        current = self.store.current()
        if current is None:
            return None
        try:
            built = Manifest.model_validate_json((current / MANIFEST_FILENAME).read_bytes()).created_at
        except (OSError, ValidationError):
            return None
        return built if built.tzinfo is not None else built.replace(tzinfo=dt.UTC)

    def _release(self, target: ModelRef) -> _Release:
        cached = self._releases.get(target)
        if cached is not None:
            return cached
        trust = self._session()
        manifest, data = trust.read_manifest(target.name, target.version)
        targets = trust.artifact_targets(manifest)
        release = _Release(manifest, data, targets, {p: trust.target_url(t) for p, t in targets.items()})
        self._releases[target] = release
        return release


def check_channel(channel: ChannelFile, active: ModelRef | None, device_id: str,
                  load_manifest: Callable[[ModelRef], Manifest], report: HardwareReport,
                  disk_cap_bytes: int | None, store: Store, prefix_cache_bytes: int = 0) -> CheckResult:
    """The update decision over a verified channel file: the offer first, then (only when the
    offer is wanted) the signed manifest from `load_manifest` against this device and its store.

    Raises:
        VerificationError: the manifest is not the one the channel names.
    """
    declined = decide_offer(channel, active, device_id)
    if declined is not None:
        return declined
    target = offered(channel)
    manifest = load_manifest(target)
    room = None
    if disk_cap_bytes is not None:
        room = StoreRoom(protected_bytes=store.protected_usage_bytes(), missing_bytes=store.missing_bytes(manifest))
    return decide_fit(channel, manifest, report, disk_cap_bytes, room, prefix_cache_bytes)

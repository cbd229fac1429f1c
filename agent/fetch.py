"""Check for a release and download it: the steps an update state machine calls.

`check_release` (CHECKING) -> `download_release` (DOWNLOADING + VERIFYING per
file); `fetch_release` runs both. Everything they return was verified by TUF:
the channel file, the manifest (exact signed bytes) and each file's
`TargetFile`. The pure decision (`decide`) takes values and returns a value.

Rules enforced here (design section 2):
- the device installs the channel's version only when its cohort is in;
- a lower version of the active model only with a signed `allow_downgrade`;
- every manifest file is the signed target `models/<n>/<v>/<path>` with the
  same length and sha256 (no mix and match of versions);
- the free disk is checked before the first byte is fetched.
"""

from __future__ import annotations

import enum
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from tuf.api.metadata import TargetFile

from agent.channel import ChannelFile, cohort_bucket, is_in_cohort
from agent.config import AgentConfig
from agent.download import DownloadPolicy, Downloader, DownloadStats, ExpectedFile, partial_path
from agent.errors import DowngradeRefusedError, IncompatibleModelError, StoreError
from agent.manifest import MANIFEST_FILENAME, Manifest
from agent.store import Store
from agent.trust import TrustedRepository

log = logging.getLogger(__name__)


class CheckStatus(str, enum.Enum):
    UP_TO_DATE = "up_to_date"
    NOT_IN_COHORT = "not_in_cohort"
    AVAILABLE = "available"


@dataclass(frozen=True)
class Release:
    """A verified release: the channel that named it, its manifest and its files' targets."""

    channel: ChannelFile
    manifest: Manifest
    manifest_bytes: bytes
    targets: dict[str, TargetFile]  # manifest file path -> signed TargetFile
    urls: dict[str, str]  # manifest file path -> download URL


@dataclass(frozen=True)
class CheckResult:
    status: CheckStatus
    channel: ChannelFile
    active: Manifest | None
    release: Release | None = None  # set when status is AVAILABLE


@dataclass
class FetchResult:
    check: CheckResult
    stats: DownloadStats = field(default_factory=DownloadStats)


def active_manifest(store: Store) -> Manifest | None:
    """The manifest of the model `current` points to, if any.

    Raises:
        StoreError: `current` points to a dir whose manifest does not validate.
    """
    current = store.current()
    if current is None:
        return None
    path = current / MANIFEST_FILENAME
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError as e:
        raise StoreError(f"active manifest {path} is invalid ({e.errors()[0]['msg']}): the store is damaged") from e


def decide(channel: ChannelFile, active: Manifest | None, device_id: str) -> CheckStatus:
    """Pure: what this device does with a verified channel file.

    Raises:
        DowngradeRefusedError: the channel names a lower version of the active model
            without `allow_downgrade`.
    """
    if active is not None and (active.name, active.version) == (channel.model, channel.version):
        return CheckStatus.UP_TO_DATE
    if not is_in_cohort(channel.rollout, device_id):
        return CheckStatus.NOT_IN_COHORT
    if active is not None and active.name == channel.model and channel.version < active.version \
            and not channel.allow_downgrade:
        raise DowngradeRefusedError(
            f"channel {channel.channel} names {channel.model} v{channel.version}, lower than the active "
            f"v{active.version}, without allow_downgrade: refused; an operator rolls back with "
            f"`edge-builder channel set {channel.channel} {channel.model} {channel.version} --allow-downgrade`"
        )
    return CheckStatus.AVAILABLE


def check_release(config: AgentConfig, store: Store, trust: TrustedRepository) -> CheckResult:
    """Refresh TUF, read the channel, decide, and (when available) read the release.

    Raises:
        VerificationError, ManifestError, DowngradeRefusedError: refused by the rules above.
        DownloadError: the repository is unreachable.
    """
    trust.refresh()
    channel = trust.read_channel(config.channel)
    active = active_manifest(store)
    status = decide(channel, active, config.device_id)
    log.info("event=channel_read channel=%s model=%s version=%d percent=%d bucket=%d active=%s decision=%s",
             channel.channel, channel.model, channel.version, channel.rollout.percent,
             cohort_bucket(channel.rollout.salt, config.device_id),
             f"{active.name}:{active.version}" if active else "none", status.value)
    if status is not CheckStatus.AVAILABLE:
        return CheckResult(status=status, channel=channel, active=active)
    manifest, manifest_bytes = trust.read_manifest(channel.model, channel.version)
    targets = trust.artifact_targets(manifest)
    release = Release(channel=channel, manifest=manifest, manifest_bytes=manifest_bytes, targets=targets,
                      urls={p: trust.target_url(t) for p, t in targets.items()})
    return CheckResult(status=status, channel=channel, active=active, release=release)


def bytes_to_fetch(release: Release, store: Store) -> int:
    """Bytes still missing: files without a blob, less what partial files already hold."""
    missing = 0
    for f in release.manifest.files:
        if store.has_blob(f.sha256):
            continue
        partial = partial_path(store, f.sha256)
        have = partial.stat().st_size if partial.is_file() else 0
        missing += max(0, f.size - min(have, f.size))
    return missing


def store_bytes_used(store: Store) -> int:
    total = 0
    for d in (store.blobs_dir, store.staging_dir):
        if d.is_dir():
            total += sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    return total


def check_disk(release: Release, store: Store, disk_cap_bytes: int,
               disk_free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free) -> int:
    """Refuse before downloading when the files cannot fit. Returns the bytes to fetch.

    Raises:
        IncompatibleModelError: not enough free disk, or the store cap would be exceeded.
    """
    m = release.manifest
    need = bytes_to_fetch(release, store)
    free = disk_free_bytes(store.root)
    wanted_free = max(need, m.requirements.min_free_disk_bytes)
    if free < wanted_free:
        raise IncompatibleModelError(
            f"{m.name} v{m.version} needs {wanted_free} bytes of free disk ({need} to download), "
            f"{store.root} has {free}: free disk space or publish a smaller build"
        )
    used = store_bytes_used(store)
    if used + need > disk_cap_bytes:
        raise IncompatibleModelError(
            f"{m.name} v{m.version} needs {need} more bytes, the store uses {used} of its cap "
            f"{disk_cap_bytes} (disk_cap_bytes): raise the cap or remove old models"
        )
    return need


def download_release(release: Release, store: Store, downloader: Downloader) -> DownloadStats:
    """Fetch every file of `release` into `blobs/sha256/` (verified; present blobs are skipped).

    Raises:
        DownloadError: bounded retries exhausted (partials are kept for the next try).
        VerificationError: a file is longer than signed or its hash differs.
    """
    for f in release.manifest.files:
        expected = ExpectedFile.from_target(release.targets[f.path], release.urls[f.path])
        downloader.fetch_blob(expected, store)
    return downloader.stats


def fetch_release(config: AgentConfig, store: Store, trust: TrustedRepository | None = None,
                  downloader: Downloader | None = None,
                  disk_free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free) -> FetchResult:
    """`check_release`, then the disk check and `download_release` when a release is available."""
    store.ensure_layout()
    trust = trust or TrustedRepository(config.repo_url, store.trust_dir)
    check = check_release(config, store, trust)
    if check.release is None:
        return FetchResult(check=check)
    need = check_disk(check.release, store, config.disk_cap_bytes, disk_free_bytes)
    downloader = downloader or Downloader(DownloadPolicy(rate_limit_bytes_per_s=config.download_rate_limit_bytes_per_s))
    log.info("event=download_start model=%s version=%d files=%d bytes=%d", check.release.manifest.name,
             check.release.manifest.version, len(check.release.manifest.files), need)
    stats = download_release(check.release, store, downloader)
    return FetchResult(check=check, stats=stats)

"""The device's view of the TUF repository, through `tuf.ngclient`.

Trust anchor: `<state_dir>/trust/root.json`, provisioned once. ngclient keeps
the verified metadata in the same dir (`root_history/`, `timestamp.json`,
`snapshot.json`, `targets.json`) and moves `root.json` along each verified
root rotation, so the next run starts from the newest trusted root and the
stored versions defeat replays of older metadata (rollback attack).

What an attacker who controls the server or the network can do here: serve
old, expired, unsigned or oversized metadata or targets. ngclient refuses all
of them (signatures, thresholds, versions, expiry, lengths, hashes); this
module turns its exceptions into our `VerificationError` (with ngclient's
reason) and `DownloadError`, and only ever returns bytes that matched a
signed `TargetFile`. Signature, version and expiry checks are ngclient's,
never re-implemented here.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import tuf
import urllib3
from pydantic import ValidationError
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater
from tuf.ngclient._internal.proxy import ProxyEnvironment
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from agent.wire.channel import ChannelFile, channel_target_path
from agent.wire.errors import ClockError, ConfigError, DownloadError, ManifestError, StoreError, VerificationError
from agent.wire.manifest import MANIFEST_FILENAME, Manifest
from agent.wire.paths import check_relative_path

log = logging.getLogger(__name__)

ROOT_FILENAME = "root.json"
# One metadata file must arrive within this long (the largest, root.json, is ~1 KiB per key).
METADATA_DEADLINE_S = 120.0
_ACCESS_REFUSED = (401, 403)
# No release of this agent was made before this instant, so a wall clock that reads earlier was
# never set (a board without an RTC boots at 1970 or at its image's date): TUF would judge every
# expiry on it and accept metadata long expired. Raise it with each release.
CLOCK_FLOOR = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
# The signed build time of the running model is a floor too, less this much skew between the
# build host's clock and the device's.
BUILD_CLOCK_SKEW = dt.timedelta(days=2)


def check_clock(now: dt.datetime, running_model_built_at: dt.datetime | None = None) -> None:
    """Raises ClockError when `now` cannot be a real time: earlier than this agent's release
    or (less `BUILD_CLOCK_SKEW`) than the build of the model this device already runs."""
    floor, what = CLOCK_FLOOR, "this agent's release"
    if running_model_built_at is not None and running_model_built_at - BUILD_CLOCK_SKEW > floor:
        floor, what = running_model_built_at - BUILD_CLOCK_SKEW, "the build of the model it runs (less 2 days)"
    if now < floor:
        raise ClockError(f"the wall clock reads {now:%Y-%m-%d %H:%M:%S} UTC, before {what} ({floor:%Y-%m-%d}): "
                         "it was never set, and TUF cannot judge expiry by it; no metadata is read until time "
                         "sync sets it (check NTP / systemd-timesyncd and the RTC), the current model keeps serving")


# What ngclient raises for a bad repository (RepositoryError) or network (DownloadError,
# its fetcher wraps connection errors into it, but not urllib3 errors raised while
# streaming a body, e.g. a connection dropped mid-file); OSError: writing trust/ failed.
_TUF_ERRORS = (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError, urllib3.exceptions.HTTPError, OSError)


def _translate(e: Exception, what: str) -> Exception:
    """Map a python-tuf exception onto our tree, keeping ngclient's reason."""
    if isinstance(e, tuf_exceptions.DownloadLengthMismatchError):
        return VerificationError(f"{what}: the server sent more bytes than the signed length allows ({e}): "
                                 "refused (endless data attack or broken server)")
    if isinstance(e, tuf_exceptions.DownloadHTTPError) and e.status_code in _ACCESS_REFUSED:
        return DownloadError(f"{what}: the repository refused access (HTTP {e.status_code}): "
                             "check the user:password in repo_url")
    if isinstance(e, (tuf_exceptions.DownloadError, urllib3.exceptions.HTTPError)):
        cause = f"{type(e).__name__}: {e}" + (f" ({e.__cause__})" if e.__cause__ else "")
        return DownloadError(f"{what}: repository unreachable or incomplete: {cause}: "
                             "check repo_url and the network; the next poll retries")
    if isinstance(e, tuf_exceptions.ExpiredMetadataError):
        return VerificationError(f"{what} refused by TUF: {type(e).__name__}: {e}: the wall clock reads "
                                 f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; if it is right, the operator must "
                                 "re-sign (`edge-builder repo refresh`), else fix this device's time sync")
    if isinstance(e, tuf_exceptions.RepositoryError):
        return VerificationError(f"{what} refused by TUF: {type(e).__name__}: {e}")
    return StoreError(f"{what}: cannot write the trust dir: {e}: check free disk and permissions of state_dir")


def split_credentials(repo_url: str) -> tuple[str, str | None]:
    """`repo_url` without its `user:password@`, and the Basic `Authorization` header they make.

    The URL without them is the only one that is built on, logged, journaled or published, so
    the secret never leaves the config; the header goes with every request instead (ngclient's
    urllib3 fetcher would drop a URL's credentials anyway; both clients strip the header on a
    redirect to another host).
    """
    parts = urlsplit(repo_url)
    if parts.username is None and parts.password is None:
        return repo_url, None
    user_pass = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return url, "Basic " + base64.b64encode(user_pass.encode()).decode()


class DeadlineFetcher(Urllib3Fetcher):
    """ngclient's urllib3 fetcher, with a deadline per metadata file.

    Metadata files are small (bounded by ngclient's length limits), but a mirror that
    drips a byte every few seconds never trips the socket timeout. urllib3's `stream()`
    also waits for each whole chunk, so nothing could even look at the clock: the body is
    read with `read1` (whatever has arrived) and, past `deadline_s`, the fetch fails as a
    slow retrieval.
    """

    def __init__(self, socket_timeout: int, deadline_s: float, app_user_agent: str,
                 authorization: str | None = None) -> None:
        super().__init__(socket_timeout=socket_timeout, app_user_agent=app_user_agent)
        self.deadline_s = deadline_s
        if authorization is not None:
            # Urllib3Fetcher takes no headers: rebuild its pool settings with ours added.
            self._proxy_env = ProxyEnvironment(headers={
                "User-Agent": f"{app_user_agent} python-tuf/{tuf.__version__}", "Authorization": authorization})

    def _chunks(self, response: urllib3.response.BaseHTTPResponse) -> Iterator[bytes]:
        deadline = time.monotonic() + self.deadline_s
        try:
            while data := response.read1(self.chunk_size):
                if time.monotonic() > deadline:
                    raise tuf_exceptions.SlowRetrievalError(
                        f"{response.url or 'a metadata file'} took over {self.deadline_s:.0f} s: a mirror this slow"
                        " is failing or hostile")
                yield data
        except urllib3.exceptions.TimeoutError as e:
            response.close()
            raise tuf_exceptions.SlowRetrievalError from e
        except BaseException:
            response.close()  # not back into the pool half read
            raise
        finally:
            response.release_conn()


class TrustedRepository:
    """One TUF session: refresh once, then look up and fetch verified targets."""

    def __init__(self, repo_url: str, trust_dir: Path, timeout_s: float = 30.0,
                 metadata_deadline_s: float = METADATA_DEADLINE_S) -> None:
        """Raises: ConfigError: the device has no provisioned root.json."""
        root = trust_dir / ROOT_FILENAME
        if not root.exists():
            raise ConfigError(f"{root} is missing: provision the device with the repository's root.json "
                              "(www/metadata/root.json on the operator host)")
        url, self.authorization = split_credentials(repo_url.rstrip("/"))
        self.repo_url = url  # without credentials: safe to log
        self._trust_dir = trust_dir
        self.targets_base_url = f"{self.repo_url}/targets/"
        self._fetcher = DeadlineFetcher(int(max(1, timeout_s)), metadata_deadline_s, "edge-agent",
                                        self.authorization)
        try:
            # bootstrap=None: the anchor is the provisioned (and since then ngclient-rotated) root.json.
            self._updater = Updater(metadata_dir=str(trust_dir), metadata_base_url=f"{self.repo_url}/metadata/",
                                    target_base_url=self.targets_base_url, fetcher=self._fetcher, bootstrap=None)
        except (tuf_exceptions.RepositoryError, ValueError) as e:
            raise VerificationError(f"trusted root {root} is invalid: {e}: re-provision the device") from e
        self._consistent = False

    def refresh(self, running_model_built_at: dt.datetime | None = None) -> None:
        """Update root (following rotations), timestamp, snapshot and targets.

        Raises:
            ClockError: the wall clock was never set (nothing is fetched).
            VerificationError: metadata is unsigned, expired, replayed (older version) or oversized.
            DownloadError: the repository cannot be reached.
        """
        check_clock(dt.datetime.now(dt.UTC), running_model_built_at)
        try:
            self._updater.refresh()
        except _TUF_ERRORS as e:
            raise _translate(e, "metadata refresh") from e
        # The trusted root (ngclient just verified and stored it) says whether
        # targets carry hash-prefixed names.
        root = Metadata[Root].from_file(str(self._trust_dir / ROOT_FILENAME)).signed
        self._consistent = bool(root.consistent_snapshot)
        log.info("event=tuf_refreshed repo=%s", self.repo_url)

    def target_info(self, path: str) -> TargetFile:
        """The signed `TargetFile` of `path`.

        Raises:
            VerificationError: `path` is unsafe or not listed in signed metadata.
        """
        try:
            check_relative_path(path)
        except ValueError as e:
            raise VerificationError(f"refusing target path {path!r}: {e}") from e
        try:
            info = self._updater.get_targetinfo(path)
        except _TUF_ERRORS as e:
            raise _translate(e, f"lookup of {path}") from e
        if info is None:
            raise VerificationError(f"target {path} is not in the signed targets metadata of {self.repo_url}")
        return info

    def target_url(self, info: TargetFile) -> str:
        """The URL of a target: with consistent snapshots its basename is `<sha256>.<name>`."""
        path = info.path
        if self._consistent:
            dirname, sep, basename = path.rpartition("/")
            path = f"{dirname}{sep}{next(iter(info.hashes.values()))}.{basename}"
        return self.targets_base_url + quote(path)  # a signed name may hold '#', '?', '%' or spaces

    def fetch_target_bytes(self, info: TargetFile) -> bytes:
        """Download a small target into memory and verify it against `info`.

        Raises:
            VerificationError: more bytes than signed, or wrong length/hash.
            DownloadError: unreachable.
        """
        try:
            data = self._fetcher.download_bytes(self.target_url(info), info.length)
            info.verify_length_and_hashes(data)
        except _TUF_ERRORS as e:
            raise _translate(e, f"target {info.path}") from e
        return data

    def read_channel(self, channel: str) -> ChannelFile:
        """The verified `channels/<channel>.json`.

        Raises:
            VerificationError: missing, tampered, or not a valid channel file.
        """
        info = self.target_info(channel_target_path(channel))
        data = self.fetch_target_bytes(info)
        try:
            parsed = ChannelFile.model_validate_json(data)
        except ValidationError as e:
            raise VerificationError(f"signed channel file {info.path} is invalid: {e.errors()[0]['msg']}") from e
        if parsed.channel != channel:
            raise VerificationError(f"signed channel file {info.path} names channel {parsed.channel!r}")
        return parsed

    def read_manifest(self, model: str, version: int) -> tuple[Manifest, bytes]:
        """The verified manifest of `model` v`version`, and its exact bytes.

        Raises:
            VerificationError: missing or tampered; ManifestError: signed but invalid
            (an absolute or `..` path, duplicates, ...) or for another model/version.
        """
        info = self.target_info(f"models/{model}/{version}/{MANIFEST_FILENAME}")
        data = self.fetch_target_bytes(info)
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as e:
            first = e.errors()[0]
            raise ManifestError(f"signed manifest {info.path} is invalid at "
                                f"{'.'.join(map(str, first['loc']))}: {first['msg']}: refused") from e
        if (manifest.name, manifest.version) != (model, version):
            raise ManifestError(f"signed manifest {info.path} describes {manifest.name} v{manifest.version}: refused")
        return manifest, data

    def artifact_targets(self, manifest: Manifest) -> dict[str, TargetFile]:
        """The signed `TargetFile` of every manifest file, checked against the manifest.

        Every file must be the target `models/<name>/<version>/<path>` with the
        manifest's length and sha256: a manifest cannot point at another
        version's file (mix and match).

        Raises:
            VerificationError: a file is not a target of this version or differs from it.
        """
        out: dict[str, TargetFile] = {}
        for f in manifest.files:
            info = self.target_info(f"{manifest.target_prefix()}/{f.path}")
            if info.length != f.size or info.hashes.get("sha256") != f.sha256:
                raise VerificationError(
                    f"{manifest.name} v{manifest.version}: manifest file {f.path} ({f.size} bytes, sha256 "
                    f"{f.sha256[:12]}...) differs from its signed target ({info.length} bytes, sha256 "
                    f"{info.hashes.get('sha256', '?')[:12]}...): refused (mix and match)"
                )
            out[f.path] = info
        return out

"""The artifact downloader: streaming, resumable, bounded, verified against TUF.

What is trusted: only the expected length and hashes, which come from a
TUF-verified `TargetFile`. The server (or anything on the path) is not: it may
stall (timeouts on every request), drop the connection (the partial file in
`staging/` is resumed with `Range`, also after an agent restart), send endless
data (refused as soon as one byte more than the signed length arrives), or
send other bytes (refused by the hash check; the partial is deleted so the
next try starts clean). Only a file whose length and hashes match is moved
into `blobs/sha256/`; a blob already there is never fetched again.

Crash safety: the partial file is named after the expected sha256, so after
`kill -9` the next run finds it and resumes from its size; the blob appears
through one rename(2) after fsync (`Store.adopt_blob`). Writeback to disk is
started every few MiB while the download runs, so that fsync is short.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import requests
import urllib3
from tuf.api.metadata import TargetFile

from agent.store.store import Store
from agent.system.libc import start_writeback
from agent.wire.errors import DownloadError, StoreError, TransientDownloadError, VerificationError

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class ExpectedFile:
    """What a download must produce: from a TUF-verified `TargetFile` only."""

    url: str
    length: int
    hashes: dict[str, str]  # algorithm -> hex digest; sha256 is required (the blob name)

    @classmethod
    def from_target(cls, info: TargetFile, url: str) -> ExpectedFile:
        if "sha256" not in info.hashes:
            raise VerificationError(
                f"target {info.path} has no sha256 hash in signed metadata (has {sorted(info.hashes)}): "
                "republish it with edge-builder publish"
            )
        return cls(url=url, length=info.length, hashes=dict(info.hashes))

    @property
    def sha256(self) -> str:
        return self.hashes["sha256"]


@dataclass(frozen=True)
class DownloadPolicy:
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_attempts: int = 5  # consecutive failures without progress before giving up
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    rate_limit_bytes_per_s: int | None = None
    chunk_bytes: int = 1 << 20
    # Start the disk writes every this many bytes, so the fsync before the rename waits
    # for the last few MiB, not the whole file (measured: 0.27 -> 0.19 s for 200 MiB).
    writeback_bytes: int = 8 << 20
    # Slow retrieval: a mirror that drips bytes never trips the read timeout. An attempt
    # slower than this over a whole window is abandoned (and retried, resuming), and the
    # whole pass stops at its budget, its partials kept, so the next check runs on time.
    min_rate_bytes_per_s: int = 1024
    min_rate_window_s: float = 30.0
    budget_s: float = 3600.0


@dataclass
class DownloadStats:
    bytes_transferred: int = 0
    requests: int = 0
    range_requests: int = 0
    retries: int = 0
    files_downloaded: int = 0
    blobs_reused: int = 0
    per_file_bytes: dict[str, int] = field(default_factory=dict)


class _Hashers:
    """The running hashes of the partial file, kept across attempts in one process.

    Hashing runs on a worker thread (hashlib releases the GIL), overlapping
    with the socket reads and file writes of the main thread; the queue is
    bounded so at most `_QUEUE_CHUNKS` chunks wait in memory.
    """

    _QUEUE_CHUNKS = 8

    def __init__(self, algorithms: list[str]) -> None:
        self._algorithms = algorithms
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=self._QUEUE_CHUNKS)
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        self.drain()
        self.objects = {a: hashlib.new(a) for a in self._algorithms}
        self.offset = 0

    def _work(self) -> None:
        while True:
            chunk = self._queue.get()
            try:
                if chunk is None:
                    return
                for h in self.objects.values():
                    h.update(chunk)
            finally:
                self._queue.task_done()

    def update(self, data: bytes) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="download-hash", daemon=True)
            self._thread.start()
        self._queue.put(data)
        self.offset += len(data)

    def drain(self) -> None:
        """Wait until every queued chunk is hashed and stop the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def digests(self) -> dict[str, str]:
        self.drain()
        return {a: h.hexdigest() for a, h in self.objects.items()}

    def catch_up(self, path: Path, offset: int) -> None:
        """Hash the first `offset` bytes of a partial file left by an earlier run."""
        if self.offset == offset:
            return
        self.reset()
        with open(path, "rb") as f:
            while self.offset < offset:
                chunk = f.read(min(1 << 20, offset - self.offset))
                if not chunk:
                    break
                self.update(chunk)


class Downloader:
    """Fetch verified files into a `Store`. One instance may serve many files."""

    def __init__(self, policy: DownloadPolicy | None = None, session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 progress: Callable[[int], None] | None = None) -> None:
        """`progress(n)` is called with each chunk's byte count (a TTY progress bar)."""
        self.policy = policy or DownloadPolicy()
        self.session = session or requests.Session()
        self.stats = DownloadStats()
        self._sleep = sleep
        self._progress = progress
        self._deadline = time.monotonic() + self.policy.budget_s  # this downloader serves one pass

    def partial_path(self, store: Store, expected: ExpectedFile) -> Path:
        return partial_path(store, expected.sha256)

    def fetch_blob(self, expected: ExpectedFile, store: Store) -> Path:
        """Return the blob path of `expected`, downloading it unless present.

        Raises:
            DownloadError: the server could not deliver it within the bounded retries.
            VerificationError: the server sent more bytes than the signed length, or
                bytes whose hash differs from the signed one.
            StoreError: the disk filled up mid-file (the partial is deleted).
        """
        if store.has_blob(expected.sha256):
            self.stats.blobs_reused += 1
            log.info("event=blob_reused sha256=%s", expected.sha256[:12])
            return store.blob_path(expected.sha256)
        store.staging_dir.mkdir(parents=True, exist_ok=True)
        partial = self.partial_path(store, expected)
        hashers = _Hashers(sorted(expected.hashes))
        try:
            failures = 0
            while True:
                offset = partial.stat().st_size if partial.exists() else 0
                if offset > expected.length:
                    partial.unlink()  # cannot be ours: start again
                    offset = 0
                if offset == expected.length:
                    break
                try:
                    self._attempt(expected, partial, offset, hashers)
                except OSError as e:
                    if e.errno not in _DISK_FULL:
                        raise
                    self._give_back_space(expected, partial, store, e)
                except TransientDownloadError as e:
                    progressed = (partial.stat().st_size if partial.exists() else 0) > offset
                    if progressed:
                        failures = 0  # bounded anyway: every retry that counts as progress adds bytes
                    failures += 1
                    self._check_budget(expected, partial)
                    if failures >= self.policy.max_attempts:
                        raise DownloadError(
                            f"download of {expected.url} failed {failures} times in a row ({e}); "
                            f"{partial.stat().st_size if partial.exists() else 0} of {expected.length} bytes kept in "
                            f"{partial} for the next try: check repo_url and the network"
                        ) from e
                    delay = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** (failures - 1))
                    delay *= 0.5 + random.random() / 2  # jitter: a fleet does not retry in lockstep
                    self.stats.retries += 1
                    log.warning("event=download_retry url=%s attempt=%d delay_s=%.2f reason=%s", expected.url,
                                failures, delay, e)
                    self._sleep(delay)
            hashers.catch_up(partial, expected.length)
            self._verify(expected, partial, hashers)
        finally:
            hashers.drain()  # never leave the worker thread behind, also on errors
        blob = store.adopt_blob(partial, expected.sha256)
        self.stats.files_downloaded += 1
        log.info("event=blob_verified sha256=%s bytes=%d", expected.sha256[:12], expected.length)
        return blob

    @staticmethod
    def _give_back_space(expected: ExpectedFile, partial: Path, store: Store, error: OSError) -> NoReturn:
        """Raises:
            StoreError: always. The partial goes: on a full disk it holds the space the journal,
                the outbox and the model being served need more than a resume would.
        """
        have = partial.stat().st_size if partial.exists() else 0
        partial.unlink(missing_ok=True)
        raise StoreError(
            f"disk full while downloading {expected.url} ({have} of {expected.length} bytes written; the partial "
            f"file is deleted to give the space back): free space under {store.root} or lower disk_cap_bytes"
        ) from error

    def _check_budget(self, expected: ExpectedFile, partial: Path) -> None:
        """Raises:
            DownloadError: this pass has used its whole budget; the partial stays for the next.
        """
        if time.monotonic() > self._deadline:
            have = partial.stat().st_size if partial.exists() else 0
            raise DownloadError(
                f"download of {expected.url} stopped: the pass used its budget of {self.policy.budget_s:.0f} s "
                f"(download_budget_s) with {have} of {expected.length} bytes, kept in {partial} for the next check;"
                " a mirror this slow is failing or hostile: check repo_url")

    def _attempt(self, expected: ExpectedFile, partial: Path, offset: int, hashers: _Hashers) -> None:
        # identity: the hash is over the stored bytes, so no transparent gzip from a proxy/CDN.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        self.stats.requests += 1
        if offset:
            self.stats.range_requests += 1
        try:
            response = self.session.get(expected.url, headers=headers, stream=True,
                                        timeout=(self.policy.connect_timeout_s, self.policy.read_timeout_s))
        except requests.RequestException as e:
            raise TransientDownloadError(f"{type(e).__name__}: {e}") from e
        with response:
            if response.status_code in _RETRYABLE_STATUS:
                raise TransientDownloadError(f"HTTP {response.status_code}")
            if response.status_code == 416:
                partial.unlink(missing_ok=True)
                raise TransientDownloadError("HTTP 416: the partial file does not fit the server's file; restarting")
            if response.status_code in (401, 403):
                raise DownloadError(f"GET {expected.url} answered HTTP {response.status_code}: the repository "
                                    "refused access: check the user:password in repo_url")
            if response.status_code not in (200, 206):
                raise DownloadError(f"GET {expected.url} answered HTTP {response.status_code}: "
                                    "the repository lacks a file its signed metadata lists; tell the operator")
            if response.status_code == 206:
                start = _content_range_start(response.headers.get("Content-Range", ""))
                if start != offset:
                    partial.unlink(missing_ok=True)
                    raise TransientDownloadError(f"asked for bytes from {offset}, server sent from {start}; restarting")
            elif offset:
                offset = 0  # the server ignored Range: take the whole body from the start
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and offset + int(declared) > expected.length:
                partial.unlink(missing_ok=True)
                raise VerificationError(
                    f"{expected.url}: server declares {offset + int(declared)} bytes but the signed length is "
                    f"{expected.length}: refused (endless data attack or wrong file)"
                )
            self._stream(response, expected, partial, offset, hashers)

    def _stream(self, response: requests.Response, expected: ExpectedFile, partial: Path, offset: int,
                hashers: _Hashers) -> None:
        if offset == 0:
            hashers.reset()
        else:
            hashers.catch_up(partial, offset)
        received = 0
        started = time.monotonic()
        window_start, window_bytes = started, 0
        rate = self.policy.rate_limit_bytes_per_s
        chunk_bytes = self.policy.chunk_bytes if rate is None else max(4096, min(self.policy.chunk_bytes, rate // 10))
        if not partial.exists():
            partial.touch(mode=0o600)
        network_error: Exception | None = None
        with open(partial, "r+b") as out:
            out.truncate(offset)
            out.seek(offset)
            written_back = offset
            try:
                while True:
                    try:
                        # read1: what has arrived, not a whole chunk: a dripping mirror would keep a
                        # full-chunk read waiting forever, with every byte inside the read timeout.
                        chunk = response.raw.read1(chunk_bytes, decode_content=False)
                    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
                        network_error = e
                        break
                    if not chunk:
                        break
                    if offset + received + len(chunk) > expected.length:
                        out.close()
                        partial.unlink(missing_ok=True)
                        raise VerificationError(
                            f"{expected.url}: server sent more than the signed length of {expected.length} "
                            "bytes: refused (endless data attack or wrong file)"
                        )
                    out.write(chunk)  # a write error is not retried: a full disk is a StoreError above
                    hashers.update(chunk)
                    received += len(chunk)
                    if offset + received - written_back >= self.policy.writeback_bytes:
                        out.flush()
                        start_writeback(out.fileno(), written_back, offset + received - written_back)
                        written_back = offset + received
                    self.stats.bytes_transferred += len(chunk)
                    if self._progress is not None:
                        self._progress(len(chunk))
                    now = time.monotonic()
                    window_bytes += len(chunk)
                    if now - window_start >= self.policy.min_rate_window_s:
                        if window_bytes / (now - window_start) < self.policy.min_rate_bytes_per_s:
                            raise TransientDownloadError(
                                f"slow retrieval: {window_bytes / (now - window_start):.0f} B/s over the last "
                                f"{now - window_start:.0f} s, under the minimum of "
                                f"{self.policy.min_rate_bytes_per_s} B/s")
                        window_start, window_bytes = now, 0
                    if now > self._deadline:
                        raise TransientDownloadError(f"the download pass ran out of its {self.policy.budget_s:.0f} s")
                    if rate is not None:
                        ahead_s = received / rate - (time.monotonic() - started)
                        if ahead_s > 0:
                            self._sleep(ahead_s)
            finally:
                self.stats.per_file_bytes[expected.sha256] = (
                    self.stats.per_file_bytes.get(expected.sha256, 0) + received)
        if network_error is not None:
            raise TransientDownloadError(
                f"connection lost after {received} bytes: {type(network_error).__name__}") from network_error
        if offset + received < expected.length:
            raise TransientDownloadError(f"stream ended after {offset + received} of {expected.length} bytes")

    @staticmethod
    def _verify(expected: ExpectedFile, partial: Path, hashers: _Hashers) -> None:
        size = partial.stat().st_size
        digests = hashers.digests()
        for algorithm, want in expected.hashes.items():
            got = digests[algorithm]
            if size != expected.length or got != want:
                partial.unlink(missing_ok=True)
                raise VerificationError(
                    f"{expected.url}: {size} bytes with {algorithm} {got[:16]}... do not match the signed "
                    f"{expected.length} bytes {algorithm} {want[:16]}...: refused and deleted (tampered or "
                    "corrupted file on the server)"
                )


def partial_path(store: Store, sha256: str) -> Path:
    """Where the partial download of blob `sha256` lives (survives restarts)."""
    return store.partial_path(sha256)


def _content_range_start(header: str) -> int | None:
    # "bytes 100-199/200"
    try:
        unit, _, rest = header.partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None

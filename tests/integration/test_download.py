"""The resumable downloader against the real server: drops, restarts, outages, caps."""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.store.store import Store
from agent.update.download import Downloader, DownloadPolicy, ExpectedFile, partial_path
from agent.wire.channel import ChannelFile
from agent.wire.errors import DownloadError, VerificationError
from testkit.agents import make_real_artifact
from testkit.artifacts import new_repo, provision_device, serving, write_agent_toml
from testkit.env import subprocess_env

SIZE = 300_000


def _blob(tmp_path: Path, size: int = SIZE) -> tuple[Path, bytes]:
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(size)
    (www / "blob.bin").write_bytes(data)
    return www, data


def _expected(url: str, data: bytes) -> ExpectedFile:
    return ExpectedFile(url=f"{url}/blob.bin", length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "dev")
    store.ensure_layout()
    return store


def test_connection_dropped_mid_file_resumes_with_range(tmp_path: Path) -> None:
    www, data = _blob(tmp_path)
    store = _store(tmp_path)
    with serving(www) as (url, faults):
        faults.drop_after_bytes, faults.drop_times, faults.drop_path = 70_000, 2, "blob.bin"
        sleeps: list[float] = []
        progress: list[int] = []
        downloader = Downloader(DownloadPolicy(backoff_initial_s=0.01), sleep=sleeps.append, progress=progress.append)
        blob = downloader.fetch_blob(_expected(url, data), store)
        assert sum(progress) == SIZE
        assert blob.read_bytes() == data
        assert faults.range_requests("blob.bin") == 2
        ranges = [r for p, r in faults.requests if r]
        assert ranges == ["bytes=70000-", "bytes=140000-"]
        # Every byte crossed the wire once: resumed, not restarted.
        assert downloader.stats.bytes_transferred == SIZE
        assert downloader.stats.retries == 2 and len(sleeps) == 2
        assert list(store.staging_dir.iterdir()) == []


def test_disk_writeback_starts_while_downloading_and_after_a_resume(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The flush to disk runs along with the download, over each byte once, from every resume point."""
    import agent.system.libc
    import agent.update.download

    if sys.platform.startswith("linux"):
        assert agent.system.libc._sync_file_range() is not None  # the real syscall is in use here
    started: list[tuple[int, int]] = []
    real = agent.system.libc.start_writeback
    monkeypatch.setattr(agent.update.download, "start_writeback",
                        lambda fd, offset, length: (started.append((offset, length)), real(fd, offset, length)))
    www, data = _blob(tmp_path)
    store = _store(tmp_path)
    with serving(www) as (url, faults):
        faults.drop_after_bytes, faults.drop_times, faults.drop_path = 100_000, 1, "blob.bin"
        policy = DownloadPolicy(backoff_initial_s=0.01, writeback_bytes=32_768, chunk_bytes=16_384)
        blob = Downloader(policy, sleep=lambda s: None).fetch_blob(_expected(url, data), store)
    assert blob.read_bytes() == data
    assert started[0][0] == 0 and all(length >= 32_768 for _, length in started)
    resumed = [i for i, (offset, _) in enumerate(started) if offset == 100_000]
    assert len(resumed) == 1, started  # the second attempt starts its ranges where the first one stopped
    for i, ((offset, length), (next_offset, _)) in enumerate(itertools.pairwise(started)):
        if i + 1 not in resumed:
            assert offset + length == next_offset, started  # contiguous: no byte skipped or flushed twice
        else:
            assert offset + length <= next_offset
    assert started[-1][0] + started[-1][1] > SIZE - 32_768  # only a short tail left for the final fsync


def test_present_blob_is_not_fetched_again(tmp_path: Path) -> None:
    www, data = _blob(tmp_path)
    store = _store(tmp_path)
    with serving(www) as (url, faults):
        Downloader().fetch_blob(_expected(url, data), store)
        second = Downloader()
        second.fetch_blob(_expected(url, data), store)
        assert len(faults.requests) == 1 and second.stats.blobs_reused == 1


def test_server_down_bounded_retries_with_backoff_then_later_success(tmp_path: Path) -> None:
    www, data = _blob(tmp_path)
    store = _store(tmp_path)
    with serving(www) as (url, _):
        port = url.rsplit(":", 1)[1]
    sleeps: list[float] = []
    policy = DownloadPolicy(max_attempts=4, backoff_initial_s=1.0, backoff_max_s=3.0, connect_timeout_s=1.0)
    downloader = Downloader(policy, sleep=sleeps.append)
    with pytest.raises(DownloadError, match="failed 4 times in a row"):
        downloader.fetch_blob(_expected(url, data), store)
    assert len(sleeps) == 3 and downloader.stats.requests == 4
    # Exponential (1, 2, 4 capped at 3) with jitter in [0.5, 1.0] of each step.
    for delay, step in zip(sleeps, [1.0, 2.0, 3.0], strict=False):
        assert 0.5 * step <= delay <= step
    with serving(www, port=int(port)) as (url2, _):
        assert Downloader(policy).fetch_blob(_expected(url2, data), store).read_bytes() == data


def test_rate_cap_paces_the_download(tmp_path: Path) -> None:
    www, data = _blob(tmp_path)
    store = _store(tmp_path)
    with serving(www) as (url, _):
        sleeps: list[float] = []
        rate = 100_000
        # The sleep is recorded, not slept: the pacing the cap asks for is what is checked.
        downloader = Downloader(DownloadPolicy(rate_limit_bytes_per_s=rate), sleep=sleeps.append)
        downloader.fetch_blob(_expected(url, data), store)
        assert sum(sleeps) >= 0.8 * SIZE / rate
        uncapped: list[float] = []
        Downloader(sleep=uncapped.append).fetch_blob(_expected(url, data), _store(tmp_path / "b"))
        assert uncapped == []


def test_wrong_declared_length_and_stale_partial(tmp_path: Path) -> None:
    www, data = _blob(tmp_path)
    store = _store(tmp_path)
    with serving(www) as (url, _):
        short = ExpectedFile(url=f"{url}/blob.bin", length=SIZE - 1,
                             hashes={"sha256": hashlib.sha256(data).hexdigest()})
        with pytest.raises(VerificationError, match="server declares 300000 bytes but the signed length is 299999"):
            Downloader().fetch_blob(short, store)
        # A partial longer than the file (left by something else) is discarded, not trusted.
        expected = _expected(url, data)
        partial_path(store, expected.sha256).write_bytes(b"x" * (SIZE + 5))
        assert Downloader().fetch_blob(expected, store).read_bytes() == data
        # A partial with wrong bytes is resumed, fails the hash, and is deleted.
        partial_path(store, expected.sha256).write_bytes(b"y" * 1000)
        store.blob_path(expected.sha256).unlink()
        with pytest.raises(VerificationError, match="do not match the signed"):
            Downloader().fetch_blob(expected, store)
        assert not partial_path(store, expected.sha256).exists()
        assert Downloader().fetch_blob(expected, store).read_bytes() == data


def test_agent_killed_mid_download_resumes_after_restart(tmp_path: Path, tiny_raw: Path) -> None:
    """kill -9 of a real `edge-agent update --once`; the next run resumes with Range.

    The artifact is a real tiny model (update --once loads it and runs its canary) plus a
    3 MB file of random bytes that the rate-limited download is killed in."""
    size = 3_000_000
    repo = new_repo(tmp_path / "repo")
    payload = os.urandom(size)
    repo.publish(make_real_artifact(tiny_raw, tmp_path / "art", "tiny", 1, extra_files={"pad.bin": payload}))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        config, store = provision_device(tmp_path / "dev", repo, url)
        toml = write_agent_toml(tmp_path / "agent.toml", config)
        sha = hashlib.sha256(payload).hexdigest()
        part = partial_path(store, sha)
        env = subprocess_env(EDGE_AGENT_DOWNLOAD_RATE_LIMIT_BYTES_PER_S="500000")
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "update", "--once", "--config", str(toml)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (part.exists() and part.stat().st_size >= 300_000):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the partial download never grew"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kept = part.stat().st_size
        assert 0 < kept < size and store.current() is None
        before = len(faults.requests)
        done = subprocess.run([sys.executable, "-m", "agent.cli", "update", "--once", "--config", str(toml)],
                              env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        model_gets = [(p, r) for p, r in faults.requests[before:] if p.endswith("pad.bin")]
        assert len(model_gets) == 1 and model_gets[0][1] is not None
        assert int(model_gets[0][1].removeprefix("bytes=").rstrip("-")) >= 300_000
        assert (store.current() / "pad.bin").read_bytes() == payload

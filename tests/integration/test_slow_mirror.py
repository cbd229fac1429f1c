"""A mirror that drips: artifacts and TUF metadata sent one byte at a time, never slow enough
for a read timeout. The download attempt is abandoned under the minimum rate, the pass stops
at its budget with the partial kept, and the next pass resumes from it; a metadata file past
its deadline is a slow retrieval, and the pass after it runs as usual.

The deadlines are scaled down (seconds, not minutes) so the test does not wait an hour.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from agent.store.store import Store
from agent.update.download import Downloader, DownloadPolicy, ExpectedFile, partial_path
from agent.update.trust import TrustedRepository
from agent.wire.channel import ChannelFile
from agent.wire.errors import DownloadError
from testkit.artifacts import make_artifact, new_repo, provision_device, serving

SIZE = 50_000


def test_a_dripping_artifact_stops_the_pass_at_its_budget_and_the_next_resumes(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(SIZE)
    (www / "blob.bin").write_bytes(data)
    store = Store(tmp_path / "dev")
    store.ensure_layout()
    expected = ExpectedFile(url="", length=SIZE, hashes={"sha256": hashlib.sha256(data).hexdigest()})
    policy = DownloadPolicy(min_rate_bytes_per_s=1000, min_rate_window_s=1.0, budget_s=4.0,
                            backoff_initial_s=0.05, backoff_max_s=0.1)
    with serving(www) as (url, faults):
        expected = ExpectedFile(url=f"{url}/blob.bin", length=SIZE, hashes=expected.hashes)
        faults.drip_path, faults.drip_interval_s, faults.drip_after_bytes = "blob.bin", 0.1, 5_000
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"used its budget of 4 s .*kept in .* for the next check"):
            Downloader(policy).fetch_blob(expected, store)
        elapsed = time.monotonic() - started
        kept = partial_path(store, expected.sha256).stat().st_size
        slow_attempts = faults.range_requests("blob.bin") + 1
        assert 5_000 <= kept < SIZE and not store.has_blob(expected.sha256)
        assert slow_attempts >= 2  # each slow attempt was abandoned and resumed, until the budget ran out
        assert elapsed < 4.0 + 3 * 1.0 + 2  # budget, plus at most the windows and backoffs in flight

        faults.drip_path = None  # the mirror recovered: the next pass resumes from the partial
        before = len(faults.requests)
        blob = Downloader(policy).fetch_blob(expected, store)
        assert blob.read_bytes() == data
        assert faults.requests[before][1] == f"bytes={kept}-"


def test_dripping_metadata_is_a_slow_retrieval_and_the_next_pass_runs(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    repo.publish(make_artifact(tmp_path / "art", "tiny", 1))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        _, store = provision_device(tmp_path / "dev", repo, url)
        faults.drip_path, faults.drip_interval_s = "timestamp.json", 0.2  # ~1 KiB: minutes at this rate
        started = time.monotonic()
        with pytest.raises(DownloadError, match="SlowRetrievalError"):
            TrustedRepository(url, store.trust_dir, metadata_deadline_s=2.0).refresh()
        assert time.monotonic() - started < 2.0 + 2 * 0.2 + 5
        faults.drip_path = None
        trust = TrustedRepository(url, store.trust_dir, metadata_deadline_s=2.0)
        trust.refresh()
        assert trust.read_channel("stable").version == 1

"""Benchmark: the device downloader vs curl over loopback, and delta-update bytes.

Both clients fetch the same file from the same `edge-builder serve` process
(a separate process, so the server never shares the downloader's GIL), in
alternating order, n times each. The downloader's time includes what curl
does not do: sha256 verification against the signed length/hash and the
rename into blobs/sha256/.

    python bench/download.py [--size-mb 200] [-n 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import requests  # noqa: E402
import tuf  # noqa: E402
import urllib3  # noqa: E402

from agent.store.store import Store  # noqa: E402
from agent.update.download import Downloader, ExpectedFile  # noqa: E402
from agent.wire.channel import ChannelFile  # noqa: E402
from builder.demo.ports import free_port  # noqa: E402


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _start_server(www: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "serve", str(www), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("serve did not start") from None
            time.sleep(0.05)


def _settle_disk() -> None:
    """Let the disk finish the last run's writeback and discards before the next run starts.

    Without this, whichever client runs next pays for them: measured 0.19 s for 200 MiB
    on a quiet disk, 0.4-0.7 s right after another run's writes.
    """
    os.sync()
    time.sleep(1.0)


def bench_throughput(work: Path, size_mb: int, n: int) -> None:
    www = work / "www"
    www.mkdir()
    size = size_mb * 1024 * 1024
    blob = www / "big.bin"
    digest = hashlib.sha256()
    with open(blob, "wb") as f:
        for _ in range(size_mb):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            f.write(chunk)
    proc, url = _start_server(www)
    curl_s: list[float] = []
    curl_verify_s: list[float] = []
    ours_s: list[float] = []
    try:
        expected = ExpectedFile(url=f"{url}/big.bin", length=size, hashes={"sha256": digest.hexdigest()})
        for i in range(n):
            order = ("curl", "ours", "curl+verify") if i % 2 == 0 else ("curl+verify", "ours", "curl")
            for which in order:
                out = work / f"run-{which}"
                out.mkdir()
                if which == "curl":
                    t0 = time.perf_counter()
                    subprocess.run(["curl", "-sS", "-o", str(out / "big.bin"), expected.url], check=True)
                    curl_s.append(time.perf_counter() - t0)
                    assert (out / "big.bin").stat().st_size == size
                elif which == "curl+verify":
                    # The same work as the downloader in shell: fetch, hash, fsync.
                    t0 = time.perf_counter()
                    subprocess.run(["curl", "-sS", "-o", str(out / "big.bin"), expected.url], check=True)
                    got = subprocess.run(["sha256sum", str(out / "big.bin")], check=True, capture_output=True,
                                         text=True).stdout.split()[0]
                    subprocess.run(["sync", str(out / "big.bin")], check=True)
                    curl_verify_s.append(time.perf_counter() - t0)
                    assert got == expected.sha256
                else:
                    store = Store(out)
                    store.ensure_layout()
                    t0 = time.perf_counter()
                    Downloader().fetch_blob(expected, store)
                    ours_s.append(time.perf_counter() - t0)
                shutil.rmtree(out)
                _settle_disk()
    finally:
        proc.kill()
        proc.wait()
    mbps = lambda s: size / s / 1e6  # noqa: E731
    c_med, o_med, v_med = (statistics.median(x) for x in (curl_s, ours_s, curl_verify_s))
    c_p90, o_p90, v_p90 = (_p90(x) for x in (curl_s, ours_s, curl_verify_s))
    print(f"\n## throughput: {size_mb} MiB over loopback, n={n} each (rotating order)\n")
    print("downloader = requests stream + sha256 (worker thread) + write + fsync + rename into blobs/;")
    print("curl = `curl -o FILE` (no hash, no fsync); curl+verify = curl, then sha256sum, then sync FILE\n")
    print("| metric | curl | curl+verify | edge-agent downloader | downloader/curl | downloader/curl+verify |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| MB/s at the median time | {mbps(c_med):.0f} | {mbps(v_med):.0f} | {mbps(o_med):.0f} | "
          f"{mbps(o_med) / mbps(c_med):.2f} | {mbps(o_med) / mbps(v_med):.2f} |")
    print(f"| MB/s at the p90 time | {mbps(c_p90):.0f} | {mbps(v_p90):.0f} | {mbps(o_p90):.0f} | "
          f"{mbps(o_p90) / mbps(c_p90):.2f} | {mbps(o_p90) / mbps(v_p90):.2f} |")
    print(f"| median time s | {c_med:.3f} | {v_med:.3f} | {o_med:.3f} | | |")


def bench_delta(work: Path) -> None:
    from builder.release.repository import RepoSettings, TufRepo
    from testkit.artifacts import make_artifact

    repo = TufRepo.init(work / "repo", RepoSettings())
    files = {"model.onnx.data": os.urandom(40 * 1024 * 1024), "model.onnx": os.urandom(200_000),
             "tokenizer.json": os.urandom(3_000_000), "genai_config.json": b'{"search": {"max_length": 256}}'}
    repo.publish(make_artifact(work / "v1", "bench", 1, files))
    repo.set_channel(ChannelFile(channel="stable", model="bench", version=1))
    changed = b'{"search": {"max_length": 512}}'
    repo.publish(make_artifact(work / "v2", "bench", 2, {**files, "genai_config.json": changed}))
    proc, url = _start_server(repo.www_dir)
    try:
        # The files are random bytes, not a loadable model: the update pass runs with the
        # no-load activator test double, since only the bytes transferred are measured here.
        from testkit.artifacts import provision_device, run_update_once_unloaded

        config, store = provision_device(work / "device", repo, url)
        first = run_update_once_unloaded(config, store)
        repo.set_channel(ChannelFile(channel="stable", model="bench", version=2))
        second = run_update_once_unloaded(config, store)
    finally:
        proc.kill()
        proc.wait()
    total = sum(len(v) for v in files.values())
    print("\n## delta update: v1 -> v2 where only genai_config.json changed\n")
    print("| metric | full install (v1) | update (v2) | changed file | update/changed |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| artifact bytes downloaded | {first.bytes_downloaded} | {second.bytes_downloaded} | {len(changed)} | "
          f"{second.bytes_downloaded / len(changed):.2f} |")
    print(f"| files downloaded / reused | {first.files_downloaded} / {first.blobs_reused} | "
          f"{second.files_downloaded} / {second.blobs_reused} | 1 | |")
    print(f"(artifact total {total} bytes; metadata/manifest/channel bytes are not counted above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    curl_version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"python {platform.python_version()}, requests {requests.__version__}, urllib3 {urllib3.__version__}, "
          f"tuf {tuf.__version__}, {curl_version.split(' (')[0]}, {os.cpu_count()} CPUs, {platform.machine()}")
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        for sub in ("tp", "delta"):
            (Path(tmp) / sub).mkdir()
        bench_throughput(Path(tmp) / "tp", args.size_mb, args.n)
        bench_delta(Path(tmp) / "delta")


if __name__ == "__main__":
    main()

"""`edge-builder repo|publish|channel|serve` as real processes, and the repository on disk."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from tuf.api.metadata import Metadata

from agent.wire.errors import ExitCode
from builder.demo.ports import free_port
from builder.release.repository import TufRepo, parse_duration_s
from builder.release.server import parse_range
from testkit.artifacts import make_artifact
from testkit.env import subprocess_env

SECRET = b"the operator's secret beside www/"


def _builder(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_init_keeps_keys_private_and_out_of_www(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    done = _builder("repo", "init", str(repo_dir), "--expires", "timestamp=12h", "--threshold", "root=2", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["versions"] == {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 1}
    assert len(status["keyids"]["root"]) == 2
    assert stat.S_IMODE((repo_dir / "keys").stat().st_mode) == 0o700
    keys = list((repo_dir / "keys").iterdir())
    assert len(keys) == 5 and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    served = [p for p in (repo_dir / "www").rglob("*") if p.is_file()]
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in served)
    root = Metadata.from_file(str(repo_dir / "www/metadata/root.json"))
    assert root.signed.consistent_snapshot is True and root.signed.roles["root"].threshold == 2
    assert len(root.signatures) == 2
    ts = Metadata.from_file(str(repo_dir / "www/metadata/timestamp.json"))
    left = ts.signed.expires - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=11) < left <= dt.timedelta(hours=12)
    again = _builder("repo", "init", str(repo_dir))
    assert again.returncode == ExitCode.FAILED and "already holds a repository" in again.stderr


def test_publish_and_channel_rules(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    assert _builder("repo", "init", str(repo_dir)).returncode == 0
    art = make_artifact(tmp_path / "a1", "tiny", 1)
    done = _builder("publish", str(art), "--repo", str(repo_dir), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["targets"] == ["models/tiny/1/genai_config.json", "models/tiny/1/manifest.json",
                                 "models/tiny/1/model.onnx", "models/tiny/1/tokenizer/tokenizer.json"]
    repo = TufRepo.load(repo_dir)
    info = repo.targets().targets["models/tiny/1/tokenizer/tokenizer.json"]
    stored = repo_dir / "www/targets/models/tiny/1/tokenizer" / f"{info.hashes['sha256']}.tokenizer.json"
    assert stored.read_bytes() == (art / "tokenizer/tokenizer.json").read_bytes()
    # Same version again, and a lower one: refused with the next version to use.
    again = _builder("publish", str(art), "--repo", str(repo_dir))
    assert again.returncode == ExitCode.FAILED and "not higher than the last published v1" in again.stderr
    # A file that does not match its manifest entry.
    bad = make_artifact(tmp_path / "a2", "tiny", 2)
    (bad / "model.onnx").write_bytes(b"changed after the build")
    refused = _builder("publish", str(bad), "--repo", str(repo_dir))
    assert refused.returncode == ExitCode.VERIFICATION_FAILED and "does not match its manifest entry" in refused.stderr
    assert TufRepo.load(repo_dir).published_versions("tiny") == [1]
    # Channels only point at published versions.
    missing = _builder("channel", "set", "stable", "tiny", "5", "--repo", str(repo_dir))
    assert missing.returncode == ExitCode.FAILED and "tiny v5 is not published" in missing.stderr
    ok = _builder("channel", "set", "stable", "tiny", "1", "--repo", str(repo_dir), "--percent", "25", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rollout"] == {"percent": 25, "salt": "stable"}
    assert TufRepo.load(repo_dir).read_channel("stable").rollout.percent == 25


def test_refresh_resigns_timestamp_and_snapshot_only_when_due(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    assert _builder("repo", "init", str(repo_dir)).returncode == 0
    first = json.loads(_builder("repo", "status", "--repo", str(repo_dir)).stdout)
    second = json.loads(_builder("repo", "refresh", "--repo", str(repo_dir), "--json").stdout)
    assert second["versions"]["timestamp"] == first["versions"]["timestamp"] + 1
    assert second["versions"]["snapshot"] == first["versions"]["snapshot"]
    # Six days later the 7-day snapshot is past half its life: it is re-signed too.
    repo = TufRepo.load(repo_dir)
    repo.refresh(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=6))
    assert repo.snapshot().version == first["versions"]["snapshot"] + 1
    assert repo.timestamp().snapshot_meta.version == repo.snapshot().version


def test_rotate_key_via_cli_retires_the_old_private_key(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    assert _builder("repo", "init", str(repo_dir)).returncode == 0
    old = TufRepo.load(repo_dir).root().roles["timestamp"].keyids[0]
    done = _builder("repo", "rotate-key", "timestamp", "--repo", str(repo_dir), "--json")
    assert done.returncode == 0, done.stderr
    new = json.loads(done.stdout)["keyids"]["timestamp"]
    assert new != [old] and not (repo_dir / "keys" / f"{old}.pem").exists()
    root2 = Metadata.from_file(str(repo_dir / "www/metadata/2.root.json"))
    ts = Metadata.from_file(str(repo_dir / "www/metadata/timestamp.json"))
    root2.signed.verify_delegate("timestamp", ts.signed_bytes, ts.signatures)


def test_parse_duration() -> None:
    assert [parse_duration_s(x) for x in ("1s", "30m", "12h", "90d")] == [1, 1800, 43200, 90 * 86400]
    with pytest.raises(Exception, match="whole number followed by s, m, h or d"):
        parse_duration_s("1w")
    with pytest.raises(Exception, match="whole number"):
        parse_duration_s("-1h")


@pytest.mark.parametrize(("header", "size", "want"), [
    ("bytes=0-9", 100, (0, 9)), ("bytes=90-", 100, (90, 99)), ("bytes=-10", 100, (90, 99)),
    ("bytes=50-500", 100, (50, 99)), ("bytes=100-", 100, None), ("bytes=-0", 100, None), ("bytes=5-4", 100, None),
])
def test_parse_range(header: str, size: int, want: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == want


@pytest.fixture
def served_www(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """`edge-builder serve` as a real subprocess on a free port."""
    www = tmp_path / "www"
    (www / "targets").mkdir(parents=True)
    data = bytes(range(256)) * 40
    (www / "targets" / "f.bin").write_bytes(data)
    (tmp_path / "secret.txt").write_bytes(SECRET)  # beside www/: must never be served
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "serve", str(www), "--port", str(port)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "serve did not start listening"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", data
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_serve_range_semantics(served_www: tuple[str, bytes]) -> None:
    url, data = served_www
    full = requests.get(f"{url}/targets/f.bin", timeout=5)
    assert full.status_code == 200 and full.content == data and full.headers["Accept-Ranges"] == "bytes"
    part = requests.get(f"{url}/targets/f.bin", headers={"Range": "bytes=100-199"}, timeout=5)
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = requests.get(f"{url}/targets/f.bin", headers={"Range": f"bytes={len(data) - 5}-"}, timeout=5)
    assert tail.status_code == 206 and tail.content == data[-5:]
    beyond = requests.get(f"{url}/targets/f.bin", headers={"Range": f"bytes={len(data)}-"}, timeout=5)
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{len(data)}"
    head = requests.head(f"{url}/targets/f.bin", timeout=5)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data) and head.content == b""
    assert requests.get(f"{url}/targets/", timeout=5).status_code == 404  # no listings


@pytest.mark.parametrize("raw_path", [
    "/targets/../../secret.txt", "/../secret.txt", "/targets/%2e%2e/%2e%2e/secret.txt",
    "/targets/..%2f..%2fsecret.txt", "//secret.txt", "/targets/../../../../etc/hostname"])
def test_serve_never_leaves_its_directory(served_www: tuple[str, bytes], raw_path: str) -> None:
    """The path goes out exactly as written (`requests` would normalise `..` away before sending,
    so the server would never see it); a secret beside the served dir must not come back."""
    url, _ = served_www
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 404, (response.status, body[:200])
    assert SECRET not in body

"""End to end with real processes: the real SmolLM2 INT4 build is published with
`edge-builder`, served by `edge-builder serve`, and installed by
`edge-agent update --once` on a device that has only root.json."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.wire.errors import ExitCode
from agent.wire.manifest import MANIFEST_FILENAME, Manifest
from builder.demo.ports import free_port
from testkit.agents import make_real_artifact
from testkit.env import subprocess_env


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def served_repo(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    repo = tmp_path / "repo"
    assert _run("builder.cli", "repo", "init", str(repo)).returncode == 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "serve", str(repo / "www"), "--port", str(port)],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.05)
        yield repo, f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_smollm2_installs_through_the_real_server(smollm2_int4_raw: Path, served_repo: tuple[Path, str],
                                                  tmp_path: Path) -> None:
    repo, url = served_repo
    # A real build with its measured canary: update --once loads it and runs the canary.
    art = make_real_artifact(smollm2_int4_raw, tmp_path / "art", "smollm2", 1)
    published = _run("builder.cli", "publish", str(art), "--repo", str(repo), "--json")
    assert published.returncode == 0, published.stderr
    assert _run("builder.cli", "channel", "set", "stable", "smollm2", "1", "--repo", str(repo)).returncode == 0

    state = tmp_path / "device"
    (state / "trust").mkdir(parents=True)
    shutil.copyfile(repo / "www/metadata/root.json", state / "trust/root.json")  # the only provisioning
    toml = tmp_path / "agent.toml"
    toml.write_text(f'device_id = "box-7"\nchannel = "stable"\nrepo_url = "{url}"\nstate_dir = "{state}"\n')

    done = _run("agent.cli", "update", "--once", "--config", str(toml), "--json")
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    manifest = Manifest.model_validate_json((art / MANIFEST_FILENAME).read_bytes())
    assert (outcome["status"], outcome["model"], outcome["version"]) == ("installed", "smollm2", 1)
    assert outcome["bytes_downloaded"] == manifest.total_file_bytes
    current = state / "current"
    assert current.resolve() == (state / "models/smollm2/1").resolve()
    for f in manifest.files:
        assert hashlib.sha256((current / f.path).read_bytes()).hexdigest() == f.sha256
    assert (current / "genai_config.json").is_file() and any(p.suffix == ".onnx" for p in current.iterdir())

    again = _run("agent.cli", "update", "--once", "--config", str(toml))
    assert again.returncode == 0 and again.stdout.startswith("up_to_date")

    # One attack end to end: v2 changes genai_config.json (the weights are shared, so
    # they are not fetched again) and the server flips a byte of it.
    raw2 = tmp_path / "raw2"
    shutil.copytree(smollm2_int4_raw, raw2)
    (raw2 / "genai_config.json").write_text((raw2 / "genai_config.json").read_text() + "\n")
    art2 = make_real_artifact(raw2, tmp_path / "art2", "smollm2", 2)
    assert _run("builder.cli", "publish", str(art2), "--repo", str(repo)).returncode == 0
    assert _run("builder.cli", "channel", "set", "stable", "smollm2", "2", "--repo", str(repo)).returncode == 0
    (served_config,) = (repo / "www/targets/models/smollm2/2").glob("*.genai_config.json")
    data = bytearray(served_config.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served_config.write_bytes(bytes(data))
    refused = _run("agent.cli", "update", "--once", "--config", str(toml))
    assert refused.returncode == ExitCode.VERIFICATION_FAILED
    error_lines = [line for line in refused.stderr.splitlines() if line.startswith("edge-agent: error:")]
    assert len(error_lines) == 1 and "do not match the signed" in error_lines[0]
    assert current.resolve() == (state / "models/smollm2/1").resolve()
    assert not (state / "models/smollm2/2").exists()

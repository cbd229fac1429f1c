"""deploy/nginx.conf serves a real repository to a real device (`make system-deps` installs nginx)."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from agent.wire.channel import ChannelFile
from builder.demo.ports import free_port
from testkit.artifacts import make_artifact, new_repo, provision_device
from testkit.artifacts import run_update_once_unloaded as run_update_once
from testkit.env import REPO_ROOT

CONF = REPO_ROOT / "deploy" / "nginx.conf"


def nginx_binary() -> str:
    """Fails loudly like the other real parts: a suite that skips it proves nothing of nginx.conf."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        pytest.fail("nginx is not installed: run `make system-deps` (apt-get install nginx-light)")
    return found


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    repo = new_repo(tmp_path / "repo")
    port = free_port()
    server = CONF.read_text()
    server = re.sub(r"^\s*listen \[::\]:80;\n", "", server, flags=re.M)
    server = server.replace("listen 80;", f"listen 127.0.0.1:{port};")
    server = server.replace("root /srv/edgefleet/repo/www;", f"root {repo.www_dir};")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    main = prefix / "nginx.conf"
    # Workers read the repository under pytest's private tmp dir: same user as the test.
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
    main.write_text(
        # One process (no master/workers): killing it in teardown leaves nothing behind.
        f"{user}master_process off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\nevents {{}}\nhttp {{\n"
        f"access_log {prefix}/access.log;\nclient_body_temp_path {prefix};\nproxy_temp_path {prefix};\n"
        f"fastcgi_temp_path {prefix};\nuwsgi_temp_path {prefix};\nscgi_temp_path {prefix};\n{server}\n}}\n")
    proc = subprocess.Popen([nginx_binary(), "-p", str(prefix), "-c", str(main), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", repo.dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_device_installs_through_nginx_with_the_cache_rules(nginx: tuple[str, Path], tmp_path: Path) -> None:
    url, repo_dir = nginx
    from builder.release.repository import TufRepo

    repo = TufRepo.load(repo_dir)
    repo.publish(make_artifact(tmp_path / "art", "tiny", 1))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    config, store = provision_device(tmp_path / "dev", repo, url)
    assert run_update_once(config, store).status == "installed"

    ts = requests.get(f"{url}/metadata/timestamp.json", timeout=5)
    assert ts.status_code == 200 and "no-cache" in ts.headers["Cache-Control"]
    snap = requests.get(f"{url}/metadata/{repo.snapshot().version}.snapshot.json", timeout=5)
    assert "immutable" in snap.headers["Cache-Control"]
    info = repo.targets().targets["models/tiny/1/model.onnx"]
    target_url = f"{url}/targets/models/tiny/1/{info.hashes['sha256']}.model.onnx"
    part = requests.get(target_url, headers={"Range": "bytes=10-19"}, timeout=5)
    assert part.status_code == 206 and len(part.content) == 10 and "immutable" in part.headers["Cache-Control"]
    assert requests.get(f"{url}/repo.json", timeout=5).status_code == 404
    assert requests.get(f"{url}/metadata/", timeout=5).status_code in (403, 404)

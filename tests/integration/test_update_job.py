"""The update job: TUF and the downloader in a child process of the daemon, one per update
pass, with the same results and typed errors as in-process (`TufUpdateSource`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from agent.update.job import UpdateJobSource
from agent.update.statemachine import ModelRef
from agent.wire.channel import ChannelFile
from agent.wire.errors import UpdateJobError, VerificationError
from agent.wire.manifest import Manifest
from testkit.artifacts import make_artifact, new_repo, provision_device, serving
from testkit.env import subprocess_env
from testkit.waits import wait_until

FILES = {"model.onnx": os.urandom(200_000), "genai_config.json": b'{"v": 1}'}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_one_job_checks_downloads_and_verifies_then_leaves(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    repo.publish(make_artifact(tmp_path / "v1", "tiny", 1, FILES))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, _):
        config, store = provision_device(tmp_path / "dev", repo, url)
        source = UpdateJobSource(config, store)
        try:
            result = source.check(None)
            assert result.outcome == "update_available" and result.target == ModelRef(name="tiny", version=1)
            assert source.last_channel is not None and source.last_channel.version == 1
            pid = source.pid
            assert pid is not None and pid != os.getpid()
            source.download(result.target)
            assert source.files_downloaded == len(FILES) and source.bytes_downloaded >= sum(map(len, FILES.values()))
            manifest = Manifest.model_validate_json(source.verify(result.target))
            assert (manifest.name, manifest.version) == ("tiny", 1)
            assert all(store.has_blob(f.sha256) for f in manifest.files)
            assert source.pid == pid  # one process for the whole pass
        finally:
            source.close()
        assert source.pid is None and _gone(pid)
        # The next pass gets a new job; the blobs are not fetched again.
        again = UpdateJobSource(config, store)
        try:
            assert again.check(None).outcome == "update_available"
            again.download(ModelRef(name="tiny", version=1))
            assert again.bytes_downloaded == 0 and again.blobs_reused == len(FILES)
        finally:
            again.close()


def test_errors_come_back_typed_and_a_killed_job_is_replaced(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    repo.publish(make_artifact(tmp_path / "v1", "tiny", 1, FILES))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    info = repo.targets().targets["models/tiny/1/model.onnx"]
    served = repo.target_file_path("models/tiny/1/model.onnx", info.hashes["sha256"])
    good = served.read_bytes()
    served.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    target = ModelRef(name="tiny", version=1)
    with serving(repo.www_dir) as (url, _):
        config, store = provision_device(tmp_path / "dev", repo, url)
        # 100 kB/s: the 200 kB file takes 2 s, long enough to kill the job in the middle.
        source = UpdateJobSource(config.model_copy(update={"download_rate_limit_bytes_per_s": 100_000}), store)
        try:
            source.check(None)
            with pytest.raises(VerificationError, match="do not match the signed"):
                source.download(target)
            first = source.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)  # between calls: the next call starts a new job
            psutil.Process(first).wait(10)
            with pytest.raises(VerificationError, match="do not match the signed"):
                source.download(target)
            second = source.pid
            assert second not in (None, first)

            served.write_bytes(good)  # the operator repairs the server; the job dies mid-download
            threading.Timer(1.0, os.kill, (second, signal.SIGKILL)).start()
            with pytest.raises(UpdateJobError, match=r"exited with code -9 during download"):
                source.download(target)
            assert source.pid is None
            source.download(target)  # a new job resumes the partial file
            assert store.has_blob(info.hashes["sha256"])
            assert 0 < source.bytes_downloaded < len(good) + len(FILES["genai_config.json"])
        finally:
            source.close()


def _wait_channel(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def test_job_dies_with_its_parent(tmp_path: Path) -> None:
    """SIGKILL of the daemon leaves no job behind, even one whose stdin stays open (blocked in I/O):
    the kernel kills it (PR_SET_PDEATHSIG)."""
    stdin_read, stdin_write = os.pipe()  # this test holds the write end: the job never sees EOF
    try:
        parent = subprocess.Popen(
            [sys.executable, "-c", "import subprocess, sys, time\n"
             "job = subprocess.Popen([sys.executable, '-m', 'agent.update.job'], stdin=int(sys.argv[1]))\n"
             "print(job.pid, flush=True); time.sleep(60)", str(stdin_read)],
            stdout=subprocess.PIPE, text=True, env=subprocess_env(), pass_fds=(stdin_read,))
        assert parent.stdout is not None
        job_pid = int(parent.stdout.readline())
        # Blocked in a read of its stdin, waiting for its start line (the kernel's wait channel).
        wait_until(lambda: "pipe_read" in _wait_channel(job_pid), 30, "the job waiting on its stdin")
        parent.kill()
        parent.wait()
        wait_until(lambda: _gone(job_pid), 10, "the job to die with its parent")
    finally:
        os.close(stdin_read)
        os.close(stdin_write)


def test_the_daemon_command_does_not_import_tuf_or_http() -> None:
    """`edge-agent run` builds every subcommand's parser; none may pull TUF, crypto or requests
    into the long-lived process (the update job imports them)."""
    code = ("import sys, agent.cli\n"
            "try:\n    agent.cli.main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "import agent.daemon\n"
            "print(sorted(m for m in ('tuf', 'securesystemslib', 'cryptography', 'requests', 'urllib3')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    imported = subprocess.run([sys.executable, "-c", "import sys, agent.update.source; print('tuf' in sys.modules)"],
                              capture_output=True, text=True, env=subprocess_env(), timeout=60, check=True)
    assert imported.stdout.strip() == "True"  # the check above can see an import

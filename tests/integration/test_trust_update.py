"""A device with only root.json installs, follows and refuses releases through the real server."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from agent.system.hardware import probe
from agent.wire.channel import ChannelFile, Rollout
from agent.wire.errors import ConfigError, DowngradeRefusedError, DownloadError, IncompatibleModelError
from agent.wire.manifest import MANIFEST_FILENAME
from testkit.artifacts import make_artifact, new_repo, provision_device, serving
from testkit.artifacts import run_update_once_unloaded as run_update_once


def _publish(repo, tmp_path: Path, version: int, files: dict[str, bytes] | None = None, name: str = "tiny"):
    art = make_artifact(tmp_path / f"art-{name}-{version}", name, version, files)
    repo.publish(art)
    return art


def test_device_with_only_root_installs_and_then_is_up_to_date(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    art = _publish(repo, tmp_path, 1)
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        config, store = provision_device(tmp_path / "dev", repo, url)
        assert sorted(p.name for p in store.trust_dir.iterdir()) == ["root.json"]
        outcome = run_update_once(config, store)
        assert (outcome.status, outcome.model, outcome.version) == ("installed", "tiny", 1)
        current = store.current()
        assert current == store.model_dir("tiny", 1)
        for rel in ("model.onnx", "genai_config.json", "tokenizer/tokenizer.json"):
            assert (current / rel).read_bytes() == (art / rel).read_bytes()
        assert (current / MANIFEST_FILENAME).read_bytes() == (art / MANIFEST_FILENAME).read_bytes()
        # Second pass: nothing to fetch.
        n_requests = len(faults.requests)
        again = run_update_once(config, store)
        assert again.status == "up_to_date"
        assert not any("/targets/models/" in p for p, _ in faults.requests[n_requests:])


def test_only_the_changed_file_is_downloaded_for_a_new_version(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    shared = {"model.onnx": b"W" * 50_000, "genai_config.json": b'{"a": 1}'}
    _publish(repo, tmp_path, 1, shared)
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        config, store = provision_device(tmp_path / "dev", repo, url)
        assert run_update_once(config, store).status == "installed"
        _publish(repo, tmp_path, 2, {**shared, "genai_config.json": b'{"a": 2}'})
        repo.set_channel(ChannelFile(channel="stable", model="tiny", version=2))
        before = len(faults.requests)
        outcome = run_update_once(config, store)
        assert (outcome.status, outcome.version) == ("installed", 2)
        assert outcome.bytes_downloaded == len(b'{"a": 2}')
        assert (outcome.files_downloaded, outcome.blobs_reused) == (1, 1)
        artifact_gets = [p for p, _ in faults.requests[before:] if "/targets/models/" in p and "manifest" not in p]
        assert len(artifact_gets) == 1 and artifact_gets[0].endswith("genai_config.json")
        assert store.previous() == store.model_dir("tiny", 1)


def test_cohort_outside_rollout_installs_nothing(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    _publish(repo, tmp_path, 1)
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1, rollout=Rollout(percent=0, salt="s")))
    with serving(repo.www_dir) as (url, _):
        config, store = provision_device(tmp_path / "dev", repo, url)
        assert run_update_once(config, store).status == "not_in_cohort"
        assert store.current() is None and list(store.blobs_dir.iterdir()) == []


def test_downgrade_refused_without_allow_downgrade_then_accepted_with_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = new_repo(tmp_path / "repo")
    _publish(repo, tmp_path, 1)
    _publish(repo, tmp_path, 2)
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=2))
    with serving(repo.www_dir) as (url, _):
        config, store = provision_device(tmp_path / "dev", repo, url)
        run_update_once(config, store)
        repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
        with caplog.at_level(logging.ERROR), pytest.raises(DowngradeRefusedError, match="lower than the active v2"):
            run_update_once(config, store)
        assert "event=update_refused error=DowngradeRefusedError" in caplog.text
        assert store.current() == store.model_dir("tiny", 2) and not store.has_model("tiny", 1)
        repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1, allow_downgrade=True))
        assert run_update_once(config, store).version == 1
        assert store.current() == store.model_dir("tiny", 1)


def test_unprovisioned_device_is_a_config_error(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    config, store = provision_device(tmp_path / "dev", repo, "http://127.0.0.1:9")
    (store.trust_dir / "root.json").unlink()
    with pytest.raises(ConfigError, match="provision the device"):
        run_update_once(config, store)


def test_disk_checks_refuse_before_any_download(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    _publish(repo, tmp_path, 1, {"model.onnx": b"x" * 100_000})
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        # A real refusal: the configured store cap is smaller than the model.
        config, store = provision_device(tmp_path / "dev", repo, url, disk_cap_bytes=50_000)
        with pytest.raises(IncompatibleModelError, match="disk_cap_bytes"):
            run_update_once(config, store)
        # A FAKE free-space reading (no test can fill the real disk): the real probe, less its free disk.
        config, store = provision_device(tmp_path / "dev2", repo, url)
        with pytest.raises(IncompatibleModelError, match="free disk, this device has"):
            run_update_once(config, store, hardware=lambda d: probe(d).model_copy(update={"free_disk_bytes": 1000}))
        assert not any("model.onnx" in p for p, _ in faults.requests)
        assert list(store.staging_dir.iterdir()) == [] and store.current() is None


def test_server_down_fails_clearly_and_a_later_pass_succeeds(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    _publish(repo, tmp_path, 1)
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, _):
        port = int(url.rsplit(":", 1)[1])
    # The server is gone now; the same port is used again below.
    config, store = provision_device(tmp_path / "dev", repo, url)
    with pytest.raises(DownloadError, match="repository unreachable"):
        run_update_once(config, store)
    assert store.current() is None
    with serving(repo.www_dir, port=port):
        assert run_update_once(config, store).status == "installed"


def test_root_key_rotation_is_followed_by_the_device(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    _publish(repo, tmp_path, 1)
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, _):
        config, store = provision_device(tmp_path / "dev", repo, url)
        run_update_once(config, store)
        old_root_keys = set(repo.root().roles["root"].keyids)
        repo.rotate_key("root")
        repo.rotate_key("root")  # two rotations: the device walks 1 -> 2 -> 3
        repo.rotate_key("targets")
        assert not old_root_keys & set(repo.root().roles["root"].keyids)
        _publish(repo, tmp_path, 2)
        repo.set_channel(ChannelFile(channel="stable", model="tiny", version=2))
        assert run_update_once(config, store).version == 2
        trusted = json.loads((store.trust_dir / "root.json").read_bytes())
        assert trusted["signed"]["version"] == 4  # init, root, root, targets rotation
        assert set(trusted["signed"]["roles"]["root"]["keyids"]) == set(repo.root().roles["root"].keyids)


def test_manifest_and_channel_reads_are_check_steps(tmp_path: Path) -> None:
    """The check alone downloads no artifact bytes (the state machine calls the steps apart)."""
    from agent.update.source import TufUpdateSource

    repo = new_repo(tmp_path / "repo")
    _publish(repo, tmp_path, 1)
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        config, store = provision_device(tmp_path / "dev", repo, url)
        check = TufUpdateSource(config, store).check(None)
        assert check.outcome == "update_available" and check.manifest is not None
        assert {f.path for f in check.manifest.files} == {"model.onnx", "genai_config.json", "tokenizer/tokenizer.json"}
        assert not any("model.onnx" in p for p, _ in faults.requests)
        shutil.rmtree(store.staging_dir)


def test_connection_dropped_during_metadata_is_a_download_error_then_recovers(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    _publish(repo, tmp_path, 1)
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        config, store = provision_device(tmp_path / "dev", repo, url)
        faults.drop_after_bytes, faults.drop_times, faults.drop_path = 20, 1, "timestamp.json"
        with pytest.raises(DownloadError, match="repository unreachable or incomplete"):
            run_update_once(config, store)
        assert faults.drop_times == 0 and store.current() is None
        assert run_update_once(config, store).status == "installed"


def test_update_cli_without_once_or_with_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    from testkit.env import subprocess_env

    toml = tmp_path / "agent.toml"
    toml.write_text('device_id = "d"\nrepo_url = "http://127.0.0.1:9"\nbogus_key = 1\n')
    for args, reason in ((["update", "--config", str(toml)], "pass --once"),
                         (["update", "--once", "--config", str(toml)], "'bogus_key': unknown key")):
        done = subprocess.run([sys.executable, "-m", "agent.cli", *args], env=subprocess_env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.strip().count("\n") == 0 and reason in done.stderr

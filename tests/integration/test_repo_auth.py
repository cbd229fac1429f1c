"""A repository behind a password, and target names a URL would misread, through the real server.

`repo_url = "https://user:password@host"` works for metadata and artifacts alike, and the
password never reaches a log line, the journal or an error message.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from agent.store.store import Store
from agent.update.download import Downloader, ExpectedFile
from agent.update.trust import split_credentials
from agent.wire.channel import ChannelFile
from agent.wire.errors import DownloadError
from testkit.artifacts import make_artifact, new_repo, provision_device, serving
from testkit.artifacts import run_update_once_unloaded as run_update_once

SECRET = "s3cr@t:pw"


def test_a_repository_behind_basic_auth_installs_and_the_password_is_never_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = new_repo(tmp_path / "repo")
    repo.publish(make_artifact(tmp_path / "art", "tiny", 1))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        faults.basic_auth = f"edge:{SECRET}"
        host = url.removeprefix("http://")
        config, store = provision_device(tmp_path / "dev", repo, f"http://edge:s3cr%40t%3Apw@{host}")
        caplog.set_level(logging.DEBUG)
        outcome = run_update_once(config, store)
        assert (outcome.status, outcome.version) == ("installed", 1)
        # Metadata (ngclient's urllib3 fetcher used to drop the credentials) and artifacts alike.
        assert any("/metadata/" in p for p, _ in faults.requests)
        assert any("/targets/models/" in p for p, _ in faults.requests)
        assert set(faults.authorizations) == {split_credentials(config.repo_url)[1]}
        assert "s3cr" not in caplog.text and "127.0.0.1" in caplog.text
        assert "s3cr" not in store.journal_path.read_text()


def test_a_wrong_password_is_a_clear_download_error_without_the_password(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    repo.publish(make_artifact(tmp_path / "art", "tiny", 1))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        faults.basic_auth = f"edge:{SECRET}"
        config, store = provision_device(tmp_path / "dev", repo, url.replace("://", "://edge:wrong-pw@"))
        with pytest.raises(DownloadError, match=r"refused access \(HTTP 401\): check the user:password") as raised:
            run_update_once(config, store)
        assert "wrong-pw" not in str(raised.value)
        assert store.current() is None


def test_an_artifact_server_that_refuses_access_is_not_reported_as_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blob.bin").write_bytes(b"x" * 100)
    store = Store(tmp_path / "dev")
    store.ensure_layout()
    with serving(tmp_path / "www") as (url, faults):
        faults.basic_auth = "edge:pw"
        expected = ExpectedFile(url=f"{url}/blob.bin", length=100,
                                hashes={"sha256": hashlib.sha256(b"x" * 100).hexdigest()})
        with pytest.raises(DownloadError, match="HTTP 401: the repository refused access"):
            Downloader().fetch_blob(expected, store)


def test_target_names_that_a_url_would_misread_are_fetched_by_their_signed_name(tmp_path: Path) -> None:
    files = {"model.onnx": b"W" * 1000, "genai_config.json": b'{"model": {"type": "llama"}}',
             "notes #1?.txt": b"hash and query", "100% done.txt": b"percent"}
    repo = new_repo(tmp_path / "repo")
    art = repo.publish(make_artifact(tmp_path / "art", "tiny", 1, files)) and tmp_path / "art"
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, _):
        config, store = provision_device(tmp_path / "dev", repo, url)
        assert run_update_once(config, store).status == "installed"
        current = store.current()
        assert current is not None
        for name in ("notes #1?.txt", "100% done.txt"):
            assert (current / name).read_bytes() == (art / name).read_bytes()


@pytest.mark.parametrize(("url", "base", "header"), [
    ("http://host:8080/r", "http://host:8080/r", None),
    ("https://u:p@host/r", "https://host/r", "Basic dTpw"),
    ("https://u%40x:p%3A@host", "https://host", "Basic dUB4OnA6"),
    ("https://u@host", "https://host", "Basic dTo="),
])
def test_credentials_are_split_from_the_url(url: str, base: str, header: str | None) -> None:
    assert split_credentials(url) == (base, header)

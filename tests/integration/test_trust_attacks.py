"""The attack suite (design section 2): a device on v1 is offered a malicious v2.

Each attack must be refused with a specific, logged reason, with nothing of v2
installed and v1 still current and intact. The repository is real (builder.release.repository),
the server is the real one (builder.release.server), the client is ngclient.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from agent.config import AgentConfig
from agent.store.store import Store
from agent.wire.channel import ChannelFile
from agent.wire.errors import EdgefleetError, ManifestError, VerificationError
from agent.wire.manifest import MANIFEST_FILENAME
from builder.release.repository import RepoSettings, TufRepo
from testkit.artifacts import Faults, make_artifact, manifest_dict, new_repo, provision_device, serving
from testkit.artifacts import run_update_once_unloaded as run_update_once

V1_FILES = {"model.onnx": b"v1 weights " * 3000, "genai_config.json": b'{"v": 1}'}
V2_FILES = {"model.onnx": b"v2 weights " * 3000, "genai_config.json": b'{"v": 2}'}


@dataclass
class Scene:
    repo: TufRepo
    config: AgentConfig
    store: Store
    faults: Faults
    tmp: Path
    v1_snapshot: dict[str, bytes]

    def publish_v2(self) -> None:
        self.repo.publish(make_artifact(self.tmp / "v2", "tiny", 2, V2_FILES))
        self.repo.set_channel(ChannelFile(channel="stable", model="tiny", version=2))

    def target_file(self, target_path: str) -> Path:
        info = self.repo.targets().targets[target_path]
        return self.repo.target_file_path(target_path, info.hashes["sha256"])


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    yield from _device_on_v1(new_repo(tmp_path / "repo"), tmp_path)


def _device_on_v1(repo: TufRepo, tmp_path: Path) -> Iterator[Scene]:
    """`repo` publishing v1 on stable, served, and a device provisioned with root.json that installed it."""
    repo.publish(make_artifact(tmp_path / "v1", "tiny", 1, V1_FILES))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    with serving(repo.www_dir) as (url, faults):
        config, store = provision_device(tmp_path / "dev", repo, url)
        assert run_update_once(config, store).version == 1
        v1_dir = store.model_dir("tiny", 1)
        snap = {p.relative_to(v1_dir).as_posix(): p.read_bytes() for p in v1_dir.rglob("*") if p.is_file()}
        yield Scene(repo, config, store, faults, tmp_path, snap)


def _refused(scene: Scene, caplog: pytest.LogCaptureFixture, error: type[EdgefleetError], reason: str) -> None:
    """Run one update pass and check: refused, logged, nothing installed, v1 untouched."""
    with caplog.at_level(logging.ERROR):
        with pytest.raises(error, match=reason) as excinfo:
            run_update_once(scene.config, scene.store)
    logged = [r.getMessage() for r in caplog.records if "event=update_refused" in r.getMessage()]
    assert len(logged) == 1 and f"error={type(excinfo.value).__name__}" in logged[0]
    assert str(excinfo.value) in logged[0]
    store = scene.store
    assert store.current() == store.model_dir("tiny", 1)
    assert not store.model_dir("tiny", 2).exists()
    v1_dir = store.model_dir("tiny", 1)
    assert {p.relative_to(v1_dir).as_posix(): p.read_bytes() for p in v1_dir.rglob("*") if p.is_file()} \
        == scene.v1_snapshot
    v2_hashes = {e["sha256"] for e in manifest_dict("tiny", 2, V2_FILES)["files"]}
    v1_hashes = {e["sha256"] for e in manifest_dict("tiny", 1, V1_FILES)["files"]}
    assert not any(store.has_blob(h) for h in v2_hashes - v1_hashes)


def test_tampered_artifact_byte(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene.publish_v2()
    path = scene.target_file("models/tiny/2/model.onnx")
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(scene, caplog, VerificationError, "do not match the signed")
    assert list(scene.store.staging_dir.iterdir()) == []  # the bad partial is deleted


def test_tampered_manifest(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene.publish_v2()
    path = scene.target_file(f"models/tiny/2/{MANIFEST_FILENAME}")
    path.write_bytes(path.read_bytes().replace(b"test build 2", b"test build X"))
    _refused(scene, caplog, VerificationError, "LengthOrHashMismatchError")


def test_metadata_signed_by_an_untrusted_key(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene.publish_v2()
    ts_path = scene.repo.metadata_dir / "timestamp.json"
    md = Metadata.from_bytes(ts_path.read_bytes())
    md.signed.version += 1
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())  # the attacker's own key
    ts_path.write_bytes(md.to_bytes())
    _refused(scene, caplog, VerificationError, "UnsignedMetadataError")


def test_replayed_older_timestamp(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    old_timestamp = (scene.repo.metadata_dir / "timestamp.json").read_bytes()
    scene.repo.refresh()  # a newer timestamp, which the device then sees
    assert run_update_once(scene.config, scene.store).status == "up_to_date"
    scene.publish_v2()
    # A mirror replays the older (validly signed, unexpired) timestamp to hide v2.
    (scene.repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    _refused(scene, caplog, VerificationError, "BadVersionNumberError")


def test_replayed_older_snapshot(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    older = scene.repo.snapshot().version
    old_snapshot = (scene.repo.metadata_dir / f"{older}.snapshot.json").read_bytes()
    scene.publish_v2()
    newest = scene.repo.snapshot().version
    # The server answers the newest snapshot URL with an older (validly signed) snapshot.
    (scene.repo.metadata_dir / f"{newest}.snapshot.json").write_bytes(old_snapshot)
    _refused(scene, caplog, VerificationError, "BadVersionNumberError|LengthOrHashMismatchError")


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets", "root"])
def test_expired_role(scene: Scene, caplog: pytest.LogCaptureFixture, role: str) -> None:
    """Each role, signed (no clock faking) to have expired an hour ago, over a new v2."""
    scene.publish_v2()
    repo = scene.repo
    repo.expiry_override[role] = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    if role == "root":
        with repo.edit_root():
            pass
    elif role == "targets":
        with repo.edit("targets"):
            pass
    repo.do_snapshot(force=role in ("snapshot", "targets"))
    repo.do_timestamp(force=True)
    expired = rf"ExpiredMetadataError: [^:]*{role}(\.json)? is expired.*wall clock reads"
    _refused(scene, caplog, VerificationError, expired)


def test_replayed_older_targets(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    older = scene.repo.targets().version
    old_targets = (scene.repo.metadata_dir / f"{older}.targets.json").read_bytes()
    scene.publish_v2()
    newest = scene.repo.targets().version
    assert newest > older
    # The mirror answers the newest targets URL with the older (validly signed, unexpired) one: v2 hidden.
    (scene.repo.metadata_dir / f"{newest}.targets.json").write_bytes(old_targets)
    _refused(scene, caplog, VerificationError, "BadVersionNumberError")


def test_signed_manifest_of_another_version_or_model(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    # A compromised build pipeline signs v1's manifest under v2's path: "v2" would install v1's files.
    scene.repo.add_raw_targets({f"models/tiny/2/{MANIFEST_FILENAME}":
                                json.dumps(manifest_dict("tiny", 1, V1_FILES)).encode()})
    scene.repo.set_channel(ChannelFile(channel="stable", model="tiny", version=2))
    _refused(scene, caplog, ManifestError, "describes tiny v1: refused")
    caplog.clear()
    scene.repo.add_raw_targets({f"models/tiny/2/{MANIFEST_FILENAME}":
                                json.dumps(manifest_dict("other", 2, V2_FILES)).encode()})
    _refused(scene, caplog, ManifestError, "describes other v2: refused")


def test_channel_file_of_another_channel(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene.publish_v2()
    scene.repo.set_channel(ChannelFile(channel="beta", model="tiny", version=2))
    scene.repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    # Signed, but the beta file under the stable path: refused by what it says.
    beta = scene.target_file("channels/beta.json").read_bytes()
    scene.repo.add_raw_targets({"channels/stable.json": beta})
    _refused(scene, caplog, VerificationError, "names channel 'beta'")
    caplog.clear()
    # Unsigned: the mirror serves beta's bytes at stable's (consistent) URL.
    scene.repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    scene.target_file("channels/stable.json").write_bytes(beta)
    _refused(scene, caplog, VerificationError, "LengthOrHashMismatchError")


def test_fast_forward_attack_is_recovered_by_rotating_the_timestamp_key(
        scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    """An attacker with the (online) timestamp key signs timestamp version 1,000,000: the device
    accepts it, and then refuses every honest timestamp as a rollback. The operator's recovery is
    a new timestamp key in root; the device follows the new root and trusts lower versions again."""
    repo = scene.repo
    stolen = repo._signers_for(repo.root(), "timestamp")
    md = Metadata.from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    md.signed.version = 1_000_000
    md.signatures.clear()
    for signer in stolen:
        md.sign(signer, append=True)
    (repo.metadata_dir / "timestamp.json").write_bytes(md.to_bytes())
    assert run_update_once(scene.config, scene.store).status == "up_to_date"  # validly signed: accepted

    scene.publish_v2()  # honest timestamp version 3 or so
    _refused(scene, caplog, VerificationError, "BadVersionNumberError")

    repo.rotate_key("timestamp")
    outcome = run_update_once(scene.config, scene.store)
    assert (outcome.status, outcome.version) == ("installed", 2)
    assert scene.store.current() == scene.store.model_dir("tiny", 2)


@pytest.fixture
def two_key_scene(tmp_path: Path) -> Iterator[Scene]:
    """The scene with a targets threshold of 2."""
    settings = RepoSettings(thresholds={"root": 1, "targets": 2, "snapshot": 1, "timestamp": 1})
    yield from _device_on_v1(TufRepo.init(tmp_path / "repo", settings), tmp_path)


def test_a_threshold_of_two_holds_against_one_compromised_key(
        two_key_scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene = two_key_scene
    repo = scene.repo
    scene.publish_v2()  # honest: both targets keys sign; the channel now names v2
    newest = repo.targets().version
    honest = (repo.metadata_dir / f"{newest}.targets.json").read_bytes()
    one_key = repo._signers_for(repo.root(), "targets")[0]
    assert len(repo.root().roles["targets"].keyids) == 2

    # The attacker holds one targets key (and the online snapshot and timestamp keys): the same
    # version, its own channel file, signed by that one key.
    evil = repo._store_target_bytes("channels/stable.json", ChannelFile(
        channel="stable", model="tiny", version=1, allow_downgrade=True).model_dump_json().encode())
    md = Metadata.from_bytes(honest)
    md.signed.targets["channels/stable.json"] = evil
    md.signatures.clear()
    md.sign(one_key)
    (repo.metadata_dir / f"{newest}.targets.json").write_bytes(md.to_bytes())
    _refused(scene, caplog, VerificationError, "UnsignedMetadataError: targets was signed by 1/2 keys")

    # Control: the same files with both signatures install v2.
    (repo.metadata_dir / f"{newest}.targets.json").write_bytes(honest)
    assert run_update_once(scene.config, scene.store).version == 2


def test_mix_and_match_manifest_with_file_of_another_version(
        scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    # A (compromised) build pipeline signs a v2 manifest that lists v1's model.onnx
    # while the signed target models/tiny/2/model.onnx is v2's file.
    raw = manifest_dict("tiny", 2, {"model.onnx": V1_FILES["model.onnx"],
                                   "genai_config.json": V2_FILES["genai_config.json"]})
    scene.repo.add_raw_targets({
        f"models/tiny/2/{MANIFEST_FILENAME}": json.dumps(raw).encode(),
        "models/tiny/2/model.onnx": V2_FILES["model.onnx"],
        "models/tiny/2/genai_config.json": V2_FILES["genai_config.json"],
    })
    scene.repo.set_channel(ChannelFile(channel="stable", model="tiny", version=2))
    _refused(scene, caplog, VerificationError, "mix and match")


def test_server_sends_more_bytes_than_declared_for_an_artifact(
        scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene.publish_v2()
    scene.faults.endless_path = "/targets/models/tiny/2/"
    scene.faults.endless_path += scene.target_file("models/tiny/2/model.onnx").name
    _refused(scene, caplog, VerificationError, "more than the signed length")


def test_server_sends_endless_metadata(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    scene.publish_v2()
    scene.faults.endless_path = "timestamp.json"
    _refused(scene, caplog, VerificationError, "more bytes than the signed length")


@pytest.mark.parametrize("bad_path", ["../escape.onnx", "/etc/evil.onnx", "sub/../../escape.onnx"])
def test_manifest_file_path_with_dotdot_or_absolute(
        scene: Scene, caplog: pytest.LogCaptureFixture, bad_path: str) -> None:
    raw = manifest_dict("tiny", 2, {bad_path: b"evil"})
    scene.repo.add_raw_targets({f"models/tiny/2/{MANIFEST_FILENAME}": json.dumps(raw).encode()})
    scene.repo.set_channel(ChannelFile(channel="stable", model="tiny", version=2))
    _refused(scene, caplog, ManifestError, "is invalid at files")
    assert not (scene.store.root / "escape.onnx").exists() and not (scene.store.models_dir / "escape.onnx").exists()


def test_channel_file_naming_a_model_with_dotdot(scene: Scene, caplog: pytest.LogCaptureFixture) -> None:
    raw = {"schema_version": 1, "channel": "stable", "model": "../../x", "version": 2,
           "rollout": {"percent": 100, "salt": ""}, "allow_downgrade": False}
    scene.repo.add_raw_targets({"channels/stable.json": json.dumps(raw).encode()})
    _refused(scene, caplog, VerificationError, "signed channel file channels/stable.json is invalid")

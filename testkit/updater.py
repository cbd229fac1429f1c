"""The update driver over a real store, with its network and serving steps stood in for.

TEST DOUBLES (named as such): `LocalDirChecker` and `LocalDirDownloader` stand in for the TUF
client and the resumable network downloader; they read an artifact tree from local disk laid
out like the TUF targets. `ConfigParsingActivator` stands in for the serving layer's load +
canary: it parses `genai_config.json` and fails when it does not parse, the way a real load
fails on such a file. The store, the journal, the state machine and the driver are real.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from agent.store.store import Store
from agent.system.hardware import probe
from agent.update.decision import CheckResult
from agent.update.journal import Journal
from agent.update.source import check_channel
from agent.update.statemachine import ModelRef, Phase
from agent.update.updater import Transition, Updater
from agent.wire.channel import ChannelFile
from agent.wire.errors import ActivationError, VerificationError
from agent.wire.manifest import MANIFEST_FILENAME, Manifest
from testkit.store import manifest_for, model_files, publish_channel, write_artifact

SHARED = b"tokenizer-json" * 64


DEVICE_ID = "dev-1"


class LocalDirChecker:
    """TEST DOUBLE for the TUF checker: reads channels/ and models/ of a local artifact tree."""

    def __init__(self, repo: Path, store: Store, channel: str = "stable", disk_cap_bytes: int | None = None) -> None:
        self.repo, self.store, self.channel, self.disk_cap_bytes = repo, store, channel, disk_cap_bytes

    def check(self, active: ModelRef | None) -> CheckResult:
        channel = ChannelFile.model_validate_json((self.repo / "channels" / f"{self.channel}.json").read_bytes())

        def load(ref: ModelRef) -> Manifest:
            return Manifest.model_validate_json(
                (self.repo / "models" / ref.name / str(ref.version) / MANIFEST_FILENAME).read_bytes())

        return check_channel(channel, active, DEVICE_ID, load, probe(self.store.root), self.disk_cap_bytes,
                             self.store)


class LocalDirDownloader:
    """TEST DOUBLE for the resumable TUF downloader: copies from a local artifact tree into staging."""

    def __init__(self, repo: Path, store: Store) -> None:
        self.repo, self.store = repo, store
        self.fetched: list[str] = []  # file paths copied, for "a shared file is fetched once"

    def _manifest(self, target: ModelRef) -> tuple[Path, bytes, Manifest]:
        src = self.repo / "models" / target.name / str(target.version)
        data = (src / MANIFEST_FILENAME).read_bytes()
        return src, data, Manifest.model_validate_json(data)

    def _part(self, sha256: str) -> Path:
        return self.store.staging_file(f"{sha256}.part")

    def download(self, target: ModelRef) -> None:
        src, _, manifest = self._manifest(target)
        for f in manifest.files:
            if not self.store.has_blob(f.sha256) and not self._part(f.sha256).is_file():
                shutil.copyfile(src / f.path, self._part(f.sha256))
                self.fetched.append(f"{target.name}/{target.version}/{f.path}")

    def verify(self, target: ModelRef) -> bytes:
        _, data, manifest = self._manifest(target)
        for f in manifest.files:
            if self.store.has_blob(f.sha256):
                continue
            part = self._part(f.sha256)
            digest = hashlib.sha256(part.read_bytes()).hexdigest()
            if digest != f.sha256:
                part.unlink()
                raise VerificationError(f"{target}: {f.path} has sha256 {digest[:12]}, expected {f.sha256[:12]}")
            self.store.adopt_blob(part, f.sha256)
        return data

    def discard(self, target: ModelRef) -> None:
        _, _, manifest = self._manifest(target)
        for f in manifest.files:
            self._part(f.sha256).unlink(missing_ok=True)


class ConfigParsingActivator:
    """TEST DOUBLE for the serving layer: "loads" by parsing genai_config.json; records what serves."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.serving: list[Path | None] = []
        self.journal_phase_at_activate: list[Phase] = []

    def activate(self, model_dir: Path, manifest: Manifest) -> None:
        self.journal_phase_at_activate.append(Journal(self.store.journal_path).load().phase)
        try:
            json.loads((model_dir / "genai_config.json").read_text())
        except ValueError as e:
            raise ActivationError(f"{manifest.name} v{manifest.version}: genai_config.json does not load: {e}") from e

    def serve(self, model_dir: Path | None) -> None:
        self.serving.append(model_dir)


class ListSink:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.transitions: list[Transition] = []
        self.usage_bytes: list[int] = []  # store usage at each transition

    def publish(self, transition: Transition) -> None:
        self.transitions.append(transition)
        self.usage_bytes.append(self.store.disk_usage_bytes())

    def phases(self) -> list[Phase]:
        return [t.to_phase for t in self.transitions]


def make_updater(repo: Path, state_dir: Path, disk_cap_bytes: int | None = None) -> Updater:
    store = Store(state_dir)
    return Updater(store, checker=LocalDirChecker(repo, store, disk_cap_bytes=disk_cap_bytes),
                   downloader=LocalDirDownloader(repo, store), activator=ConfigParsingActivator(store),
                   sink=ListSink(store), disk_cap_bytes=disk_cap_bytes)


def publish(repo: Path, version: int, *, broken_config: bool = False, **req: object) -> Manifest:
    files = model_files(version, shared=SHARED)
    if broken_config:
        files["genai_config.json"] = b'{"model": {"type": '  # signed fine, fails to load
    manifest = manifest_for("m", version, files, **req)
    write_artifact(repo, manifest, files)
    publish_channel(repo, "stable", "m", version)
    return manifest


def sink_of(u: Updater) -> ListSink:
    assert isinstance(u.sink, ListSink)
    return u.sink


def activator_of(u: Updater) -> ConfigParsingActivator:
    assert isinstance(u.activator, ConfigParsingActivator)
    return u.activator


# The phases of an update that succeeds, in order.
UPDATE_PHASES = [Phase.CHECKING, Phase.DOWNLOADING, Phase.VERIFYING, Phase.INSTALLING, Phase.ACTIVATING, Phase.ACTIVE]

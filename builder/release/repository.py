"""The operator's TUF repository (design section 2), built on `tuf.repository.Repository`.

Layout of a repository dir `DIR`:

```
DIR/repo.json              settings: thresholds, expiries (not served)
DIR/keys/<keyid>.pem       Ed25519 private keys, mode 0600, dir 0700 (never served)
DIR/state/<role>.json      the current signed metadata of each role (not served)
DIR/www/metadata/          what devices fetch: <v>.root.json, root.json, <v>.targets.json,
                           <v>.snapshot.json, timestamp.json
DIR/www/targets/           consistent-snapshot targets: <dir>/<sha256>.<basename>
```

Trust: whoever holds the keys in `keys/` can release anything to every device,
so only `www/` is ever served and key files are created 0600. Consistent
snapshots are on: every target and every targets/snapshot version has its own
immutable name, so a CDN may cache them forever and a device never sees a
half-updated repository (only `timestamp.json` changes in place).

Each CLI invocation loads the repository from disk (`TufRepo.load`), edits it
through `edit_*()`, and every `close()` writes the new metadata version to
`state/` and `www/metadata/` before the call returns.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Literal, cast

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import Field, ValidationError
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import TOP_LEVEL_ROLE_NAMES, Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.repository import Repository

from agent.wire.base import StrictModel
from agent.wire.channel import ChannelFile, channel_target_path
from agent.wire.durable import atomic_write_bytes
from agent.wire.errors import InternalError, ManifestError, RepositoryError, UsageError
from agent.wire.manifest import MANIFEST_FILENAME, Manifest
from agent.wire.paths import check_relative_path

log = logging.getLogger(__name__)

RoleName = Literal["root", "targets", "snapshot", "timestamp"]
ROLES: tuple[RoleName, ...] = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRY_S: dict[RoleName, int] = {
    "root": 365 * 86400, "targets": 90 * 86400, "snapshot": 7 * 86400, "timestamp": 86400,
}
_DURATION_RE = re.compile(r"^(\d+)([smhd])$")
_DURATION_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_COPY_CHUNK_BYTES = 1 << 20


def parse_duration_s(text: str) -> int:
    """'90d', '12h', '30m', '1s' -> seconds.

    Raises:
        UsageError: not a number followed by s, m, h or d.
    """
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise UsageError(f"duration {text!r} must be a whole number followed by s, m, h or d (e.g. 90d, 12h)")
    return int(match.group(1)) * _DURATION_UNIT_S[match.group(2)]


class RepoSettings(StrictModel):
    """`DIR/repo.json`: the settings `repo init` chose."""

    schema_version: Literal[1] = 1
    thresholds: dict[RoleName, int] = Field(default_factory=lambda: dict.fromkeys(ROLES, 1))
    expiry_s: dict[RoleName, int] = Field(default_factory=lambda: dict(DEFAULT_EXPIRY_S))


class PublishResult(StrictModel):
    """`publish --json` output."""

    schema_version: Literal[1] = 1
    model: str
    version: int
    targets: list[str]
    bytes_added: int
    targets_version: int
    timestamp_version: int


class RepoStatus(StrictModel):
    """`repo init|refresh|rotate-key --json` output."""

    schema_version: Literal[1] = 1
    repo: str
    versions: dict[str, int]
    expires: dict[str, str]
    keyids: dict[str, list[str]]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _new_metadata(role: str) -> Metadata:
    signed = {"root": Root, "targets": Targets, "snapshot": Snapshot, "timestamp": Timestamp}[role]()
    signed.version = 0  # close() bumps to 1
    return Metadata(signed)


class TufRepo(Repository):
    """A file-backed TUF repository whose keys live next to it (0600)."""

    def __init__(self, root_dir: Path, settings: RepoSettings) -> None:
        self.dir = root_dir
        self.settings = settings
        self.keys_dir = root_dir / "keys"
        self.state_dir = root_dir / "state"
        self.www_dir = root_dir / "www"
        self.metadata_dir = self.www_dir / "metadata"
        self.targets_dir = self.www_dir / "targets"
        # Extra signers for the next root version only (the old root keys during a rotation).
        self._extra_root_signers: list[Signer] = []
        # Tests sign with an expiry in the past to exercise the device's freeze-attack check.
        self.expiry_override: dict[str, dt.datetime] = {}

    # -- creation and loading ------------------------------------------------
    @classmethod
    def init(cls, root_dir: Path, settings: RepoSettings) -> TufRepo:
        """Create keys and the first version of every role.

        Raises:
            RepositoryError: `root_dir` already holds a repository.
        """
        if (root_dir / "repo.json").exists():
            raise RepositoryError(f"{root_dir} already holds a repository (repo.json exists): pick another dir")
        for role, n in settings.thresholds.items():
            if n < 1:
                raise UsageError(f"threshold of {role} must be at least 1, got {n}")
        root_dir.mkdir(parents=True, exist_ok=True)
        repo = cls(root_dir, settings)
        repo.keys_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(repo.keys_dir, 0o700)
        for d in (repo.state_dir, repo.metadata_dir, repo.targets_dir):
            d.mkdir(parents=True, exist_ok=True)
        root_md = _new_metadata("root")
        root = root_md.signed
        if not isinstance(root, Root):
            raise InternalError("a new root.json holds no root metadata")
        root.consistent_snapshot = True
        for role in ROLES:
            root.roles[role].threshold = settings.thresholds[role]
            for _ in range(settings.thresholds[role]):
                signer = repo._generate_key()
                root.add_key(signer.public_key, role)
        repo.close("root", root_md)
        for role in ("targets", "snapshot", "timestamp"):
            with repo.edit(role):
                pass
        # Written last: its presence marks a complete repository (a crashed init can be rerun).
        atomic_write_bytes(root_dir / "repo.json", settings.model_dump_json(indent=2).encode())
        log.info("event=repo_init repo=%s", root_dir)
        return repo

    @classmethod
    def load(cls, root_dir: Path) -> TufRepo:
        """Raises: RepositoryError: `root_dir` is not a repository made by `repo init`."""
        path = root_dir / "repo.json"
        try:
            settings = RepoSettings.model_validate_json(path.read_bytes())
        except FileNotFoundError as e:
            raise RepositoryError(f"{root_dir} is not a repository (no repo.json):"
                                  f" run `edge-builder repo init {root_dir}`") from e
        except ValidationError as e:
            raise RepositoryError(f"{path} is invalid: {e.errors()[0]['msg']}") from e
        return cls(root_dir, settings)

    # -- keys -----------------------------------------------------------------
    def _generate_key(self) -> CryptoSigner:
        signer = CryptoSigner.generate_ed25519()
        path = self.keys_dir / f"{signer.public_key.keyid}.pem"
        # O_EXCL + 0600 at creation: the private key is never readable by others, not even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signer.private_bytes)
            f.flush()
            os.fsync(f.fileno())
        return signer

    # -- Repository interface ---------------------------------------------------
    def open(self, role: str) -> Metadata:
        path = self.state_dir / f"{role}.json"
        if not path.exists():
            if role == "root":
                raise RepositoryError(f"{self.dir} has no root metadata: run `edge-builder repo init`")
            return _new_metadata(role)
        return Metadata.from_bytes(path.read_bytes())

    def close(self, role: str, md: Metadata) -> None:
        md.signed.version += 1
        md.signed.expires = self.expiry_override.get(role) or (
            _utcnow() + dt.timedelta(seconds=self.settings.expiry_s[cast(RoleName, role)]))
        md.signatures.clear()
        if role == "root":
            # A new root must verify with its own keys, and during a rotation also
            # with the previous root's keys (the extra signers).
            if not isinstance(md.signed, Root):
                raise RepositoryError(f"{role}.json holds {md.signed.type} metadata, not root:"
                                      " the repository is damaged")
            signers = self._signers_for(md.signed, "root") + self._extra_root_signers
        else:
            signers = self._signers_for(self.root(), role)
        seen: set[str] = set()
        for signer in signers:
            if signer.public_key.keyid in seen:
                continue
            seen.add(signer.public_key.keyid)
            md.sign(signer, append=True)
        data = md.to_bytes()
        self._write_metadata(role, md.signed.version, data)
        log.info("event=metadata_signed role=%s version=%d expires=%s", role, md.signed.version,
                 md.signed.expires.isoformat())

    def _signers_for(self, root: Root, role: str) -> list[Signer]:
        """The signers of `role` under `root` whose private keys are in keys/."""
        signers: list[Signer] = []
        for keyid in root.roles[role].keyids:
            path = self.keys_dir / f"{keyid}.pem"
            if not path.is_file():
                continue  # an offline key: the threshold check below reports it
            private_key = load_pem_private_key(path.read_bytes(), None)
            signers.append(CryptoSigner(private_key, root.get_key(keyid)))  # type: ignore[arg-type]
        if len(signers) < root.roles[role].threshold:
            raise RepositoryError(
                f"role {role} needs {root.roles[role].threshold} key(s) but {len(signers)} are in {self.keys_dir}: "
                "copy the missing private keys there"
            )
        return signers

    def _write_metadata(self, role: str, version: int, data: bytes) -> None:
        # Served files first, then state: a crash in between leaves an extra
        # unreferenced file, never a state that points at a missing one.
        if role == "timestamp":
            atomic_write_bytes(self.metadata_dir / "timestamp.json", data)
        else:
            atomic_write_bytes(self.metadata_dir / f"{version}.{role}.json", data)
            if role == "root":
                # Unversioned copy: the file an operator provisions onto devices.
                atomic_write_bytes(self.metadata_dir / "root.json", data)
        atomic_write_bytes(self.state_dir / f"{role}.json", data)

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {"targets.json": MetaFile(self.targets().version)}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(self.snapshot().version)

    def _resign_snapshot_timestamp(self) -> None:
        self.do_snapshot()
        self.do_timestamp()

    # -- targets ----------------------------------------------------------------
    def target_file_path(self, target_path: str, sha256: str) -> Path:
        """Where a consistent-snapshot target lives under www/targets/."""
        check_relative_path(target_path)
        dirname, _, basename = target_path.rpartition("/")
        return self.targets_dir / dirname / f"{sha256}.{basename}"

    def _store_target_bytes(self, target_path: str, data: bytes) -> TargetFile:
        info = TargetFile.from_data(target_path, data, ["sha256"])
        dest = self.target_file_path(target_path, info.hashes["sha256"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, data)
        return info

    def add_raw_targets(self, targets: dict[str, bytes]) -> int:
        """Sign arbitrary target bytes (used by channel set, and by tests playing a
        compromised operator). Returns the new targets version."""
        infos = {p: self._store_target_bytes(p, data) for p, data in targets.items()}
        with self.edit_targets() as t:
            t.targets.update(infos)
        self._resign_snapshot_timestamp()
        return self.targets().version

    def published_versions(self, model: str) -> list[int]:
        versions = []
        prefix = f"models/{model}/"
        for path in self.targets().targets:
            if path.startswith(prefix) and path.endswith("/" + MANIFEST_FILENAME):
                middle = path[len(prefix):-len(MANIFEST_FILENAME) - 1]
                if middle.isdigit():
                    versions.append(int(middle))
        return sorted(versions)

    def publish(self, artifact_dir: Path) -> PublishResult:
        """Add an artifact (manifest + files) as targets and re-sign.

        Raises:
            ManifestError: the manifest is invalid or a file does not match it.
            RepositoryError: the version is not higher than the last published one.
        """
        manifest_path = artifact_dir / MANIFEST_FILENAME
        try:
            manifest_bytes = manifest_path.read_bytes()
            manifest = Manifest.model_validate_json(manifest_bytes)
        except FileNotFoundError as e:
            raise ManifestError(f"{manifest_path} does not exist: build the artifact with `edge-builder build`") from e
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise ManifestError(f"{manifest_path} is invalid at {where}: {first['msg']}") from e
        published = self.published_versions(manifest.name)
        if published and manifest.version <= published[-1]:
            raise RepositoryError(
                f"{manifest.name} v{manifest.version} is not higher than the last published v{published[-1]}: "
                f"rebuild with --version {published[-1] + 1}"
            )
        prefix = manifest.target_prefix()
        infos: dict[str, TargetFile] = {}
        bytes_added = 0
        for f in manifest.files:
            src = artifact_dir / f.path
            if src.is_symlink() or not src.is_file():
                raise ManifestError(f"{src} listed in the manifest is missing or not a regular file")
            target_path = f"{prefix}/{f.path}"
            dest = self.target_file_path(target_path, f.sha256)
            bytes_added += self._copy_verified(src, dest, f.size, f.sha256)
            infos[target_path] = TargetFile(f.size, {"sha256": f.sha256}, target_path)
        manifest_target = f"{prefix}/{MANIFEST_FILENAME}"
        infos[manifest_target] = self._store_target_bytes(manifest_target, manifest_bytes)
        with self.edit_targets() as t:
            t.targets.update(infos)
        self._resign_snapshot_timestamp()
        log.info("event=published model=%s version=%d files=%d bytes=%d", manifest.name, manifest.version,
                 len(manifest.files), bytes_added)
        return PublishResult(model=manifest.name, version=manifest.version, targets=sorted(infos),
                             bytes_added=bytes_added, targets_version=self.targets().version,
                             timestamp_version=self.timestamp().version)

    @staticmethod
    def _copy_verified(src: Path, dest: Path, size: int, sha256: str) -> int:
        """Copy `src` to `dest` checking size and hash on the way; returns bytes written (0 if present)."""
        if dest.is_file() and dest.stat().st_size == size:
            return 0  # content-addressed: same hash, same bytes (a file shared by two versions)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}.{os.getpid()}")
        digest = hashlib.sha256()
        written = 0
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_COPY_CHUNK_BYTES):
                digest.update(chunk)
                fout.write(chunk)
                written += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        if written != size or digest.hexdigest() != sha256:
            tmp.unlink()
            raise ManifestError(
                f"{src} does not match its manifest entry: {written} bytes sha256 {digest.hexdigest()[:12]}..., "
                f"manifest says {size} bytes sha256 {sha256[:12]}...: rebuild the artifact"
            )
        os.replace(tmp, dest)
        return written

    # -- channels ---------------------------------------------------------------
    def set_channel(self, channel: ChannelFile) -> int:
        """Sign `channels/<channel>.json`. Returns the new targets version.

        Raises:
            RepositoryError: the model version is not published.
        """
        if channel.version not in self.published_versions(channel.model):
            raise RepositoryError(
                f"{channel.model} v{channel.version} is not published in {self.dir} "
                f"(published: {self.published_versions(channel.model) or 'none'}): run `edge-builder publish` first"
            )
        current = self.read_channel(channel.channel)
        if current and current.model == channel.model and channel.version < current.version \
                and not channel.allow_downgrade:
            log.warning("event=channel_lower_version channel=%s from=%d to=%d allow_downgrade=false "
                        "note=devices_on_the_higher_version_will_refuse", channel.channel, current.version,
                        channel.version)
        data = channel.model_dump_json(indent=2).encode()
        version = self.add_raw_targets({channel_target_path(channel.channel): data})
        log.info("event=channel_set channel=%s model=%s version=%d percent=%d allow_downgrade=%s",
                 channel.channel, channel.model, channel.version, channel.rollout.percent,
                 str(channel.allow_downgrade).lower())
        return version

    def read_channel(self, name: str) -> ChannelFile | None:
        info = self.targets().targets.get(channel_target_path(name))
        if info is None:
            return None
        path = self.target_file_path(info.path, info.hashes["sha256"])
        return ChannelFile.model_validate_json(path.read_bytes())

    # -- maintenance ------------------------------------------------------------
    def refresh(self, now: dt.datetime | None = None) -> None:
        """Re-sign timestamp always, and snapshot (and targets) when less than half
        their validity remains, so a cron job keeps devices from seeing expired metadata."""
        now = now or _utcnow()
        for role in ("targets", "snapshot"):
            md = self.open(role)
            left_s = (md.signed.expires - now).total_seconds()
            if left_s < self.settings.expiry_s[role] / 2:
                with self.edit(role):
                    pass
        self.do_snapshot()
        self.do_timestamp(force=True)

    def rotate_key(self, role: str) -> list[str]:
        """Replace every key of `role` with fresh ones; returns the new keyids.

        For root, the new root version is signed by the old keys and the new
        keys, so devices verify the chain N -> N+1 and follow it. The old
        private keys are deleted afterwards.
        """
        if role not in TOP_LEVEL_ROLE_NAMES:
            raise UsageError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
        old_root = self.root()
        old_keyids = list(old_root.roles[role].keyids)
        if role == "root":
            self._extra_root_signers = self._signers_for(old_root, "root")
        new_signers = [self._generate_key() for _ in range(self.settings.thresholds[cast(RoleName, role)])]
        try:
            with self.edit_root() as root:
                for keyid in old_keyids:
                    root.revoke_key(keyid, role)
                for signer in new_signers:
                    root.add_key(signer.public_key, role)
        finally:
            self._extra_root_signers = []
        if role in ("targets", "snapshot", "timestamp"):
            # Re-sign with the new key so devices accept the role after updating root.
            with self.edit(role):
                pass
        self.do_snapshot(force=role in ("snapshot", "targets"))
        self.do_timestamp(force=True)
        still_used = {k for r in self.root().roles.values() for k in r.keyids}
        for keyid in old_keyids:
            if keyid not in still_used:
                (self.keys_dir / f"{keyid}.pem").unlink(missing_ok=True)
        log.info("event=key_rotated role=%s old=%s new=%s", role, ",".join(old_keyids),
                 ",".join(s.public_key.keyid for s in new_signers))
        return [s.public_key.keyid for s in new_signers]

    def status(self) -> RepoStatus:
        versions: dict[str, int] = {}
        expires: dict[str, str] = {}
        for role in ROLES:
            signed = self.open(role).signed
            versions[role] = signed.version
            expires[role] = signed.expires.isoformat()
        root = self.root()
        return RepoStatus(repo=str(self.dir), versions=versions, expires=expires,
                          keyids={r: list(root.roles[r].keyids) for r in ROLES})


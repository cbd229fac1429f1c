"""The device store (design section 4): content-addressed blobs, complete model
dirs made of hard links, and the `current` / `previous` symlinks.

Crash safety: every change becomes visible through one rename(2), after the
data it exposes is fsynced. So after `kill -9` or power loss at any instant a
model dir under `models/` is either complete or absent (it is assembled under
a temporary name and renamed into place), and `current` is either the old or
the new symlink. Blobs are only ever added after their hash was verified.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent.errors import StoreError
from agent.manifest import MANIFEST_FILENAME, Manifest, check_sha256
from agent.paths import check_relative_path

_TMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so that a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Store:
    """Paths and the atomic operations of the on-device store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trust_dir = root / "trust"
        self.blobs_dir = root / "blobs" / "sha256"
        self.models_dir = root / "models"
        self.staging_dir = root / "staging"
        self.outbox_dir = root / "outbox"
        self.current_link = root / "current"
        self.previous_link = root / "previous"
        self.journal_path = root / "state.json"

    def ensure_layout(self) -> None:
        for d in (self.trust_dir, self.blobs_dir, self.models_dir, self.staging_dir, self.outbox_dir):
            d.mkdir(parents=True, exist_ok=True)

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blobs_dir / check_sha256(sha256)

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def staging_file(self, name: str) -> Path:
        check_relative_path(name)
        if "/" in name:
            raise StoreError(f"staging name {name!r} must be a plain file name")
        return self.staging_dir / name

    def adopt_blob(self, verified_file: Path, sha256: str) -> Path:
        """Move a file whose hash the caller has verified into `blobs/sha256/`."""
        dest = self.blob_path(sha256)
        with open(verified_file, "rb") as f:
            os.fsync(f.fileno())
        os.replace(verified_file, dest)
        fsync_dir(self.blobs_dir)
        return dest

    # -- model dirs ----------------------------------------------------------
    def model_dir(self, name: str, version: int) -> Path:
        return self.models_dir / name / str(version)

    def has_model(self, name: str, version: int) -> bool:
        return (self.model_dir(name, version) / MANIFEST_FILENAME).is_file()

    def assemble_model(self, manifest: Manifest, manifest_bytes: bytes) -> Path:
        """Hard-link the manifest's blobs into `models/<name>/<version>/`, atomically.

        Raises:
            StoreError: a blob is missing (download it first).
        """
        final = self.model_dir(manifest.name, manifest.version)
        if self.has_model(manifest.name, manifest.version):
            return final
        missing = [f.path for f in manifest.files if not self.has_blob(f.sha256)]
        if missing:
            raise StoreError(f"cannot assemble {manifest.name} v{manifest.version}: blobs missing for {missing}")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{_TMP_PREFIX}{manifest.version}.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for f in manifest.files:
            dest = tmp / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.blob_path(f.sha256), dest)
        # The manifest goes in last: its presence marks the dir complete.
        atomic_write_bytes(tmp / MANIFEST_FILENAME, manifest_bytes)
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return final

    # -- symlinks ------------------------------------------------------------
    def _read_link(self, link: Path) -> Path | None:
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        return (link.parent / target).resolve()

    def current(self) -> Path | None:
        return self._read_link(self.current_link)

    def previous(self) -> Path | None:
        return self._read_link(self.previous_link)

    def _point(self, link: Path, target: Path) -> None:
        rel = os.path.relpath(target, link.parent)
        tmp = link.with_name(f"{_TMP_PREFIX}{link.name}.{os.getpid()}")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(rel, tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)

    def switch_current(self, target: Path) -> None:
        """Point `current` at `target` and `previous` at what `current` was."""
        if not (target / MANIFEST_FILENAME).is_file():
            raise StoreError(f"refusing to point current at {target}: not a complete model dir")
        old = self.current()
        if old is not None and old != target.resolve():
            self._point(self.previous_link, old)
        self._point(self.current_link, target)

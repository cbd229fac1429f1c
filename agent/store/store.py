"""The device store (design section 4): content-addressed blobs, complete model
dirs made of hard links, and the `current` / `previous` symlinks.

Crash safety: every change becomes visible through one rename(2), after the
data it exposes is fsynced. So after `kill -9` or power loss at any instant a
model dir under `models/` is either complete or absent (it is assembled under
a temporary name and renamed into place), and `current` is either the old or
the new symlink. Blobs are only ever added after their hash was verified.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from agent.wire.base import FrozenModel
from agent.wire.durable import TMP_PREFIX, atomic_write_bytes, fsync_dir
from agent.wire.errors import StoreError
from agent.wire.hashing import sha256_file
from agent.wire.manifest import MANIFEST_FILENAME, Manifest, check_sha256
from agent.wire.paths import check_relative_path

log = logging.getLogger(__name__)


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
        """Create the store's dirs.

        Raises:
            StoreError: the state dir cannot be written (under systemd's ProtectSystem=strict every
                path the unit does not name in ReadWritePaths= is read-only).
        """
        for d in (self.trust_dir, self.blobs_dir, self.models_dir, self.staging_dir, self.outbox_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(
                    f"state_dir {self.root} cannot be written ({e.strerror or e}: {d}): under systemd, a state_dir"
                    " other than /var/lib/edge-agent needs `ReadWritePaths=<state_dir>` in a drop-in"
                    " (`systemctl edit edge-agent`); elsewhere, give the agent's user write access to it"
                ) from e

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blobs_dir / check_sha256(sha256)

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def partial_path(self, sha256: str) -> Path:
        """Where the partial download of blob `sha256` lives (resumed after a restart)."""
        return self.staging_file(f"{check_sha256(sha256)}.part")

    def discard_partials(self, manifest: Manifest) -> None:
        """Delete the partial downloads of `manifest`'s files (its update is over or abandoned)."""
        for f in manifest.files:
            self.partial_path(f.sha256).unlink(missing_ok=True)

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
        tmp = final.parent / f"{TMP_PREFIX}{manifest.version}.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            for f in manifest.files:
                dest = tmp / f.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.blob_path(f.sha256), dest)
            # The manifest goes in last: its presence marks the dir complete.
            atomic_write_bytes(tmp / MANIFEST_FILENAME, manifest_bytes)
            fsync_dir(tmp)
            os.replace(tmp, final)
        except (OSError, StoreError) as e:
            # Nothing half-assembled stays behind to hold space or inodes until the next recover().
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"cannot assemble {manifest.name} v{manifest.version} in {final.parent}: {e}: "
                             "check free disk space and permissions of the state dir") from e
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
        tmp = link.with_name(f"{TMP_PREFIX}{link.name}.{os.getpid()}")
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

    def remove_current(self) -> None:
        """Remove `current` (a first install that failed has nothing to go back to)."""
        try:
            self.current_link.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.root)

    def rollback(self) -> Path:
        """Point `current` back at `previous`, then drop `previous`.

        Crash safety: the rename of `current` comes first, so a crash in between
        leaves both links on the old model, which is complete; the failed model
        is left unreferenced and GC may remove it.

        Raises:
            StoreError: there is no `previous`, or it is not a complete model dir.
        """
        prev = self.previous()
        if prev is None:
            raise StoreError(f"cannot roll back in {self.root}: there is no previous model")
        if not (prev / MANIFEST_FILENAME).is_file():
            raise StoreError(f"cannot roll back to {prev}: it is not a complete model dir")
        self._point(self.current_link, prev)
        self.previous_link.unlink()
        fsync_dir(self.root)
        log.info("event=rollback current=%s", prev)
        return prev

    # -- usage, garbage collection, recovery, invariants -----------------------
    def disk_usage_bytes(self) -> int:
        """Bytes of every file under the store root, a hard-linked file counted once."""
        return _usage(self.root)[0]

    def protected_usage_bytes(self, keep: set[Path] | frozenset[Path] = frozenset()) -> int:
        """Bytes GC may not remove: `current`, `previous`, `staging/` and `keep`, a hard-linked file once."""
        roots = [p for p in (self.current(), self.previous(), self.staging_dir, *keep) if p is not None]
        seen: set[tuple[int, int]] = set()
        total = 0
        for root in roots:
            files = [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
            for f in files:
                st = f.stat()
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
        return total

    def missing_bytes(self, manifest: Manifest) -> int:
        """Bytes installing `manifest` adds: files whose blob is not here yet, plus the manifest twice
        (the verified copy staged until the switch is done, and the model dir's own)."""
        missing = sum(f.size for f in manifest.files if not self.has_blob(f.sha256))
        return missing + 2 * len(manifest.model_dump_json(indent=1))

    def local_manifest(self, name: str, version: int) -> Manifest | None:
        """The manifest of `name` v`version` without the network: the one staged by the check (also
        after a restart mid-update), else the installed one; None when neither is readable."""
        candidates = sorted(self.staging_dir.glob(f"{name}-{version}.*json"))
        candidates.append(self.model_dir(name, version) / MANIFEST_FILENAME)
        for path in candidates:
            try:
                return Manifest.model_validate_json(path.read_bytes())
            except (OSError, ValueError):
                continue
        return None

    def model_dirs(self) -> list[Path]:
        """Complete model dirs (`models/<name>/<version>/` with a manifest)."""
        out: list[Path] = []
        if not self.models_dir.is_dir():
            return out
        for name_dir in sorted(self.models_dir.iterdir()):
            if not name_dir.is_dir() or name_dir.name.startswith(TMP_PREFIX):
                continue
            for ver_dir in sorted(name_dir.iterdir()):
                if ver_dir.is_dir() and not ver_dir.name.startswith(TMP_PREFIX):
                    out.append(ver_dir)
        return out

    def gc(self, disk_cap_bytes: int, keep: set[Path] | frozenset[Path] = frozenset()) -> GcReport:
        """Delete what nothing needs, oldest first, until the store uses at most `disk_cap_bytes`.

        Never removed: `current`, `previous`, anything at or under a path in
        `keep` (the caller names its work in progress: staging files of an update
        under way, the model dir being activated, blobs adopted but not yet
        assembled), and `.tmp-*` entries (an assembly may be running; `recover()`
        removes them at start-up). Order: staging files not kept, then blobs no
        model links (link count 1), then whole model dirs by age, each followed by
        the blobs it alone held. Nothing is removed when usage is within the cap.

        Crash safety: a model dir is first renamed to a `.tmp-` name, so a crash
        mid-delete leaves no half model dir under its real name.
        """
        protected = {p.resolve() for p in keep}
        for link in (self.current(), self.previous()):
            if link is not None:
                protected.add(link)

        def is_kept(path: Path) -> bool:
            rp = path.resolve()
            return any(rp == k or k in rp.parents for k in protected)

        used = before = self.disk_usage_bytes()
        removed: list[str] = []

        def drop_file(path: Path) -> None:
            nonlocal used
            st = path.stat()
            path.unlink()
            if st.st_nlink == 1:
                used -= st.st_size
            removed.append(str(path.relative_to(self.root)))

        def drop_orphan_blobs() -> None:
            for blob in _oldest_first(self.blobs_dir.iterdir() if self.blobs_dir.is_dir() else []):
                if used <= disk_cap_bytes:
                    return
                if blob.is_file() and blob.stat().st_nlink == 1 and not is_kept(blob):
                    drop_file(blob)

        if used > disk_cap_bytes and self.staging_dir.is_dir():
            for f in _oldest_first(p for p in self.staging_dir.rglob("*") if p.is_file()):
                if used <= disk_cap_bytes:
                    break
                if not is_kept(f) and not f.name.startswith(TMP_PREFIX):
                    drop_file(f)
        if used > disk_cap_bytes:
            drop_orphan_blobs()
        for model in sorted(self.model_dirs(), key=_model_age_key):
            if used <= disk_cap_bytes:
                break
            if is_kept(model):
                continue
            doomed = model.parent / f"{TMP_PREFIX}del-{model.name}.{os.getpid()}"
            os.replace(model, doomed)
            fsync_dir(model.parent)
            shutil.rmtree(doomed)
            used = self.disk_usage_bytes()  # its files were mostly links: measure what it really freed
            removed.append(str(model.relative_to(self.root)))
            drop_orphan_blobs()
            if not any(model.parent.iterdir()):
                model.parent.rmdir()
        if used > disk_cap_bytes:
            drop_orphan_blobs()
        after = self.disk_usage_bytes()
        report = GcReport(disk_cap_bytes=disk_cap_bytes, before_bytes=before, after_bytes=after,
                          removed=removed, is_within_cap=after <= disk_cap_bytes)
        log.info("event=gc cap_bytes=%d before_bytes=%d after_bytes=%d removed=%d within_cap=%s",
                 disk_cap_bytes, before, after, len(removed), report.is_within_cap)
        return report

    def recover(self) -> list[str]:
        """Start-up cleanup after a crash; returns what it removed (relative paths).

        Removes leftover `.tmp-*` files, links and dirs (half-assembled model dirs,
        half-deleted ones, temporary links and journal files), and a `current` or
        `previous` link that does not point at a complete model dir. Partial
        downloads in `staging/` stay: they resume. Run it only while no other
        process works in this store.
        """
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        candidates: list[Path] = []
        for d in (self.root, self.blobs_dir, self.models_dir, self.staging_dir):
            if d.is_dir():
                candidates.extend(p for p in d.iterdir() if p.name.startswith(TMP_PREFIX))
        if self.models_dir.is_dir():
            for name_dir in self.models_dir.iterdir():
                if name_dir.is_dir() and not name_dir.is_symlink():
                    candidates.extend(p for p in name_dir.iterdir() if p.name.startswith(TMP_PREFIX))
        for p in candidates:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(str(p.relative_to(self.root)))
        for link in (self.current_link, self.previous_link):
            if link.is_symlink() and not (link / MANIFEST_FILENAME).is_file():
                log.warning("event=dangling_link link=%s target=%s", link.name, os.readlink(link))
                link.unlink()
                removed.append(link.name)
        for parent in {p.parent for p in candidates} | {self.root}:
            fsync_dir(parent)
        if removed:
            log.info("event=store_recover removed=%s", ",".join(removed))
        return removed

    def check_model_dir(self, model: Path, *, verify_hashes: bool) -> list[str]:
        """What is wrong with one model dir (empty when it is complete and made of blob links)."""
        problems: list[str] = []
        try:
            manifest = Manifest.model_validate_json((model / MANIFEST_FILENAME).read_bytes())
        except (OSError, ValueError) as e:
            return [f"{model}: no valid {MANIFEST_FILENAME} ({e.__class__.__name__}: {e})"]
        if model.resolve() != self.model_dir(manifest.name, manifest.version).resolve():
            problems.append(f"{model}: holds {manifest.name} v{manifest.version}, which belongs elsewhere")
        listed = {MANIFEST_FILENAME} | {f.path for f in manifest.files}
        for p in model.rglob("*"):
            if p.is_file() and str(p.relative_to(model)) not in listed:
                problems.append(f"{model}: file {p.relative_to(model)} is not in the manifest")
        for f in manifest.files:
            path = model / f.path
            try:
                st = path.lstat()
            except FileNotFoundError:
                problems.append(f"{model}: {f.path} is missing")
                continue
            if not path.is_file() or path.is_symlink():
                problems.append(f"{model}: {f.path} is not a regular file")
                continue
            if st.st_size != f.size:
                problems.append(f"{model}: {f.path} has {st.st_size} bytes, manifest says {f.size}")
            blob = self.blob_path(f.sha256)
            if not blob.is_file() or not os.path.samefile(blob, path):
                problems.append(f"{model}: {f.path} is not a hard link to blob {f.sha256[:12]}")
            if verify_hashes and st.st_size == f.size and sha256_file(path) != f.sha256:
                problems.append(f"{model}: {f.path} does not match its sha256 {f.sha256[:12]}")
        return problems

    def check_invariants(self) -> list[str]:
        """Design section 4's invariants, for crash tests; empty when they all hold.

        `current` (and `previous`) is absent or a symlink to a complete model dir
        whose files match the manifest's sizes and hashes; no half-written model
        dir and no `.tmp-*` leftover (after `recover()`); every model file is a
        hard link to its blob.
        """
        problems: list[str] = []
        for link in (self.current_link, self.previous_link):
            if not link.exists() and not link.is_symlink():
                continue
            if not link.is_symlink():
                problems.append(f"{link.name} is not a symlink")
                continue
            target = self._read_link(link)
            if target is None:
                continue  # removed since the check above
            if self.models_dir.resolve() not in target.parents:
                problems.append(f"{link.name} points outside models/: {target}")
                continue
            problems += [f"{link.name}: {p}" for p in self.check_model_dir(target, verify_hashes=True)]
        for d in (self.root, self.blobs_dir, self.models_dir, self.staging_dir):
            if d.is_dir():
                problems += [f"leftover {p.relative_to(self.root)}" for p in d.iterdir()
                             if p.name.startswith(TMP_PREFIX)]
        if self.models_dir.is_dir():
            for name_dir in self.models_dir.iterdir():
                if not name_dir.is_dir():
                    problems.append(f"models/{name_dir.name} is not a directory")
                    continue
                for ver_dir in name_dir.iterdir():
                    if ver_dir.name.startswith(TMP_PREFIX):
                        problems.append(f"half-written model dir {ver_dir.relative_to(self.root)}")
                    else:
                        problems += self.check_model_dir(ver_dir, verify_hashes=False)
        return problems


class GcReport(FrozenModel):
    schema_version: Literal[1] = 1
    disk_cap_bytes: int
    before_bytes: int
    after_bytes: int
    removed: list[str]
    is_within_cap: bool


def _usage(root: Path) -> tuple[int, int]:
    seen: set[tuple[int, int]] = set()
    total = files = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_size
            files += 1
    return total, files


def _oldest_first(paths: Iterable[Path]) -> list[Path]:
    # Ties broken by name so that the order (and the tests) are deterministic.
    return sorted(paths, key=lambda p: (p.lstat().st_mtime_ns, str(p)))


def _model_age_key(model: Path) -> tuple[int, str, int]:
    # Assembly time first; ties (coarse clocks) broken by name, then numeric version.
    version = int(model.name) if model.name.isdigit() else 0
    return model.stat().st_mtime_ns, model.parent.name, version


"""Write and check `manifest.json`: every file with its size and sha256.

The manifest is validated with agent.wire.manifest.Manifest before it is written,
so the builder can never publish something the device would refuse.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from agent.wire.errors import ManifestError
from agent.wire.hashing import sha256_file
from agent.wire.manifest import MANIFEST_FILENAME, Manifest, ManifestFile


def list_files(artifact_dir: Path) -> list[ManifestFile]:
    """Every regular file under `artifact_dir` except the manifest, sorted by path.

    Raises:
        ManifestError: a symlink or special file is present (the device refuses them).
    """
    files: list[ManifestFile] = []
    for path in sorted(artifact_dir.rglob("*")):
        rel = path.relative_to(artifact_dir).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise ManifestError(f"{path} is a symlink or special file: an artifact holds regular files only")
        if path.is_dir() or rel == MANIFEST_FILENAME:
            continue
        files.append(ManifestFile(path=rel, size=path.stat().st_size, sha256=sha256_file(path)))
    return files


def write_manifest(artifact_dir: Path, manifest: Manifest) -> Path:
    """Write `manifest.json` (validated again from its own JSON) and fsync it."""
    text = manifest.model_dump_json(indent=2) + "\n"
    Manifest.model_validate_json(text)  # what the device will parse: round-trip before writing
    path = artifact_dir / MANIFEST_FILENAME
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_manifest(artifact_dir: Path) -> Manifest:
    """Parse `artifact_dir/manifest.json`.

    Raises:
        ManifestError: missing or not valid.
    """
    path = artifact_dir / MANIFEST_FILENAME
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}") from e
    except ValidationError as e:
        raise ManifestError(f"{path} is not a valid manifest: {e.errors()[0]['msg']} at {e.errors()[0]['loc']}") from e


def verify_artifact(artifact_dir: Path) -> Manifest:
    """The manifest, after checking that the folder holds exactly its files with matching sizes and hashes.

    Raises:
        ManifestError: a file is missing, extra, or differs.
    """
    manifest = read_manifest(artifact_dir)
    actual = {f.path: f for f in list_files(artifact_dir)}
    listed = {f.path: f for f in manifest.files}
    if extra := sorted(set(actual) - set(listed)):
        raise ManifestError(f"{artifact_dir} holds files the manifest does not list: {', '.join(extra[:5])}")
    if missing := sorted(set(listed) - set(actual)):
        raise ManifestError(f"{artifact_dir} lacks files the manifest lists: {', '.join(missing[:5])}")
    for path, f in listed.items():
        if actual[path] != f:
            raise ManifestError(
                f"{artifact_dir}/{path} differs from the manifest (size {actual[path].size} vs {f.size}, "
                f"sha256 {actual[path].sha256[:12]} vs {f.sha256[:12]}): rebuild the artifact"
            )
    return manifest

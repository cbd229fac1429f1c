"""Validation of relative artifact paths: the one rule for manifests, TUF target
paths and the store.

An attacker who controls a manifest or a target name must not be able to make
the agent write outside a model dir. So a path is accepted only when it is a
plain relative POSIX path: no absolute path, no `..`, no `.` segment, no empty
segment, no backslash, no NUL, no drive letter.
"""

from __future__ import annotations

MAX_PATH_CHARS = 512


def check_relative_path(path: str) -> str:
    """Return `path` unchanged if it is a safe relative path, else raise ValueError."""
    if not path:
        raise ValueError("empty path")
    if len(path) > MAX_PATH_CHARS:
        raise ValueError(f"path longer than {MAX_PATH_CHARS} characters: {path[:40]!r}...")
    if "\x00" in path or "\\" in path:
        raise ValueError(f"path {path!r} holds a NUL or a backslash")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise ValueError(f"path {path!r} is absolute; only relative paths are allowed")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"path {path!r} has an empty, '.' or '..' segment")
    return path

"""How every file of ours reaches disk: whole, or not at all, even across a power cut.

`atomic_write_bytes` gives readers the old or the new content, never a mix;
`fsync_dir` makes a rename itself durable. The journal, the outbox, the store's
model dirs, the operator's repository settings and rollout record are all
written this way, so both sides share it with the formats themselves.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

TMP_PREFIX = ".tmp-"  # names the store's cleanup may delete: never a finished file


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so that a reader sees the old or the new content, never a mix."""
    # Unique per thread too: two threads writing the same file must not share a temp file.
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk must not also keep the half-written temp file: it holds the space a retry needs.
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

"""Durable file writes: what survives a power cut, and when the disk is told.

`atomic_write_bytes` gives readers the old or the new content, never a mix;
`fsync_dir` makes a rename itself durable; `start_writeback` asks the kernel
to begin writing a range of a file now, so a later fsync has little left to
wait for (a download flushes as it goes instead of all at the end).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from agent import libc

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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait
_sync_file_range = libc.function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing `length` bytes at `offset` of `fd` to disk without waiting.

    Only a hint that spreads the disk work over the download: durability still
    comes from the fsync before the rename. A no-op where sync_file_range(2)
    is missing (not Linux); errors are ignored for the same reason.
    """
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

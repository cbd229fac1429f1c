"""One builder at a time per output: an advisory file lock beside the path it guards.

Two builds of the same OUT (two operators, two CI workers) or of the same cache entry
would otherwise remove each other's work in progress. The second waits for the first,
then finds its result and reuses it. A cache entry is made in a temp dir and renamed into place.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def lock_path(guarded: Path) -> Path:
    """The lock file of `guarded`: a hidden sibling, so it lives on the same filesystem."""
    return guarded.with_name(f".{guarded.name}.lock")


@contextmanager
def exclusive(guarded: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock of `guarded` for the block; waits while another process holds it, after
    calling `on_wait` (to tell the user why nothing moves).

    The lock file is removed on release. A waiter may then hold a lock on the removed file while a
    newcomer creates a fresh one, so a holder checks that the file it locked is still the one at
    the path, and starts over if not.
    """
    path = lock_path(guarded)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                is_current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                is_current = False
            if is_current:
                try:
                    yield
                finally:
                    path.unlink(missing_ok=True)
                return
        finally:
            os.close(fd)


def atomic_dir(final: Path, make: Callable[[Path], object]) -> Path:
    """Build a cache entry in a sibling temp dir and rename it into place."""
    if final.exists():
        return final
    with exclusive(final):  # another build may be making the same entry: wait for it
        if final.exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            make(tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final

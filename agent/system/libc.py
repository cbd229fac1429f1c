"""The C library, for the few Linux/glibc calls Python's os module lacks.

Each helper is a no-op (returns False or None) where the call does not exist:
not Linux, not glibc (musl has no mallopt/malloc_trim), so callers never
branch on the platform.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

_M_ARENA_MAX = -8  # <malloc.h>


@functools.cache
def libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The process's own symbols, libc's among them: no ldconfig child (find_library runs one).
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def function(name: str, argtypes: list[Any], restype: Any = ctypes.c_int) -> Any | None:
    """A typed libc function, or None where this libc lacks it."""
    lib = libc()
    found = getattr(lib, name, None) if lib is not None else None
    if found is None:
        return None
    found.argtypes = argtypes
    found.restype = restype
    return found


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas (one per thread that allocates, by default).

    For a process whose threads allocate under the GIL anyway, extra arenas buy
    no concurrency and keep freed memory apart per thread. Call it before the
    threads start.
    """
    mallopt = function("mallopt", [ctypes.c_int, ctypes.c_int])
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, count) == 1)


def trim_heap() -> bool:
    """Give the heap's free pages back to the kernel (malloc_trim(0)); True if any were."""
    malloc_trim = function("malloc_trim", [ctypes.c_size_t])
    return bool(malloc_trim is not None and malloc_trim(0) == 1)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


@functools.cache
def _sync_file_range() -> Any | None:
    return function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing `length` bytes at `offset` of `fd` to disk without waiting.

    Only a hint that spreads the disk work over the download: durability still
    comes from the fsync before the rename. A no-op where sync_file_range(2)
    is missing (not Linux); errors are ignored for the same reason.
    """
    call = _sync_file_range()
    if call is not None and length > 0:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

"""Resident memory of a process tree, each physical page counted once.

Why not RSS or PSS sums: RSS counts a page shared by two processes of the tree
twice (libpython, pydantic-core, the C libraries both processes map). PSS
splits a shared page among *every* process that maps it, including ones outside
the tree (the benchmark itself, a baseline process measured at the same time),
so a tree's PSS sum moves with whatever else runs. The set of page frames the
tree maps (from /proc/PID/pagemap) is what the box pays for the tree, whatever
else runs: for one process it equals its RSS.

Reading frame numbers needs CAP_SYS_ADMIN (root); without it the kernel reports
frame 0 for every page and `resident_mib` returns None.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

_PAGE = 4096
_PRESENT = np.uint64(1 << 63)
_FRAME = np.uint64((1 << 55) - 1)
_USER_TOP = 1 << 47  # above: [vsyscall], not in pagemap


def _frames(pid: int) -> np.ndarray:
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for line in maps:
            start, end = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
            if start >= _USER_TOP:
                continue
            raw = os.pread(pagemap.fileno(), (end - start) // _PAGE * 8, start // _PAGE * 8)
            entries = np.frombuffer(raw, dtype=np.uint64)
            chunks.append(entries[(entries & _PRESENT) != 0] & _FRAME)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)


def resident_mib(pids: Iterable[int]) -> float | None:
    """MiB of distinct physical pages mapped by these processes; None without root."""
    frames = np.unique(np.concatenate([_frames(pid) for pid in pids]))
    if frames.size and not frames.any():
        return None  # frame numbers hidden: not root
    return frames.size * _PAGE / 2**20

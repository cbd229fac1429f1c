"""What the agent's child processes (model workers, update jobs, probes) share.

They run the same `agent` package as their parent, wherever it was imported
from, and they must not outlive it: a `kill -9` of the daemon leaves no
orphan holding a model or a half-written download.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

import agent
from agent.system import libc

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def python_child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `python -m agent.<module>` so that it imports this very `agent` package."""
    env = dict(os.environ if base is None else base)
    root = str(Path(agent.__file__).resolve().parent.parent)  # the folder that holds `agent`
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    Call it first thing in a child: the child may block in network I/O, where it would
    not notice that the pipe to its parent closed (it does notice between requests).
    """
    prctl = libc.function("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong])
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

"""One agent per state dir: an exclusive lock that the kernel drops when the process dies.

`edge-agent run` holds it for its whole life and `edge-agent update --once` for its pass,
so a manual pass can never interleave with the daemon's journal, store moves and garbage
collection on the same store. flock(2) on `<state_dir>/agent.lock`: released on exit,
`kill -9` included, so a crash never leaves a stale lock behind. The file holds the
holder's pid, only to name it in the error.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from agent.wire.errors import StateDirBusyError

LOCK_NAME = "agent.lock"


class StateLock:
    """`with StateLock(state_dir):` holds the state dir exclusively, or raises StateDirBusyError."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        """Raises:
            StateDirBusyError: another process holds it (its pid is in the message).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirBusyError(
                f"{self.path.parent} is in use by another edge-agent process (pid {holder}): "
                "stop it first (systemctl stop edge-agent), or use its API and MQTT commands instead"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

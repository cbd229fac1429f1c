"""The one bounded wait of the tests: poll a real condition, fail loudly when it never holds."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.02,
               detail: Callable[[], str] | None = None) -> None:
    """Bounded wait on a real condition; fails loudly with `what` (and `detail()`, the last thing seen)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            seen = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{seen}")
        time.sleep(interval_s)


def is_listening(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:`port`."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False

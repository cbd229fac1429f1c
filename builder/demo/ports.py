"""Free TCP ports for local servers that are started after the port is chosen (the demo, tests).

Asking the kernel for port 0 and then handing the number to another process races
with every outgoing connection in between: the kernel gives ephemeral ports from
`ip_local_port_range` to connecting sockets too, so a busy machine (20 agents
connecting to a broker and a repository) can take the port before the server
binds it. Ports below that range are never handed out implicitly, so they are
picked from there; within one process the same port is never handed out twice.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

_LOWEST = 10_000
_handed_out: set[int] = set()
_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; elsewhere the fallback below still works


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and no outgoing connection will take."""
    low = _ephemeral_low()
    with _lock:
        if low - _LOWEST >= 1000:
            for _ in range(200):
                port = random.randrange(_LOWEST, low)
                if port not in _handed_out and _is_free(port):
                    _handed_out.add(port)
                    return port
        while True:  # no room below the ephemeral range: the kernel's choice, never twice
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port

"""systemd's notify protocol without a dependency (sd_notify(3)).

One AF_UNIX datagram per message to `$NOTIFY_SOCKET`; a leading '@' means the
abstract namespace (the name starts with a NUL byte). Outside systemd the
variable is unset and every call is a no-op returning False, so the agent runs
the same from a shell. Sending never raises: a lost notification must not take
the agent down (systemd's watchdog restarts it if pings really stop).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(message: str, *, environ: dict[str, str] | None = None) -> bool:
    """Send `message` (e.g. "READY=1\\nSTATUS=serving"). True if it was sent."""
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET")
    if not raw or not (raw.startswith("/") or raw.startswith("@")):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(raw))
            sock.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("event=sd_notify_failed socket=%s error=%s", raw, e)
        return False


def ready(status: str | None = None) -> bool:
    """Startup finished: systemd marks a Type=notify unit started only now."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    """Free text `systemctl status` shows (one line; newlines become spaces)."""
    return notify("STATUS=" + text.replace("\n", " "))


def watchdog() -> bool:
    """Keep-alive ping; call more often than every `watchdog_interval_s()`."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def reloading() -> bool:
    return notify("RELOADING=1")


def watchdog_interval_s(environ: dict[str, str] | None = None) -> float | None:
    """How often to ping: half of `WatchdogSec=` (as sd_watchdog_enabled(3) advises).

    None when no watchdog is set, or when `WATCHDOG_PID` names another process
    (the variables were inherited, the watchdog is not ours).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("event=watchdog_usec_invalid value=%r", usec)
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2

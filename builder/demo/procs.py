"""Every process the demo starts, and stopping all of them.

Each child runs in its own session (so its own process group): an agent's
model workers, a build's ORT builder and the like are in their parent's group,
and one `killpg` reaches them all. A Ctrl-C at the terminal goes to the demo's
foreground group only, so the demo decides the order: it stops the fleet
before the repository server and the broker, each with SIGTERM first (agents
drain and publish a clean status), SIGKILL after a grace period.

`ProcessSet.stop_all()` is idempotent and is called from a `finally`, from
`atexit` and from the SIGTERM/SIGHUP handlers the demo installs, so nothing
it started outlives it, whichever way it ends.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.wire.errors import DemoError, require

log = logging.getLogger(__name__)


STOP_GRACE_S = 10.0


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session: the child leads its own group

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        if self.log_path is None:
            return "(output not logged)"
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`, from /proc."""
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # comm (field 2) may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry))
    return members


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_leftovers(record: Path, marker: str) -> list[int]:
    """SIGKILL what a previous demo, itself killed with SIGKILL, left running.

    `record` lists the process groups that run started. Only members whose command line
    names `marker` (that run's dir) are killed, so a group id reused by an unrelated
    process since is left alone. Returns the PIDs killed.
    """
    try:
        pgids = [int(x) for x in json.loads(record.read_text())]
    except (OSError, ValueError, TypeError):
        return []
    killed = []
    for pgid in pgids:
        for pid in group_members(pgid):
            if marker in _cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
    return killed


class ProcessSet:
    """The demo's children, in start order.

    With `record`, the process group ids are also written to that file as they start, so a
    later demo can clean up after one that was killed with SIGKILL (see `kill_leftovers`).
    """

    def __init__(self, record: Path | None = None) -> None:
        self._procs: list[ManagedProcess] = []
        self._lock = threading.Lock()
        self._record = record
        self._recorded: list[int] = []

    @property
    def processes(self) -> list[ManagedProcess]:
        with self._lock:
            return list(self._procs)

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, log_path: Path | None = None,
              pipe_output: bool = False) -> ManagedProcess:
        """Start `argv` in a new session; output goes to `log_path` (or a pipe the caller reads)."""
        if pipe_output:
            stdout: int = subprocess.PIPE
            log_file = None
        else:
            log_path = require(log_path, f"the log path of {name}")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "ab")
            stdout = log_file.fileno()
        try:
            popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise DemoError(f"cannot start {name} ({argv[0]}): {e}") from e
        finally:
            if log_file is not None:
                log_file.close()
        proc = ManagedProcess(name, argv, popen, log_path)
        with self._lock:
            self._procs.append(proc)
            if self._record is not None:
                self._recorded.append(proc.pgid)
                self._record.write_text(json.dumps(self._recorded))
        log.info("event=process_started name=%s pid=%d", name, popen.pid)
        return proc

    def forget(self, proc: ManagedProcess) -> None:
        """Drop a command that ran to completion (and left nothing behind) from the set."""
        if proc.is_running() or group_members(proc.pgid):
            return
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        with self._lock:
            self._procs = [p for p in self._procs if p is not proc]

    def check_alive(self, *names: str) -> None:
        """Raises DemoError naming the first of `names` (all when empty) that has exited."""
        for proc in self.processes:
            if (not names or proc.name in names) and not proc.is_running():
                raise DemoError(f"{proc.name} (pid {proc.pid}) exited with {proc.popen.returncode}; "
                                f"last lines of {proc.log_path}:\n{proc.log_tail()}")

    def stop(self, proc: ManagedProcess, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the group, wait for the leader, then SIGKILL whatever of the group is left."""
        if not proc.is_running() and not group_members(proc.pgid):
            return  # never signal a group id that may since belong to someone else
        if proc.is_running():
            _signal_group(proc.pgid, signal.SIGTERM)
            try:
                proc.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("event=process_kill name=%s pid=%d reason=no_exit_after_sigterm", proc.name, proc.pid)
        _signal_group(proc.pgid, signal.SIGKILL)  # children the leader left behind, or the leader itself
        try:
            proc.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        _wait_group_empty(proc.pgid, 5.0)

    def stop_all(self, grace_s: float = STOP_GRACE_S, on_stop: Callable[[ManagedProcess], None] | None = None) -> None:
        """Stop every process, the last started first (clients before servers)."""
        for proc in reversed(self.processes):
            if on_stop is not None and (proc.is_running() or group_members(proc.pgid)):
                on_stop(proc)
            self.stop(proc, grace_s)

    def leftovers(self) -> list[int]:
        """PIDs still alive in any group the demo started (should be none after stop_all)."""
        return [pid for proc in self.processes for pid in group_members(proc.pgid)]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_group_empty(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while group_members(pgid) and time.monotonic() < deadline:
        _signal_group(pgid, signal.SIGKILL)
        time.sleep(0.05)

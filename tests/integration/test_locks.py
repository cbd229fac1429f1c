"""builder.build.locks: one holder at a time across real processes, a waiter told, nothing left behind."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from builder.build.locks import exclusive, lock_path
from testkit.env import subprocess_env
from testkit.waits import wait_until

# Read, pause, write: without mutual exclusion, concurrent holders lose each other's increments.
_INCREMENT = """
import sys, time
from pathlib import Path
from builder.build.locks import exclusive
counter = Path(sys.argv[1])
for _ in range(int(sys.argv[2])):
    with exclusive(counter):
        n = int(counter.read_text()) if counter.exists() else 0
        time.sleep(0.002)
        counter.write_text(str(n + 1))
"""

_HOLD = """
import sys, time
from pathlib import Path
from builder.build.locks import exclusive
with exclusive(Path(sys.argv[1])):
    Path(sys.argv[2]).write_text("held")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.01)
"""


def test_processes_take_turns_and_the_lock_file_goes_away(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    procs = [subprocess.Popen([sys.executable, "-c", _INCREMENT, str(counter), "40"], env=subprocess_env())
             for _ in range(4)]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    assert counter.read_text() == "160"  # the lock file is removed on each release: no holder ran beside another
    assert not lock_path(counter).exists()


def test_a_waiter_is_told_and_enters_only_after_the_holder_leaves(tmp_path: Path) -> None:
    guarded, held, release = tmp_path / "out", tmp_path / "held", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(guarded), str(held), str(release)],
                              env=subprocess_env())
    try:
        wait_until(held.exists, 30, "the other process to take the lock")
        waits: list[float] = []
        entered: list[float] = []

        def take() -> None:
            with exclusive(guarded, on_wait=lambda: waits.append(time.monotonic())):
                entered.append(time.monotonic())

        taker = threading.Thread(target=take)
        taker.start()
        wait_until(lambda: bool(waits), 10, "the waiter to be told")
        time.sleep(0.3)
        assert entered == []  # still held by the other process
        released_at = time.monotonic()
        release.write_text("")
        taker.join(30)
        assert len(waits) == 1 and len(entered) == 1 and entered[0] >= released_at
    finally:
        release.write_text("")
        assert holder.wait(30) == 0


def test_an_uncontended_lock_does_not_call_on_wait(tmp_path: Path) -> None:
    told: list[bool] = []
    with exclusive(tmp_path / "deep" / "out", on_wait=lambda: told.append(True)):
        assert lock_path(tmp_path / "deep" / "out").exists()
    assert told == [] and not lock_path(tmp_path / "deep" / "out").exists()

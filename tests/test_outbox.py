"""The on-disk event outbox: bound, persisted counters, and kill -9 at random instants."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.errors import StoreError
from agent.messages import DeviceEvent
from agent.outbox import Outbox
from tests.brokers import wait_until
from tests.conftest import subprocess_env


def _event(seq: int) -> DeviceEvent:
    return DeviceEvent(device_id="d", seq=seq, kind="transition", from_state="IDLE", to_state="CHECKING")


def test_order_remove_and_seq_survive_reopen_even_when_empty(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    assert [box.append(_event).seq for _ in range(3)] == [1, 2, 3]
    assert [e.seq for e in box.pending()] == [1, 2, 3]
    box.remove(2)
    box.remove(2)  # a second PUBACK for the same seq is harmless
    assert [e.seq for e in box.pending()] == [1, 3]
    assert [e.seq for e in box.pending(after=1)] == [3]
    box.remove(1)
    box.remove(3)
    reopened = Outbox(tmp_path)
    assert reopened.pending() == [] and reopened.next_seq == 4
    assert reopened.append(_event).seq == 4


def test_full_outbox_drops_oldest_and_persists_the_count(tmp_path: Path) -> None:
    box = Outbox(tmp_path, max_events=3)
    for _ in range(5):
        box.append(_event)
    assert [e.seq for e in box.pending()] == [3, 4, 5]
    assert box.dropped_total == 2
    reopened = Outbox(tmp_path, max_events=2)  # a smaller bound applies at open
    assert [e.seq for e in reopened.pending()] == [4, 5]
    assert reopened.dropped_total == 3
    assert Outbox(tmp_path).dropped_total == 3


def test_event_must_carry_the_assigned_seq(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    with pytest.raises(StoreError, match="assigned seq 1"):
        box.append(lambda seq: _event(seq + 5))
    assert box.pending() == []


def test_state_file_lost_seq_continues_from_files_and_tmp_leftovers_removed(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for _ in range(4):
        box.append(_event)
    (tmp_path / "state.json").unlink()
    (tmp_path / "events" / ".tmp-0000000000000005.json.123").write_bytes(b'{"half')
    reopened = Outbox(tmp_path)
    assert reopened.next_seq == 5
    assert not list((tmp_path / "events").glob(".tmp-*"))


def test_corrupt_event_file_set_aside_and_counted(tmp_path: Path) -> None:
    """Outside damage (a disk that lied about fsync): never delivered, never a crash."""
    box = Outbox(tmp_path)
    for _ in range(3):
        box.append(_event)
    (tmp_path / "events" / f"{2:016d}.json").write_bytes(b"\0\0\0garbage")
    reopened = Outbox(tmp_path)
    assert [e.seq for e in reopened.pending()] == [1, 3]
    assert reopened.dropped_total == 1
    assert (tmp_path / "events" / f"corrupt-{2:016d}.json").exists()


_APPENDER = """
import sys
from pathlib import Path
from agent.messages import DeviceEvent
from agent.outbox import Outbox
box = Outbox(Path(sys.argv[1]), max_events=50)
print("ready", flush=True)
while True:
    box.append(lambda seq: DeviceEvent(device_id="d", seq=seq, kind="info", reason="x" * 300))
    pending = box.pending(limit=3)
    if len(pending) > 40:
        box.remove(pending[0].seq)
"""


@pytest.mark.parametrize("run_s", [0.05, 0.2, 0.4])
def test_kill_9_during_appends_never_corrupts(tmp_path: Path, run_s: float) -> None:
    """A real process appending, trimming and removing in a loop, SIGKILLed at
    an arbitrary instant: the reopened outbox parses, is in order, and never
    reuses a sequence number."""
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(tmp_path)], stdout=subprocess.PIPE,
                            env=subprocess_env(), text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        wait_until(lambda: len(list((tmp_path / "events").iterdir())) >= 5, 20, "some appends")
        time.sleep(run_s)  # the point is an arbitrary instant, not a condition
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    on_disk = sorted(p.name for p in (tmp_path / "events").iterdir() if not p.name.startswith(".tmp-"))
    box = Outbox(tmp_path, max_events=50)
    events = box.pending()
    assert len(events) == len(on_disk) and box.dropped_total >= 0
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(json.loads((tmp_path / "events" / f"{s:016d}.json").read_text())["seq"] == s for s in seqs)
    assert box.next_seq > seqs[-1]
    assert box.append(lambda seq: DeviceEvent(device_id="d", seq=seq, kind="info")).seq == box.next_seq - 1 > seqs[-1]

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


def test_seq_continues_from_files_when_state_is_behind_or_lost_and_tmp_leftovers_removed(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for _ in range(4):
        box.append(_event)
    box.remove(1)  # saves next_seq=5 before the unlink
    assert json.loads((tmp_path / "state.json").read_text())["next_seq"] == 5
    box.append(_event)
    box.append(_event)  # files 2..6, state.json still says 5: appends do not rewrite it
    (tmp_path / "events" / ".tmp-0000000000000007.json.123").write_bytes(b'{"half')
    assert Outbox(tmp_path).next_seq == 7
    assert not list((tmp_path / "events").glob(".tmp-*"))
    (tmp_path / "state.json").unlink()
    assert Outbox(tmp_path).next_seq == 7


def test_removing_everything_never_lets_a_seq_be_reused(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for _ in range(3):
        box.append(_event)
    for seq in (3, 1, 2):  # PUBACKs in any order
        box.remove(seq)
    assert not list((tmp_path / "events").iterdir())
    assert Outbox(tmp_path).append(_event).seq == 4


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
i = 0
while True:
    box.append(lambda seq: DeviceEvent(device_id="d", seq=seq, kind="info", reason="x" * 300))
    i += 1
    if i % 3 == 0:  # a PUBACK now and then; the bound trims the rest
        box.remove(box.pending(limit=1)[0].seq)
"""


def _dropped_total(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["dropped_total"])
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize(("is_trimming", "extra_s"), [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_kill_9_during_appends_never_corrupts(tmp_path: Path, is_trimming: bool, extra_s: float) -> None:
    """A real process appending, removing and trimming in a loop, SIGKILLed at
    an arbitrary instant: the reopened outbox parses, is in order, never
    reuses a sequence number and counts every dropped event exactly once."""
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(tmp_path)], stdout=subprocess.PIPE,
                            env=subprocess_env(), text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        wait_until(lambda: (tmp_path / "state.json").exists(), 20, "the first remove")
        if is_trimming:
            wait_until(lambda: _dropped_total(tmp_path / "state.json") > 0, 60, "the bound trimming")
        time.sleep(extra_s)  # the point is an arbitrary instant, not a condition
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {int(p.name[:-5]) for p in (tmp_path / "events").iterdir() if not p.name.startswith(".tmp-")}
    state_before = json.loads((tmp_path / "state.json").read_text())
    box = Outbox(tmp_path, max_events=50)
    events = box.pending()
    seqs = [e.seq for e in events]
    after = sorted(int(p.name[:-5]) for p in (tmp_path / "events").iterdir())
    assert seqs == after and set(seqs) <= before and len(seqs) <= 50
    # Opening completes an interrupted trim without counting it twice, and
    # applies the bound to an append that the kill cut off before its trim.
    live = {s for s in before if s > state_before["dropped_up_to"]}
    assert box.dropped_total == state_before["dropped_total"] + max(0, len(live) - 50)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(json.loads((tmp_path / "events" / f"{s:016d}.json").read_text())["seq"] == s for s in seqs)
    assert box.next_seq > seqs[-1]
    assert box.append(lambda seq: DeviceEvent(device_id="d", seq=seq, kind="info")).seq == box.next_seq - 1 > seqs[-1]

"""The on-disk event outbox: bound, persisted counters, and kill -9 at random instants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.link.outbox import MAX_CORRUPT_KEPT, Outbox
from agent.wire.errors import StoreError
from agent.wire.mqtt import DeviceEvent


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


def test_an_unreadable_event_is_kept_and_skipped_not_raised(tmp_path: Path) -> None:
    """An I/O error (here a directory where the event file should be) used to raise out of
    `pending()` into the link's network thread and end it."""
    box = Outbox(tmp_path)
    for _ in range(3):
        box.append(_event)
    path = tmp_path / "events" / f"{2:016d}.json"
    path.unlink()
    path.mkdir()
    assert [e.seq for e in box.pending()] == [1, 3]
    assert box.pending_count == 3 and box.dropped_total == 0  # not dropped: it may read again
    path.rmdir()
    path.write_text(_event(2).model_dump_json())
    assert [e.seq for e in box.pending()] == [1, 2, 3]


def test_damaged_files_kept_as_evidence_are_bounded(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    total = MAX_CORRUPT_KEPT + 5
    for _ in range(total):
        box.append(_event)
    for seq in range(1, total + 1):
        (tmp_path / "events" / f"{seq:016d}.json").write_bytes(b"{not json")
    assert box.pending() == [] and box.dropped_total == total
    kept = sorted(p.name for p in (tmp_path / "events").iterdir())
    assert kept == [f"corrupt-{seq:016d}.json" for seq in range(total - MAX_CORRUPT_KEPT + 1, total + 1)]



"""state.json: atomic under SIGKILL of a real writer, tolerant of absence, loud when corrupt."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.update.journal import Journal
from agent.update.statemachine import ModelRef, Phase, UpdateState
from agent.wire.errors import JournalError


def test_missing_journal_is_idle(tmp_path: Path) -> None:
    j = Journal(tmp_path / "state.json")
    assert j.load_record() is None
    assert j.load() == UpdateState()


def test_save_load_round_trip_includes_store_count(tmp_path: Path) -> None:
    j = Journal(tmp_path / "state.json")
    state = UpdateState(phase=Phase.ACTIVATING, target=ModelRef(name="m", version=3), store_count=5)
    j.save(state)
    assert j.load() == state
    record = j.load_record()
    assert record is not None and record.schema_version == 1 and record.state.store_count == 5
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"schema_version": 2, "state": {}, "saved_at": "x"}',
                                     b'{"schema_version": 1, "state": {"phase": "NAPPING"},'
                                     b' "saved_at": "2026-01-01T00:00:00Z"}'])
def test_corrupt_journal_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(JournalError, match=r"state\.json is not a valid state\.json .* move it aside"):
        Journal(path).load()
    assert path.read_bytes() == content  # nothing lost: the operator can inspect it



"""state.json: atomic under SIGKILL of a real writer, tolerant of absence, loud when corrupt."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.errors import JournalError
from agent.journal import Journal
from agent.statemachine import ModelRef, Phase, UpdateState
from agent.store import Store
from tests.conftest import subprocess_env

# Writes state.json as fast as it can, store_count counting up; the refused list makes each record
# a few KiB so that a torn write would be visible.
_WRITER = """
import sys
from pathlib import Path
from agent.journal import Journal
from agent.statemachine import ModelRef, Phase, UpdateState
j = Journal(Path(sys.argv[1]))
refused = tuple(ModelRef(name="m" * 40, version=v) for v in range(1, 60))
i = j.load().store_count  # go on from what survived the last kill
while True:
    i += 1
    j.save(UpdateState(phase=Phase.DOWNLOADING, target=ModelRef(name="m", version=i), store_count=i,
                       refused=refused[: i % 60]))
"""


def _wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.002)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


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


def test_sigkill_during_writes_leaves_a_whole_journal(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.ensure_layout()
    journal = Journal(store.journal_path)
    rng = random.Random(6)
    last_seen = 0
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(store.journal_path)], env=subprocess_env())
        try:
            threshold = last_seen + rng.randint(20, 300)

            def advanced() -> bool:
                nonlocal last_seen
                if not store.journal_path.exists():
                    return False
                count = journal.load().store_count  # a concurrent reader never sees a torn file
                assert count >= last_seen
                last_seen = count
                return count >= threshold

            _wait_for(advanced, 60, f"round {round_}: the writer to reach store_count {threshold}")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        state = journal.load()  # parses: the old or the new record, never a mix
        assert state.phase is Phase.DOWNLOADING and state.target is not None
        assert state.target.version == state.store_count >= threshold
        removed = store.recover()
        assert all(r.startswith(".tmp-state.json") for r in removed)
        assert store.check_invariants() == []

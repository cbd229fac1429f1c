"""state.json under SIGKILL of a real writer process: every record read back is whole."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

from agent.store.store import Store
from agent.update.journal import Journal
from agent.update.statemachine import Phase
from testkit.env import subprocess_env
from testkit.waits import wait_until

# Writes state.json as fast as it can, store_count counting up; the refused list makes each record
# a few KiB so that a torn write would be visible.
_WRITER = """
import sys
from pathlib import Path
from agent.update.journal import Journal
from agent.update.statemachine import ModelRef, Phase, UpdateState
j = Journal(Path(sys.argv[1]))
refused = tuple(ModelRef(name="m" * 40, version=v) for v in range(1, 60))
i = j.load().store_count  # go on from what survived the last kill
while True:
    i += 1
    j.save(UpdateState(phase=Phase.DOWNLOADING, target=ModelRef(name="m", version=i), store_count=i,
                       refused=refused[: i % 60]))
"""


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

            wait_until(advanced, 60, f"round {round_}: the writer to reach store_count {threshold}", interval_s=0.002)
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

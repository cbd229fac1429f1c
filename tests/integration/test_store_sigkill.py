"""The store under SIGKILL of a real process churning installs, switches and GC: invariants hold."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.store.store import Store
from testkit.env import subprocess_env

# Assembles, switches and collects in a loop, as an update would; killed at random instants.
_CHURN = """
import sys
from pathlib import Path
from agent.store.store import Store
from testkit.store import install, manifest_for, model_files
store = Store(Path(sys.argv[1]))
store.recover()
v = int(store.current().name) if store.current() else 0
while True:
    v += 1
    files = model_files(v, size=20000, shared=b"t" * 5000)
    target = install(store, manifest_for("m", v, files), files)
    store.switch_current(target)
    if v % 3 == 0:
        store.rollback()
        store.switch_current(target)
    store.gc(60000)
    print(v, flush=True)
"""


def test_sigkill_during_store_churn_keeps_invariants(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    rng = random.Random(4)
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _CHURN, str(store.root)], env=subprocess_env(),
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline(), "the churn process died"  # one full cycle done: under way
            # A random instant inside a later cycle (a real condition above, then a short random offset).
            time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cur = store.current()
        assert cur is not None and (cur / "manifest.json").is_file(), f"round {round_}: current is {cur}"
        store.recover()
        assert store.check_invariants() == [], f"round {round_}"

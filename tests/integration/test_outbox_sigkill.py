"""The outbox under SIGKILL of a real appending process: in order, no seq reused, drops counted once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.link.outbox import Outbox
from agent.wire.mqtt import DeviceEvent
from testkit.env import subprocess_env
from testkit.waits import wait_until

_APPENDER = """
import sys
from pathlib import Path
from agent.wire.mqtt import DeviceEvent
from agent.link.outbox import Outbox
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

"""Probation that survives a restart of the daemon.

After a switch, the new model is on probation for `probation_s`: a crash of its
worker rolls the update back. A model can also take the whole daemon down (an
OOM kill of the service, a native crash); systemd then restarts it, and without
a record the new model would serve again with no probation at all, possibly in
a crash loop. So the window is written to `<state_dir>/probation.json` when it
opens and deleted when it passes. On start:

- no record, or a record for a dir that is not `current` (the switch never
  finished): nothing to do (the record is dropped);
- the window has passed: nothing to do (dropped);
- the last run stopped cleanly (SIGTERM) inside the window: re-arm for what is
  left;
- the last run died inside the window: count it; re-arm the first time, roll
  back the second (a single power cut must not refuse a good model forever).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from agent.wire.base import StrictModel
from agent.wire.durable import atomic_write_bytes

log = logging.getLogger(__name__)

RECORD_NAME = "probation.json"
UNCLEAN_STARTS_TO_ROLL_BACK = 2


class ProbationRecord(StrictModel):
    schema_version: Literal[1] = 1
    model_dir: str  # resolved path of the model on probation
    until_unix: float  # wall clock: the window must outlast a restart, which resets monotonic time
    unclean_starts: int = 0  # starts after a run that died inside the window
    clean_stop: bool = False  # the last run stopped on SIGTERM inside the window


@dataclass(frozen=True)
class StartVerdict:
    action: Literal["none", "rearm", "roll_back"]
    remaining_s: float = 0.0
    record: ProbationRecord | None = None  # what to write back (None: delete the record)
    reason: str = ""


def decide_on_start(record: ProbationRecord | None, current: Path | None, now_unix: float,
                    window_s: float) -> StartVerdict:
    """Pure: what a starting daemon does about a probation window the last run left open.

    The record holds wall-clock time (a restart resets monotonic time), and a board without a
    real-time clock can boot in 1970: the time left is clamped to `window_s` (probation_s), so
    a clock gone back never holds the checks longer than one window.
    """
    if record is None or current is None or Path(record.model_dir) != current:
        return StartVerdict("none")
    remaining = min(record.until_unix - now_unix, window_s)
    if remaining <= 0:
        return StartVerdict("none")
    if record.clean_stop:
        return StartVerdict("rearm", remaining, record.model_copy(update={"clean_stop": False}))
    unclean = record.unclean_starts + 1
    if unclean >= UNCLEAN_STARTS_TO_ROLL_BACK:
        return StartVerdict("roll_back", remaining, None,
                            f"the agent died {unclean} times within the probation window of {current.name}")
    return StartVerdict("rearm", remaining, record.model_copy(update={"unclean_starts": unclean}))


class ProbationFile:
    """The record's I/O (`<state_dir>/probation.json`); every write is atomic."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / RECORD_NAME

    def read(self) -> ProbationRecord | None:
        try:
            return ProbationRecord.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as e:
            log.warning("event=probation_record_unreadable path=%s error=%r: ignored", self.path, str(e))
            return None

    def write(self, record: ProbationRecord) -> None:
        atomic_write_bytes(self.path, record.model_dump_json().encode())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def mark_clean_stop(self) -> None:
        record = self.read()
        if record is not None:
            self.write(record.model_copy(update={"clean_stop": True}))

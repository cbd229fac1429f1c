"""`state.json`: the journal of the update state machine.

Crash safety: a save writes a temporary file, fsyncs it, renames it over
`state.json` and fsyncs the directory (`agent.wire.durable.atomic_write_bytes`). So
after `kill -9` or power loss at any instant `state.json` holds the old or the
new record, never a mix, and the driver saves *before* it runs the action the
new state names. A missing file means no update ever ran (IDLE). A file that
does not parse was not written by this code path (disk fault, hand edit): it
raises `JournalError` rather than guessing, and the message says what to do.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from agent.update.statemachine import UpdateState, initial_state
from agent.wire.base import FrozenModel
from agent.wire.durable import atomic_write_bytes
from agent.wire.errors import JournalError

log = logging.getLogger(__name__)

JOURNAL_FILENAME = "state.json"


class JournalRecord(FrozenModel):
    """The whole content of `state.json`. The store count is `state.store_count`."""

    schema_version: Literal[1] = 1
    state: UpdateState
    saved_at: dt.datetime


class Journal:
    """Reads and writes one `state.json`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load_record(self) -> JournalRecord | None:
        """The saved record, or None when no journal exists yet.

        Raises:
            JournalError: the file exists but cannot be read or is not a valid journal.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise JournalError(f"cannot read the update journal {self.path}: {e}") from e
        try:
            return JournalRecord.model_validate_json(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise JournalError(
                f"update journal {self.path} is not a valid state.json ({len(data)} bytes; at {where}:"
                f" {first['msg']}): move it aside to restart from IDLE; `current` is left as it is"
            ) from e

    def load(self) -> UpdateState:
        """The saved state, or the initial IDLE state when no journal exists yet.

        Raises:
            JournalError: the file exists but is not a valid journal.
        """
        record = self.load_record()
        return initial_state() if record is None else record.state

    def save(self, state: UpdateState, now: dt.datetime | None = None) -> JournalRecord:
        """Replace the journal atomically and durably.

        Raises:
            JournalError: the write failed (the old journal is still in place).
        """
        record = JournalRecord(state=state, saved_at=now or dt.datetime.now(dt.UTC))
        try:
            atomic_write_bytes(self.path, record.model_dump_json(indent=1).encode())
        except OSError as e:
            raise JournalError(f"cannot write the update journal {self.path}: {e}; the previous state stays and "
                               "no update runs until it can be written: check free disk space and permissions "
                               "of the state dir") from e
        return record

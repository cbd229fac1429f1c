"""Bounded on-disk store-and-forward for device events (`<state_dir>/outbox/`).

Layout:

```
outbox/state.json              OutboxState: next sequence number, events dropped ever (and up to which seq)
outbox/events/<seq:016d>.json  one DeviceEvent per file, oldest = smallest seq
```

Crash safety (what survives `kill -9` or power loss at any instant):
- An event file appears through one rename(2) after its bytes were fsynced,
  so a reader finds a complete event or no file; leftover `.tmp-*` files of
  an interrupted write are deleted at open.
- A sequence number is never reused: every seq ever issued is either still
  a file or below the `next_seq` saved in `state.json`, because `remove`
  saves `next_seq` before it unlinks a file at or above the saved value, and
  `open` takes `max(saved next_seq, highest file seq + 1)`. So `append`
  (the caller's path) costs one file write with two fsyncs; `state.json` is
  rewritten by `remove` on the network thread, at most once per batch of
  acknowledgements.
- The bound saves `dropped_total` and `dropped_up_to` before it unlinks, and
  `open` deletes files at or below `dropped_up_to` uncounted: an interrupted
  trim is finished, never counted twice.
- An event leaves the outbox only after the broker acknowledged it (the link
  calls `remove` on PUBACK). A crash after the PUBACK but before the unlink
  reached the disk delivers that event again: delivery is at-least-once and
  subscribers drop duplicates by `(device_id, seq)`.
- A file that still fails to parse (a disk that lied about fsync) is moved
  aside to `events/corrupt-*` (the newest `MAX_CORRUPT_KEPT` are kept) and
  counted as dropped, never delivered and never a crash.

Bound: at most `max_events` files. Appending to a full outbox drops the
oldest event first and adds one to `dropped_total`, which is persisted and
reported in telemetry, so an operator can tell an explained gap in `seq` from
loss.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from agent.wire.base import StrictModel
from agent.wire.durable import TMP_PREFIX, atomic_write_bytes, fsync_dir
from agent.wire.errors import StoreError
from agent.wire.mqtt import DeviceEvent

log = logging.getLogger(__name__)

DEFAULT_MAX_EVENTS = 10_000
_EVENT_SUFFIX = ".json"
_CORRUPT_PREFIX = "corrupt-"
MAX_CORRUPT_KEPT = 16


class OutboxState(StrictModel):
    schema_version: Literal[1] = 1
    next_seq: int = Field(default=1, ge=1)
    dropped_total: int = Field(default=0, ge=0)
    # Highest seq the bound ever dropped: files at or below it left by a trim
    # that a crash interrupted are deleted at open without being counted twice.
    dropped_up_to: int = Field(default=0, ge=0)


class Outbox:
    """Thread-safe: the daemon appends while the link's network thread removes."""

    def __init__(self, root: Path, *, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        if max_events < 1:
            raise StoreError(f"outbox max_events must be at least 1, got {max_events}")
        self.root = root
        self.events_dir = root / "events"
        self.state_path = root / "state.json"
        self.max_events = max_events
        self._lock = threading.Lock()
        self.events_dir.mkdir(parents=True, exist_ok=True)
        self._state = self._load_state()
        self._saved_next_seq = self._state.next_seq
        self._pending: list[int] = self._scan()
        while self._pending and self._pending[0] <= self._state.dropped_up_to:
            self._unlink(self._pending.pop(0))
        if self._pending and self._pending[-1] >= self._state.next_seq:
            self._state = self._state.model_copy(update={"next_seq": self._pending[-1] + 1})
        self._trim_locked()

    # -- open ------------------------------------------------------------------
    def _load_state(self) -> OutboxState:
        try:
            return OutboxState.model_validate_json(self.state_path.read_bytes())
        except FileNotFoundError:
            return OutboxState()
        except (ValidationError, ValueError) as e:
            # state.json is only ever replaced atomically, so this is outside
            # damage; the event files still carry their seq, so restart from them.
            log.warning("event=outbox_state_unreadable path=%s error=%s", self.state_path, e)
            return OutboxState()

    def _scan(self) -> list[int]:
        seqs: list[int] = []
        for entry in os.scandir(self.events_dir):
            name = entry.name
            if name.startswith(TMP_PREFIX):
                os.unlink(entry.path)  # an append that a crash interrupted before its rename
                continue
            if not name.endswith(_EVENT_SUFFIX) or not name[: -len(_EVENT_SUFFIX)].isdigit():
                continue
            seqs.append(int(name[: -len(_EVENT_SUFFIX)]))
        seqs.sort()
        return seqs

    def _event_path(self, seq: int) -> Path:
        return self.events_dir / f"{seq:016d}{_EVENT_SUFFIX}"

    # -- write -----------------------------------------------------------------
    def append(self, make_event: Callable[[int], DeviceEvent]) -> DeviceEvent:
        """Assign the next sequence number, build the event with it and store it durably.

        Returns only after the event is on disk, so a caller that journals
        first and then appends (design section 5) loses nothing to a crash.

        Raises:
            StoreError: the outbox directory cannot be written.
        """
        with self._lock:
            seq = self._state.next_seq
            event = make_event(seq)
            if event.seq != seq:
                raise StoreError(f"outbox assigned seq {seq} but the event carries {event.seq}")
            try:
                atomic_write_bytes(self._event_path(seq), event.model_dump_json().encode())
                self._pending.append(seq)
                self._state = self._state.model_copy(update={"next_seq": seq + 1})
                self._trim_locked()
            except OSError as e:
                raise StoreError(f"cannot write event {seq} to outbox {self.events_dir}: {e}; "
                                 "check free disk space and permissions of the state dir") from e
            return event

    def _trim_locked(self) -> None:
        excess = len(self._pending) - self.max_events
        if excess <= 0:
            return
        dropped, self._pending = self._pending[:excess], self._pending[excess:]
        # Saved first: the count (and next_seq) must be on disk before the files go.
        self._state = self._state.model_copy(update={"dropped_total": self._state.dropped_total + excess,
                                                     "dropped_up_to": dropped[-1]})
        self._save_state_locked()
        for seq in dropped:
            self._unlink(seq)
        log.warning("event=outbox_full dropped=%d dropped_total=%d max_events=%d",
                    excess, self._state.dropped_total, self.max_events)

    def _save_state_locked(self) -> None:
        atomic_write_bytes(self.state_path, self._state.model_dump_json().encode())
        self._saved_next_seq = self._state.next_seq

    def _unlink(self, seq: int) -> None:
        # No fsync of the directory: if the unlink is lost to a crash the event
        # is delivered once more, which at-least-once delivery allows.
        try:
            os.unlink(self._event_path(seq))
        except FileNotFoundError:
            pass

    def remove(self, seq: int) -> None:
        """The broker acknowledged `seq`: forget it. Unknown seqs are ignored."""
        with self._lock:
            try:
                self._pending.remove(seq)
            except ValueError:
                return
            if seq >= self._saved_next_seq:
                try:
                    self._save_state_locked()  # see the module docstring: no seq is ever reused
                except OSError as e:
                    # Keep the file (unsaved, its unlink could let a seq be reused): it is
                    # delivered once more after a restart, which at-least-once allows.
                    log.warning("event=outbox_ack_unsaved seq=%d path=%s error=%s", seq, self.state_path, e)
                    return
            self._unlink(seq)

    # -- read ------------------------------------------------------------------
    def pending(self, *, limit: int | None = None, after: int = 0) -> list[DeviceEvent]:
        """Stored events with seq > `after`, oldest first (at most `limit`)."""
        with self._lock:
            seqs = [s for s in self._pending if s > after]
        if limit is not None:
            seqs = seqs[:limit]
        events: list[DeviceEvent] = []
        for seq in seqs:
            event = self._read(seq)
            if event is not None:
                events.append(event)
        return events

    def _read(self, seq: int) -> DeviceEvent | None:
        path = self._event_path(seq)
        try:
            return DeviceEvent.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None  # removed (acknowledged or trimmed) since the listing
        except OSError as e:
            # Unreadable now (an I/O error, a directory in its place): kept, tried again on the next
            # pass, and never raised into the link's network thread.
            log.warning("event=outbox_unreadable_event seq=%d path=%s error=%s", seq, path, e)
            return None
        except (ValidationError, ValueError) as e:
            log.warning("event=outbox_corrupt_event seq=%d path=%s error=%s", seq, path, e)
            with self._lock:
                if seq in self._pending:
                    self._pending.remove(seq)
                    os.replace(path, self.events_dir / f"{_CORRUPT_PREFIX}{path.name}")
                    self._bound_corrupt_locked()
                    fsync_dir(self.events_dir)
                    self._state = self._state.model_copy(
                        update={"dropped_total": self._state.dropped_total + 1})
                    try:
                        self._save_state_locked()
                    except OSError as save_error:  # the count is saved with the next state write
                        log.warning("event=outbox_state_unsaved path=%s error=%s", self.state_path, save_error)
            return None

    def _bound_corrupt_locked(self) -> None:
        """Keep the newest few damaged files as evidence; a disk that keeps lying must not fill up with them."""
        kept = sorted(p for p in os.listdir(self.events_dir) if p.startswith(_CORRUPT_PREFIX))
        for name in kept[:-MAX_CORRUPT_KEPT]:
            os.unlink(self.events_dir / name)

    @property
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def dropped_total(self) -> int:
        with self._lock:
            return self._state.dropped_total

    @property
    def next_seq(self) -> int:
        with self._lock:
            return self._state.next_seq

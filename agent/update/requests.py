"""The update thread's inbox: what asks for an update pass, in the order passes run.

Any thread asks (a doorbell, the poll timer, an operator's `check_now`, a model worker that
died on probation, shutdown); the one updater thread takes with `next()`. Two rules live here:

- Checks coalesce: every check already queued is answered by the one pass that runs next.
- During a probation window checks wait (a pass would move the machine out of ACTIVE, and a
  crash of the new model must still roll it back), but a probation failure or a stop does not.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class CheckRequest:
    """Run a check; `triggers` are everything that asked for it (doorbell, poll, command)."""

    triggers: frozenset[str]


@dataclass(frozen=True)
class ProbationFailure:
    """The model worker of `model_dir` died inside its probation window: roll it back."""

    reason: str
    model_dir: str


@dataclass(frozen=True)
class _Stop:
    pass


_Item = CheckRequest | ProbationFailure | _Stop


class UpdateRequests:
    """Thread-safe; `next()` is called from one thread only (the updater's)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._front: _Item | None = None  # taken out of turn and given back: it goes first
        self._clock = clock
        self._hold_until = 0.0  # clock time; checks wait until then

    # -- any thread -------------------------------------------------------------------
    def check(self, trigger: str) -> None:
        self._queue.put(CheckRequest(frozenset({trigger})))

    def probation_failed(self, reason: str, model_dir: str) -> None:
        self._queue.put(ProbationFailure(reason=reason, model_dir=model_dir))

    def stop(self) -> None:
        self._queue.put(_Stop())

    def hold_checks(self, seconds: float) -> None:
        """Checks wait `seconds` from now (a probation window opened)."""
        self._hold_until = self._clock() + seconds

    def release_checks(self) -> None:
        """Held checks may run (the window closed early: its rollback is under way)."""
        self._hold_until = 0.0

    # -- the updater thread -------------------------------------------------------------
    def next(self) -> CheckRequest | ProbationFailure | None:
        """Block until a pass is due; None once a stop was asked for."""
        while True:
            item = self._take()
            if isinstance(item, _Stop):
                return None
            if isinstance(item, ProbationFailure):
                return item
            wait_s = self._hold_until - self._clock()
            if wait_s > 0:
                try:
                    following = self._take(timeout_s=wait_s)
                except queue.Empty:
                    self._queue.put(item)
                    continue
                if isinstance(following, CheckRequest):
                    self._queue.put(CheckRequest(item.triggers | following.triggers))
                else:
                    self._front = following  # a probation failure or a stop goes first
                    self._queue.put(item)
                continue
            return self._coalesce(item)

    def _coalesce(self, first: CheckRequest) -> CheckRequest | None:
        triggers = set(first.triggers)
        while True:
            try:
                more = self._take(timeout_s=0)
            except queue.Empty:
                return CheckRequest(frozenset(triggers))
            if isinstance(more, _Stop):
                return None
            if isinstance(more, CheckRequest):
                triggers |= more.triggers
            else:
                self._front = more  # a probation failure keeps its place in line
                return CheckRequest(frozenset(triggers))

    def _take(self, timeout_s: float | None = None) -> _Item:
        """The next item; raises queue.Empty after `timeout_s` (0: do not wait)."""
        if self._front is not None:
            item, self._front = self._front, None
            return item
        if timeout_s == 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout_s)

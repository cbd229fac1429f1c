"""Stage-by-stage progress on stderr.

On a TTY a long stage shows a live line (a bar when the stage knows its
total, else elapsed seconds); otherwise one line per finished stage. The
`--json` mode uses NullProgress: stdout carries one object, stderr stays quiet.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, TextIO

_BAR_WIDTH = 24
_TICK_S = 0.5


class Progress(Protocol):
    def stage(self, name: str) -> AbstractContextManager[None]: ...

    def update(self, done: int, total: int) -> None: ...


class NullProgress:
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def update(self, done: int, total: int) -> None:
        pass


@contextmanager
def run_stage(head: str, tick: Callable[[], None] | None, end: Callable[[str, float], None]) -> Iterator[None]:
    """Run a stage's block, then hand `end` its closing line (`<head>: done in 1.2s`, newline included) and its seconds.

    `tick` (a live line's redraw; None off a TTY) is called every _TICK_S from a
    thread meanwhile; that thread is stopped before `end`, so the closing line
    is the stage's last write. Shared by the build's progress and the demo's display.
    """
    t0 = time.monotonic()
    stop = threading.Event()
    ticker = None
    if tick is not None:
        def run_ticks() -> None:
            while not stop.wait(_TICK_S):
                tick()
        ticker = threading.Thread(target=run_ticks, daemon=True)
        ticker.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        elapsed = time.monotonic() - t0
        end(f"{head}: {'done' if ok else 'FAILED'} in {elapsed:.1f}s\n", elapsed)


class StderrProgress:
    def __init__(self, total_stages: int, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._is_tty = self._stream.isatty()
        self._total_stages = total_stages
        self._index = 0
        self._name = ""
        self._done: int | None = None
        self._total: int | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()

    def _line(self) -> str:
        elapsed = time.monotonic() - self._t0
        head = f"[{self._index}/{self._total_stages}] {self._name}"
        if self._done is not None and self._total:
            filled = int(_BAR_WIDTH * self._done / self._total)
            return f"{head} |{'#' * filled}{'.' * (_BAR_WIDTH - filled)}| {self._done}/{self._total} {elapsed:.0f}s"
        return f"{head} ... {elapsed:.0f}s"

    def _draw(self) -> None:
        with self._lock:
            self._stream.write("\r\x1b[K" + self._line())
            self._stream.flush()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._index += 1
        self._name, self._done, self._total, self._t0 = name, None, None, time.monotonic()
        head = f"[{self._index}/{self._total_stages}] {name}"

        def end(line: str, _elapsed: float) -> None:
            with self._lock:
                self._stream.write(("\r\x1b[K" if self._is_tty else "") + line)
                self._stream.flush()

        if self._is_tty:
            self._draw()
        with run_stage(head, self._draw if self._is_tty else None, end):
            yield

    def update(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        if self._is_tty:
            self._draw()

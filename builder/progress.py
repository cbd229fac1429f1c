"""Stage-by-stage progress on stderr.

On a TTY a long stage shows a live line (a bar when the stage knows its
total, else elapsed seconds); otherwise one line per finished stage. The
`--json` mode uses NullProgress: stdout carries one object, stderr stays quiet.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO

_BAR_WIDTH = 24
_TICK_S = 0.5


class Progress(Protocol):
    def stage(self, name: str) -> "contextmanager[None]": ...  # type: ignore[valid-type]

    def update(self, done: int, total: int) -> None: ...


class NullProgress:
    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def update(self, done: int, total: int) -> None:
        pass


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
        stop = threading.Event()
        ticker = None
        if self._is_tty:
            def tick() -> None:
                while not stop.wait(_TICK_S):
                    self._draw()
            self._draw()
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            status = "done" if ok else "FAILED"
            line = f"[{self._index}/{self._total_stages}] {name}: {status} in {time.monotonic() - self._t0:.1f}s"
            with self._lock:
                self._stream.write(("\r\x1b[K" if self._is_tty else "") + line + "\n")
                self._stream.flush()

    def update(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        if self._is_tty:
            self._draw()

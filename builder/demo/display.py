"""The demo's progress display on stderr.

One header per step (`[3/8] sign and serve the release`), indented detail
lines under it, and a closing line with the step's time. On a TTY, a waiting
step also keeps one live line (rewritten in place, with elapsed seconds);
piped into a file or a test, only the lasting lines are written.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from builder.build.progress import run_stage

_INDENT = "      "


class Display:
    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self.is_tty = self._stream.isatty()
        self._total = total_steps
        self._index = 0
        self._live = ""
        self._live_t0 = 0.0
        self._is_live_shown = False
        self._at_line_start = True
        self._lock = threading.RLock()
        self.durations_s: dict[str, float] = {}

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()

    def _clear_live(self) -> None:
        if self._is_live_shown:
            self._write("\r\x1b[K")
            self._is_live_shown = False

    def _draw_live(self) -> None:
        if self.is_tty and self._live and self._at_line_start:
            self._write(f"\r\x1b[K{_INDENT}{self._live} ({time.monotonic() - self._live_t0:.0f}s)")
            self._is_live_shown = True

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self._index += 1
        head = f"[{self._index}/{self._total}] {title}"
        with self._lock:
            self._end_text()
            self._write(("\n" if self._index > 1 else "") + head + "\n")

        def tick() -> None:
            with self._lock:
                self._draw_live()

        def end(line: str, elapsed: float) -> None:
            self.durations_s[title] = round(elapsed, 2)
            with self._lock:
                self._live = ""
                self._clear_live()
                self._end_text()
                self._write(line)

        with run_stage(head, tick if self.is_tty else None, end):
            yield

    def info(self, line: str = "") -> None:
        """A lasting detail line (several lines keep their indent)."""
        with self._lock:
            self._clear_live()
            self._end_text()
            for part in (line.splitlines() or [""]):
                self._write(f"{_INDENT}{part}\n")
            self._draw_live()

    def live(self, text: str) -> None:
        """The one-line status of a wait (TTY only; replaced by the next call)."""
        with self._lock:
            if text != self._live:
                self._live, self._live_t0 = text, time.monotonic()
            if text:
                self._draw_live()
            else:
                self._clear_live()

    def text(self, piece: str) -> None:
        """Streamed answer text, written as it arrives."""
        with self._lock:
            self._clear_live()
            if self._at_line_start:
                self._write(_INDENT)
            self._write(piece.replace("\n", "\n" + _INDENT))
            self._at_line_start = False

    def _end_text(self) -> None:
        if not self._at_line_start:
            self._write("\n")
            self._at_line_start = True

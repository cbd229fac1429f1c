"""Progress output: a live bar on a TTY, plain stage lines otherwise."""

from __future__ import annotations

import io

import pytest

from builder.build.progress import StderrProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_gets_a_bar_that_is_redrawn_in_place() -> None:
    stream = _Tty()
    progress = StderrProgress(total_stages=2, stream=stream)
    with progress.stage("evaluate built model"):
        progress.update(1, 4)
    out = stream.getvalue()
    assert "\r\x1b[K[1/2] evaluate built model |######..................| 1/4" in out
    assert out.endswith("[1/2] evaluate built model: done in 0.0s\n")


def test_pipe_gets_one_plain_line_per_stage_and_failures_are_marked() -> None:
    stream = io.StringIO()
    progress = StderrProgress(total_stages=2, stream=stream)
    with progress.stage("resolve source"):
        progress.update(1, 2)
    with pytest.raises(RuntimeError), progress.stage("build int4 onnx"):
        raise RuntimeError("boom")
    assert stream.getvalue() == ("[1/2] resolve source: done in 0.0s\n"
                                 "[2/2] build int4 onnx: FAILED in 0.0s\n")

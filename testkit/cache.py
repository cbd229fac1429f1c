"""What the test workers share: each cached model is made once per run, by whichever pytest-xdist
worker asks first; the others wait for it (a file lock beside it) and reuse it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.build.locks import exclusive


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of this run that every worker sees: xdist gives each worker `<run>/popen-gwN` as its
    base temp, so a shared one lives in `<run>`."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def made_once(out: Path, marker: str, make: Callable[[Path], object]) -> Path:
    """`out`, made by `make(tmp)` into a sibling temp dir and renamed into place unless `out/marker`
    exists already. A maker killed midway leaves only the temp dir, which the next one replaces."""
    if (out / marker).is_file():
        return out
    with exclusive(out):
        if not (out / marker).is_file():
            tmp = out.with_name(f".{out.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            make(tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    return out

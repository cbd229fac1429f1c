"""Run onnxruntime-genai's model builder on a local Hugging Face folder.

The builder runs in a subprocess: it allocates a lot, prints a lot (tqdm bars
by the thousand), and a crash in it must not take the CLI down with a
traceback. Its output goes to a log file; on failure the error shows the tail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO

from agent.wire.errors import BuildError

LOG_TAIL_LINES = 8
_CANCEL_POLL_S = 0.5


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(line[-300:] for line in text.strip().splitlines()[-lines:])


def run_ort_builder(
    hf_dir: Path,
    out_dir: Path,
    *,
    precision: str,
    execution_provider: str,
    cache_dir: Path,
    extra_options: dict[str, str] | None = None,
    log_path: Path | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Build `hf_dir` into `out_dir` with onnxruntime-genai's model builder, run through
    `builder.build.streamquant` (the same files, quantized weight by weight).

    Each run gets a scratch dir of its own under `cache_dir`: the ORT builder removes its cache
    dir when it finds it empty at the end, under a concurrent build's feet.

    Setting `cancel` (from another thread) stops the builder.

    Raises:
        BuildError: the builder exited non-zero or was cancelled; the message ends with its last output lines.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=cache_dir))
    cmd = [
        sys.executable, "-m", "builder.build.streamquant",
        "-i", str(hf_dir), "-o", str(out_dir),
        "-p", precision, "-e", execution_provider, "-c", str(scratch),
    ]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="ortbuild-", suffix=".log")
        os.close(fd)
        log = Path(name)
    else:
        log = log_path
    try:
        with log.open("w") as out:
            returncode = _run(cmd, out, env, cancel)
        if returncode is None:
            raise BuildError(f"onnxruntime-genai model builder on {hf_dir} for {precision} was cancelled")
        if returncode != 0:
            raise BuildError(
                f"onnxruntime-genai model builder failed (exit {returncode}) on {hf_dir} "
                f"for {precision}/{execution_provider}:\n{_tail(log.read_text(errors='replace'))}"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if log_path is None:
            log.unlink(missing_ok=True)


def _run(cmd: list[str], out: IO[str], env: dict[str, str], cancel: threading.Event | None) -> int | None:
    """The builder's exit code, or None when `cancel` was set first (the builder is then killed)."""
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            try:
                return proc.wait(timeout=_CANCEL_POLL_S)
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.is_set():
                    return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def set_context_length(model_dir: Path, context_length: int) -> int:
    """Declare a shorter context in genai_config.json (search.max_length and model.context_length).

    Only shrinking is allowed: the rotary caches inside the ONNX graph are sized
    for the model's own context length. Returns the declared length.

    Raises:
        BuildError: `context_length` is larger than the model's.
    """
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    native = int(config["model"]["context_length"])
    if context_length > native:
        raise BuildError(f"--context-length {context_length} is larger than the model's {native}: use at most {native}")
    config["model"]["context_length"] = context_length
    config["search"]["max_length"] = context_length
    path.write_text(json.dumps(config, indent=4) + "\n")
    return context_length

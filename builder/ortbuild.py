"""Run onnxruntime-genai's model builder on a local Hugging Face folder.

The builder runs in a subprocess: it allocates a lot, prints a lot, and a
crash in it must not take the CLI down with a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.errors import BuildError


def run_ort_builder(
    hf_dir: Path,
    out_dir: Path,
    *,
    precision: str,
    execution_provider: str,
    cache_dir: Path,
    extra_options: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> None:
    """Build `hf_dir` into `out_dir` with `python -m onnxruntime_genai.models.builder`.

    Raises:
        BuildError: the builder exited non-zero; the message ends with its last output lines.
    """
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf_dir), "-o", str(out_dir),
        "-p", precision, "-e", execution_provider, "-c", str(cache_dir),
    ]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if log_path is not None:
        log_path.write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(line[-300:] for line in proc.stdout.strip().splitlines()[-8:])
        raise BuildError(
            f"onnxruntime-genai model builder failed (exit {proc.returncode}) on {hf_dir} "
            f"for {precision}/{execution_provider}:\n{tail}"
        )

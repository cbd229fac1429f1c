"""A real model worker, after serving, maps no pydantic, no numpy and one onnxruntime; the API
process imports no numpy either."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import psutil

from agent.serving.worker.client import WorkerClient
from testkit.env import subprocess_env


def test_the_worker_maps_no_pydantic_no_numpy_and_one_onnxruntime(smollm2_int4_raw: Path) -> None:
    """The worker's memory is counted against a bare onnxruntime-genai process: it must not carry
    pydantic (11 MB) or numpy (15 MB with OpenBLAS: the batched decode's arithmetic runs in
    onnxruntime graphs), and its batched decode runs on the onnxruntime library onnxruntime-genai
    loaded, not on onnxruntime's Python module (a second copy of onnxruntime)."""

    async def maps_while_serving() -> tuple[list[str], list[int]]:
        worker = await WorkerClient.start(smollm2_int4_raw, threads=1)
        try:
            ids = await worker.greedy_token_ids("The capital of France is", 6)
            paths = [m.path for m in psutil.Process(worker.proc.pid).memory_maps()]
            return paths, ids
        finally:
            await worker.stop()

    paths, ids = asyncio.run(maps_while_serving())
    assert len(ids) == 6
    assert any("libonnxruntime-genai.so" in p for p in paths)  # the check sees native libraries
    assert not [p for p in paths if any(lib in p for lib in ("_pydantic_core", "onnxruntime_pybind11_state",
                                                               "_multiarray_umath", "openblas"))]
    assert len({p for p in paths if "libonnxruntime.so" in p}) == 1


def test_the_api_process_imports_no_numpy() -> None:
    """numpy (15 MB) is no process's of the agent: the API process's modules, which read a model
    dir's config too, must not pull it in."""
    probe = ("import sys, agent.cli.run, agent.serving.host, agent.serving.server, agent.serving.identity; "
             "print(sorted(m for m in ('numpy', 'agent.serving.batch', 'agent.serving.runtime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"

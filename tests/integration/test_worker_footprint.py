"""A real model worker, after serving, maps no pydantic and one onnxruntime."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil

from agent.serving.worker.client import WorkerClient


def test_the_worker_maps_no_pydantic_and_one_onnxruntime(smollm2_int4_raw: Path) -> None:
    """The worker's memory is counted against a bare onnxruntime-genai process: it must not carry
    pydantic (11 MB), and its batched decode runs on the onnxruntime library onnxruntime-genai
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
    assert not [p for p in paths if "_pydantic_core" in p or "onnxruntime_pybind11_state" in p]
    assert len({p for p in paths if "libonnxruntime.so" in p}) == 1

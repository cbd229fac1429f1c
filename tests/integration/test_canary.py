"""The canary on real builds: the model that was built passes, every kind of broken model is
refused before it serves, with the reason named. Each case starts a real model worker.

Broken models, each made from the real SmolLM2 INT4 artifact:
- damaged weights: a run of bytes in the middle of one weight tensor overwritten;
- a swapped tensor: two same-sized weight tensors of adjacent layers exchanged in model.onnx.data;
- a truncated tensor file: model.onnx.data cut short (the load fails);
- a wrong genai_config.json: past keys and values exchanged (it loads, runs and says nonsense);
- another model's manifest: a different model (the tiny test llama, same tokenizer) under SmolLM2's canary.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.serving.host import ModelHost
from agent.wire.errors import ActivationError
from agent.wire.manifest import MANIFEST_FILENAME, Canary, Manifest
from testkit.broken_models import damage_weights, swap_past_key_value_inputs, swap_tensors, truncate_tensor_file


def _canary(artifact: Path) -> Canary:
    return Manifest.model_validate_json((artifact / MANIFEST_FILENAME).read_bytes()).evaluation.canary


def _switch(model_dir: Path, canary: Canary) -> str | None:
    """None when the switch succeeded, else the ActivationError's message."""
    async def go() -> str | None:
        host = ModelHost(threads=1)
        try:
            await host.switch(model_dir, canary=canary)
            return None
        except ActivationError as e:
            return str(e)
        finally:
            await host.close()
    return asyncio.run(go())












def _copy(artifact: Path, dest: Path) -> Path:
    shutil.copytree(artifact, dest)
    return dest


def test_the_built_model_passes_and_its_leads_are_recorded(smollm2_artifact: Path) -> None:
    canary = _canary(smollm2_artifact)
    assert canary.expected_leads is not None and len(canary.expected_leads) == len(canary.expected_token_ids)
    assert _switch(smollm2_artifact, canary) is None


@pytest.mark.parametrize(("breakage", "reason"), [
    (damage_weights, "failed its canary: the lead of canary token"),
    (swap_tensors, "failed its canary: the lead of canary token"),
    (truncate_tensor_file, "failed to load"),
    (swap_past_key_value_inputs, "failed its canary: the lead of canary token"),
], ids=["damaged-weights", "swapped-tensor", "truncated-tensor-file", "wrong-genai-config"])
def test_a_broken_model_is_refused_with_the_reason(smollm2_artifact: Path, tmp_path: Path,
                                                    breakage: Callable[[Path], None], reason: str) -> None:
    broken = _copy(smollm2_artifact, tmp_path / "broken")
    breakage(broken)
    message = _switch(broken, _canary(smollm2_artifact))
    assert message is not None and reason in message, message
    assert "the previous model keeps serving" in message or "load" in message


def test_another_models_manifest_is_refused(smollm2_artifact: Path, tiny_raw: Path) -> None:
    message = _switch(tiny_raw, _canary(smollm2_artifact))
    assert message is not None and "failed its canary: the lead of canary token" in message, message
    assert "not the ones that were built" in message

"""builder.build.convert: a GGUF dequantized one tensor at a time into a Hugging Face folder holds
what transformers' own GGUF loading yields (the reference): as it is for a small model, in
float16 shards that transformers loads back for a large one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.build import convert
from builder.build.sources import smollm2_gguf_path


@pytest.fixture(scope="module")
def transformers_state() -> dict[str, np.ndarray]:
    """SmolLM2's GGUF as transformers' `from_pretrained(gguf_file=...)` loads it."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _loaded_state(folder: Path, dtype: torch.dtype) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _assert_same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert np.array_equal(got[key], value), f"{key} differs"


def test_converted_folder_holds_the_tensors_transformers_loads(smollm2_hf_dir: Path,
                                                               transformers_state: dict[str, np.ndarray]) -> None:
    from safetensors import safe_open

    # The builder's own conversion (the session's cached SmolLM2 folder): one file for a small model.
    assert [p.name for p in smollm2_hf_dir.glob("*.safetensors")] == ["model.safetensors"]
    with safe_open(str(smollm2_hf_dir / "model.safetensors"), "np") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    # Tied output weights are stored once, as save_pretrained stores them.
    tied = {k: v for k, v in transformers_state.items() if k != "lm_head.weight"}
    _assert_same_state(stored, tied)
    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert "quantization_config" not in config  # a null one crashes the ORT builder


def test_a_large_model_is_written_in_float16_shards_that_load_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  transformers_state: dict[str, np.ndarray]) -> None:
    # SmolLM2 (135M parameters) stands in for a model over the float32 limit and a shard limit.
    monkeypatch.setattr(convert, "FP32_REFERENCE_MAX_PARAMS", 100_000_000)
    monkeypatch.setattr(convert, "SHARD_BYTES", 48 << 20)
    seen: list[tuple[int, int]] = []
    out = convert.gguf_to_hf_dir(smollm2_gguf_path(), tmp_path / "hf", lambda done, total: seen.append((done, total)))
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    shards = sorted(out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 5 and set(index["weight_map"].values()) == {p.name for p in shards}
    # A shard passes the limit only by its one tensor that alone is larger (the 57 MB embedding).
    assert all(p.stat().st_size <= 48 << 20 or len(_keys_of(p)) == 1 for p in shards)
    assert seen[-1][0] == seen[-1][1] == 272 and len(seen) == 272  # each GGUF tensor reported
    loaded = _loaded_state(out, torch.float16)
    _assert_same_state(loaded, {k: v.astype(np.float16) for k, v in transformers_state.items()})


def _keys_of(shard: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(shard), "np") as f:
        return list(f.keys())

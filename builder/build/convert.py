"""Turn a GGUF file into a Hugging Face folder the ORT builder accepts.

The ORT builder reads only f16/f32 GGUF, so any quantization is undone here, with the GGUF-to-HF
name mapping and per-architecture fixes of transformers (the tensors transformers' own GGUF
loading yields). Not through `from_pretrained(gguf_file=...)`: that dequantizes every tensor into
memory before the model is built, about 2x the model's float32 bytes at its peak. Here one tensor
at a time is dequantized and written, into safetensors shards of at most SHARD_BYTES, so the peak
is a shard, whatever the model's size.

The tensors are float32 (exactly what transformers yields) for a model of up to
FP32_REFERENCE_MAX_PARAMS parameters, float16 above: a float32 copy of an 8B model is 32 GB on
disk and what the ORT builder maps, and rounding a 4-8 bit GGUF weight to float16's 11 bits moves
it by far less than the builder's own quantization does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.wire.errors import SourceError
from builder.build.reference import FP32_REFERENCE_MAX_PARAMS

SHARD_BYTES = 1 << 30
_INDEX_FILE = "model.safetensors.index.json"


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Dequantize `gguf_path` into a Hugging Face folder at `out_dir` (safetensors shards, config,
    generation config, tokenizer). `progress(done, total)` is told of each tensor.

    Raises:
        SourceError: the file is not a readable GGUF or its architecture is unsupported.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig  # heavy: builder extra only

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise _unreadable(gguf_path, e) from e
    # A null `quantization_config` left in config.json crashes the ORT builder.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        config.architectures = [_write_tensors(gguf_path, config, out_dir, progress)]
    except (ValueError, KeyError, IndexError, OSError) as e:  # a damaged or truncated tensor section
        raise _unreadable(gguf_path, e) from e
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _unreadable(gguf_path: Path, e: Exception) -> SourceError:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return SourceError(f"cannot read GGUF {gguf_path}: {type(e).__name__}: {first}"
                       " -- check that the file is complete and of a supported architecture")


def _write_tensors(gguf_path: Path, config: Any, out_dir: Path, progress: Callable[[int, int], None] | None) -> str:
    """Each tensor of the GGUF, dequantized, renamed and fixed as transformers loads it, written
    into shards as it comes; the shard index names where each went. Returns the model's class name."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    gguf_config = config.to_dict()  # what transformers parsed from the GGUF's fields, not read again
    reader = GGUFReader(gguf_path)
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    dtype = torch.float32 if parameters <= FP32_REFERENCE_MAX_PARAMS else torch.float16
    config.dtype = str(dtype).removeprefix("torch.")
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=gguf_config)
    with torch.device("meta"):  # the model's parameter names, with no memory behind them
        names_model = AutoModelForCausalLM.from_config(config)
    key_mapping = get_gguf_hf_weights_map(names_model, processor)
    # Some processors (mixture-of-experts) gather several GGUF tensors into one here.
    parsed: dict[str, Any] = {"tensors": {}, "config": gguf_config}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    shards: list[tuple[str, list[str]]] = []
    tensor_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            file = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out_dir / file), metadata={"format": "pt"})
            shards.append((file, list(shard)))
            shard, shard_bytes = {}, 0

    total = len(reader.tensors)
    for done, tensor in enumerate(reader.tensors, 1):
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=key_mapping, parsed_parameters=parsed)
        if result.name in key_mapping:
            weights = torch.from_numpy(np.array(result.weights, dtype=np.float32, copy=True)).to(dtype)
            if not torch.isfinite(weights).all():
                raise SourceError(f"GGUF {gguf_path}: tensor {tensor.name} holds values beyond {dtype}'s range"
                                  " (or not numbers): the file is damaged")
            if shard_bytes and shard_bytes + weights.nbytes > SHARD_BYTES:
                flush()
            shard[key_mapping[result.name]] = weights
            shard_bytes += weights.nbytes
            tensor_bytes += weights.nbytes
        if progress is not None:
            progress(done, total)
    for key, gathered in parsed["tensors"].items():
        shard[key] = gathered.to(dtype).contiguous()
        tensor_bytes += shard[key].nbytes
    flush()
    _write_index(out_dir, shards, tensor_bytes)
    return type(names_model).__name__


def _write_index(out_dir: Path, shards: list[tuple[str, list[str]]], tensor_bytes: int) -> None:
    """One shard is renamed model.safetensors (what save_pretrained writes for a small model);
    several get an index."""
    if len(shards) == 1:
        os.replace(out_dir / shards[0][0], out_dir / "model.safetensors")
        return
    weight_map = {key: file for file, keys in shards for key in keys}
    (out_dir / _INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map},
                                                  indent=2, sort_keys=True))

"""Facts about a model read from its files, without loading weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from agent.wire.manifest import ModelInfo

_SAFETENSORS_HEADER_MAX_BYTES = 100 * 1024 * 1024


def parameter_count(hf_dir: Path) -> int:
    """Sum of tensor elements over *.safetensors headers (tied weights counted once,
    as stored); 0 when the folder holds only *.bin weights."""
    total = 0
    for path in sorted(hf_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _SAFETENSORS_HEADER_MAX_BYTES:
                continue
            header = json.loads(f.read(n))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            total += count
    return total


def model_info(hf_dir: Path, built_dir: Path) -> ModelInfo:
    """Architecture and sizes: the architecture from the source, context and vocab
    from the built genai_config.json (what the runtime will actually use)."""
    source_config = json.loads((hf_dir / "config.json").read_text())
    genai = json.loads((built_dir / "genai_config.json").read_text())["model"]
    return ModelInfo(
        architecture=str(source_config["architectures"][0]),
        parameter_count=parameter_count(hf_dir),
        context_length=int(genai["context_length"]),
        vocab_size=int(genai["vocab_size"]),
    )

"""What the agent reads of an onnxruntime-genai `genai_config.json` besides what onnxruntime-genai
reads itself: the context length, the vocabulary and the KV cache's size per token, whether the
model takes images, and how a prompt marks where each image goes. (The API process reads it too,
so nothing here imports the runtime.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.wire.errors import ActivationError

# model.type -> the text that stands for image n (from 1) in a prompt; the model's processor puts the
# image's placeholder tokens there. Only the types whose prompt format the agent knows take images.
_IMAGE_TAGS = {"phi3v": "<|image_{n}|>\n", "phi4mm": "<|image_{n}|>\n"}


def _model_section(model_dir: Path) -> dict[str, Any]:
    try:
        model = json.loads((model_dir / "genai_config.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return model if isinstance(model, dict) else {}


def image_tag(model_dir: Path) -> str | None:
    """The image tag template (`str.format(n=...)`) when the model in `model_dir` takes images:
    it has a vision model and a type whose prompt format is known; None for a text-only model."""
    model = _model_section(model_dir)
    model_type = model.get("type")
    if not isinstance(model.get("vision"), dict) or not isinstance(model_type, str):
        return None
    return _IMAGE_TAGS.get(model_type)


def image_tags(template: str, count: int) -> str:
    """The tags of images 1..`count` by the model's template (`image_tag`), one after another."""
    return "".join(template.format(n=n) for n in range(1, count + 1))


def has_vision_model(model_dir: Path) -> bool:
    """Whether the config names a vision model at all (known prompt format or not)."""
    return isinstance(_model_section(model_dir).get("vision"), dict)


def read_context_length(model_dir: Path) -> int:
    """The model's context length from its `genai_config.json`.

    Raises:
        ActivationError: the dir has no readable `genai_config.json`.
    """
    config_path = model_dir / "genai_config.json"
    try:
        genai_config = json.loads(config_path.read_text())
        return int(genai_config["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ActivationError(
            f"{config_path} is missing or not an onnxruntime-genai config ({e}): "
            "pass a model dir built by edge-builder"
        ) from e


def read_vocab_size(model_dir: Path) -> int:
    """The vocabulary size `genai_config.json` declares; 0 when it declares none (nothing is checked)."""
    try:
        return int(_model_section(model_dir)["vocab_size"])
    except (ValueError, KeyError, TypeError):
        return 0


def read_kv_bytes_per_token(model_dir: Path) -> int:
    """The bytes of KV cache one token takes, by `genai_config.json`: keys and values of every layer,
    fp16 in a GPU build's graph, fp32 in a CPU build's (what the 0.18 builder writes); 0 when the
    config does not say (nothing can then be kept within a budget)."""
    try:
        decoder = _model_section(model_dir)["decoder"]
        per_layer = int(decoder["num_key_value_heads"]) * int(decoder["head_size"])
        is_gpu_graph = any(decoder.get("session_options", {}).get("provider_options") or [])
        return 2 * int(decoder["num_hidden_layers"]) * per_layer * (2 if is_gpu_graph else 4)
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0

"""What the agent reads of an onnxruntime-genai `genai_config.json` besides what the runtime reads
itself: whether the model takes images, and how a prompt marks where each image goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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

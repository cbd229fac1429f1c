"""agent.wire.genai_config: which models take images, by their genai_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.wire.genai_config import has_vision_model, image_tag


def _folder(tmp_path: Path, model: object) -> Path:
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": model}))
    return tmp_path


@pytest.mark.parametrize(("model", "tag", "vision"), [
    ({"type": "phi3v", "vision": {"filename": "v.onnx"}}, "<|image_{n}|>\n", True),
    ({"type": "phi4mm", "vision": {"filename": "v.onnx"}}, "<|image_{n}|>\n", True),
    ({"type": "phi3v"}, None, False),  # no vision model: text only, whatever the type says
    ({"type": "qwen2_5_vl", "vision": {"filename": "v.onnx"}}, None, True),  # a prompt format not known here
    ({"type": "llama"}, None, False),
    ({"type": 3, "vision": {}}, None, True),
    ("not an object", None, False),
])
def test_image_tag_by_type_and_vision_section(tmp_path: Path, model: object, tag: str | None, vision: bool) -> None:
    folder = _folder(tmp_path, model)
    assert image_tag(folder) == tag
    assert has_vision_model(folder) is vision


def test_a_missing_or_broken_config_takes_no_images(tmp_path: Path) -> None:
    assert image_tag(tmp_path) is None
    (tmp_path / "genai_config.json").write_text("{not json")
    assert image_tag(tmp_path) is None and not has_vision_model(tmp_path)

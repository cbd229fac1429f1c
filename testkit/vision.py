"""A tiny multimodal model in onnxruntime-genai's `phi3v` layout, made from nothing (no download).

Phi-3.5-vision's export (its `build.py`) writes three ONNX models and two configs; this module
writes the same five with tiny random weights, following the runtime's phi3v contract:

- the text decoder: onnxruntime-genai's builder run on a tiny random Phi-3 with `exclude_embeds`
  (it takes `inputs_embeds`), so the decoder is the one the builder makes for real models;
- `embedding.onnx`: `input_ids` (int64; an image's placeholder tokens are its negated id, as the
  processor writes them) and `image_features` -> `inputs_embeds`: text ids look up the Phi-3's own
  embedding table, placeholders take the image's feature rows in order;
- `vision.onnx`: `pixel_values` [images, crops, 3, 336, 336] and `image_sizes` [images, 2] ->
  `image_features` [image tokens, hidden]: one row per placeholder (the count Phi-3-vision's
  processor gives an image of that size), each a projection of the images' mean colour plus its
  position, so that two images of different colours give different answers;
- `processor_config.json`: the onnxruntime-extensions image pipeline of Phi-3-vision (decode,
  RGB, its HD transform; 144 tokens per crop; the runtime's transform makes 16 crops of any image);
- `genai_config.json`: type `phi3v`, with the three models' inputs and outputs.

The weights are random (its output layer scaled so that it is decided: a canary can then tell a
right token from a wrong one); the answers mean nothing, only that each piece runs. The session
fixtures `tiny_phi3v_text_hf` (the Phi-3, also the gate's reference) and `tiny_phi3v` make each
once per run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from testkit.cache import made_once
from testkit.models import _COMMON, _TOKENIZER_FILES

HIDDEN = _COMMON["hidden_size"]
CONTEXT_LENGTH = 8192  # the 0.18 runtime's processor scales every image to 16 crops: 1,921 tokens each
NUM_CROPS = 4
TOKENS_PER_CROP = 144
LOGIT_SCALE = 20.0
CROP = 336


def image_tokens(height: int, width: int) -> int:
    """Placeholder tokens of one image whose HD transform gave `height` x `width` (multiples of 336):
    Phi-3-vision's count, the sub-crops and the global crop with their row separators."""
    rows, cols = height // CROP, width // CROP
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * 12


def _embedding_model(table: Any) -> Any:  # a numpy [vocab, hidden] float32 table -> onnx.ModelProto
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, dtype=np.int64))),
        helper.make_node("Less", ["input_ids", "zero"], ["is_image"]),
        helper.make_node("Where", ["is_image", "zero", "input_ids"], ["text_ids"]),
        helper.make_node("Gather", ["table", "text_ids"], ["text_embeds"]),
        # Placeholder k (in order) takes feature row k; text positions take the appended zero row.
        helper.make_node("Cast", ["is_image"], ["is_image_i64"], to=TensorProto.INT64),
        helper.make_node("Constant", [], ["axis1"], value=numpy_helper.from_array(np.array(1, dtype=np.int64))),
        helper.make_node("CumSum", ["is_image_i64", "axis1"], ["count"]),
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, dtype=np.int64))),
        helper.make_node("Sub", ["count", "one"], ["row"]),
        helper.make_node("Shape", ["image_features"], ["features_shape"], start=0, end=1),
        helper.make_node("Squeeze", ["features_shape"], ["n_features"]),
        helper.make_node("Where", ["is_image", "row", "n_features"], ["feature_index"]),
        helper.make_node("Constant", [], ["zero_row"],
                         value=numpy_helper.from_array(np.zeros((1, HIDDEN), dtype=np.float32))),
        helper.make_node("Concat", ["image_features", "zero_row"], ["padded_features"], axis=0),
        helper.make_node("Gather", ["padded_features", "feature_index"], ["image_embeds"]),
        helper.make_node("Constant", [], ["last_axis"], value=numpy_helper.from_array(np.array([-1], dtype=np.int64))),
        helper.make_node("Unsqueeze", ["is_image", "last_axis"], ["is_image_3d"]),
        helper.make_node("Where", ["is_image_3d", "image_embeds", "text_embeds"], ["inputs_embeds"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_phi3v_embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["image_tokens", HIDDEN])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        initializer=[numpy_helper.from_array(table.astype(np.float32), "table")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _vision_model(seed: int) -> Any:  # -> onnx.ModelProto
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    colour_to_hidden = rng.normal(0.0, 2.0, (3, HIDDEN)).astype(np.float32)
    position_to_hidden = rng.normal(0.0, 0.05, (1, HIDDEN)).astype(np.float32)

    def const(name: str, value: Any) -> Any:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))

    nodes = [
        # The mean colour of every crop of every image -> one hidden vector.
        helper.make_node("ReduceMean", ["pixel_values", "colour_axes"], ["mean_colour"], keepdims=0),
        helper.make_node("MatMul", ["mean_colour", "colour_to_hidden"], ["feature"]),
        # Rows: the sum over images of image_tokens(height, width), computed from image_sizes.
        const("crop", np.array(CROP, dtype=np.int64)),
        helper.make_node("Div", ["image_sizes", "crop"], ["blocks"]),  # [images, 2]: rows, cols
        const("index0", np.array([0], dtype=np.int64)), const("index1", np.array([1], dtype=np.int64)),
        helper.make_node("Gather", ["blocks", "index0"], ["block_rows"], axis=1),
        helper.make_node("Gather", ["blocks", "index1"], ["block_cols"], axis=1),
        helper.make_node("Mul", ["block_rows", "block_cols"], ["sub_crops"]),
        const("one", np.array(1, dtype=np.int64)),
        const("per_crop", np.array(TOKENS_PER_CROP, dtype=np.int64)),
        const("separator", np.array(12, dtype=np.int64)),
        helper.make_node("Add", ["sub_crops", "one"], ["crops"]),
        helper.make_node("Mul", ["crops", "per_crop"], ["crop_tokens"]),
        helper.make_node("Add", ["block_rows", "one"], ["separator_rows"]),
        helper.make_node("Mul", ["separator_rows", "separator"], ["separator_tokens"]),
        helper.make_node("Add", ["crop_tokens", "separator_tokens"], ["without_end"]),
        helper.make_node("Add", ["without_end", "one"], ["tokens_per_image"]),
        helper.make_node("ReduceSum", ["tokens_per_image"], ["total_tokens"], keepdims=0),
        const("zero", np.array(0, dtype=np.int64)),
        helper.make_node("Range", ["zero", "total_tokens", "one"], ["positions"]),
        helper.make_node("Cast", ["positions"], ["positions_f"], to=TensorProto.FLOAT),
        const("column", np.array([-1, 1], dtype=np.int64)),
        helper.make_node("Reshape", ["positions_f", "column"], ["positions_col"]),
        helper.make_node("MatMul", ["positions_col", "position_to_hidden"], ["position_rows"]),
        helper.make_node("Add", ["position_rows", "feature"], ["image_features"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_phi3v_vision",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["images", "crops", 3, CROP, CROP]),
         helper.make_tensor_value_info("image_sizes", TensorProto.INT64, ["images", 2])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["image_tokens", HIDDEN])],
        initializer=[numpy_helper.from_array(np.array([0, 1, 3, 4], dtype=np.int64), "colour_axes"),
                     numpy_helper.from_array(colour_to_hidden, "colour_to_hidden"),
                     numpy_helper.from_array(position_to_hidden, "position_to_hidden")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


PROCESSOR_CONFIG = {"processor": {"name": "image_processing", "transforms": [
    {"operation": {"name": "decode_image", "domain": "com.microsoft.extensions", "type": "DecodeImage",
                   "attrs": {"color_space": "BGR"}}},
    {"operation": {"name": "convert_to_rgb", "domain": "com.microsoft.extensions", "type": "ConvertRGB"}},
    {"operation": {"name": "phi3_image_transform", "domain": "com.microsoft.extensions", "type": "Phi3ImageTransform",
                   "attrs": {"num_crops": NUM_CROPS, "num_img_tokens": TOKENS_PER_CROP}}}]}}


def make_text_model(out_dir: Path, *, tokenizer_dir: Path, seed: int = 0) -> Path:
    """The tiny random Phi-3 (HF folder) whose decoder and embedding table the phi3v model uses: also
    the FP32 reference a build of that model is gated against."""
    import torch
    import transformers as tf

    config = tf.Phi3Config(**{**_COMMON, "max_position_embeddings": CONTEXT_LENGTH},
                           original_max_position_embeddings=CONTEXT_LENGTH, rope_scaling=None)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random weights give near-uniform logits, where any token leads by a hair and a canary
        # could not tell right tokens from wrong ones: a larger output layer makes the model decided.
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(out_dir)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return out_dir


def make_tiny_phi3v(out_dir: Path, *, text_model_dir: Path, cache_dir: Path, seed: int = 0) -> Path:
    """Write a tiny phi3v onnxruntime-genai folder (INT4 decoder) of `text_model_dir` (`make_text_model`)
    to `out_dir`; returns `out_dir`."""
    import onnx
    from safetensors.numpy import load_file

    from builder.build.ortbuild import run_ort_builder

    run_ort_builder(text_model_dir, out_dir, precision="int4", execution_provider="cpu", cache_dir=cache_dir,
                    extra_options={"exclude_embeds": "true", "block_size": "32", "accuracy_level": "4"})
    (weights,) = text_model_dir.glob("*.safetensors")
    table = load_file(str(weights))["model.embed_tokens.weight"]
    onnx.save(_embedding_model(table), out_dir / "embedding.onnx")
    onnx.save(_vision_model(seed), out_dir / "vision.onnx")
    (out_dir / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2) + "\n")
    genai_path = out_dir / "genai_config.json"
    genai = json.loads(genai_path.read_text())
    model = genai["model"]
    model["type"] = "phi3v"
    model["embedding"] = {"filename": "embedding.onnx",
                          "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                          "outputs": {"inputs_embeds": "inputs_embeds"}}
    model["vision"] = {"filename": "vision.onnx", "config_filename": "processor_config.json",
                       "inputs": {"pixel_values": "pixel_values", "image_sizes": "image_sizes"},
                       "outputs": {"image_features": "image_features"}}
    genai_path.write_text(json.dumps(genai, indent=4) + "\n")
    return out_dir


@pytest.fixture(scope="session")
def tiny_phi3v_text_hf(model_cache_dir: Path, smollm2_hf_dir: Path) -> Path:
    return made_once(model_cache_dir / "tiny-phi3v-text-hf", "config.json",
                     lambda tmp: make_text_model(tmp, tokenizer_dir=smollm2_hf_dir))


@pytest.fixture(scope="session")
def tiny_phi3v(model_cache_dir: Path, tiny_phi3v_text_hf: Path) -> Path:
    """A tiny phi3v onnxruntime-genai folder, as a model's own export script writes one."""
    return made_once(model_cache_dir / "tiny-phi3v", "genai_config.json", lambda tmp: make_tiny_phi3v(
        tmp, text_model_dir=tiny_phi3v_text_hf, cache_dir=model_cache_dir / "ort-cache"))


def solid_png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    """A PNG of one colour: images whose difference the tiny model sees (it reads the mean colour)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()

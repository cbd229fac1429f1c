"""Pure checks of build option combinations (no model involved)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from agent.wire.errors import UsageError
from builder.build.options import VALID_COMBINATIONS, parse_extra_options, resolve_build_options
from builder.build.reference import precision_for
from builder.build.sources import derive_name


@pytest.mark.parametrize("precision", ["int4", "int8", "fp16", "fp32"])
@pytest.mark.parametrize("ep", ["cpu", "cuda", "dml", "webgpu"])
def test_every_precision_ep_pair_is_accepted_exactly_when_valid(precision: str, ep: str) -> None:
    if (precision, ep) in VALID_COMBINATIONS:
        assert resolve_build_options(precision=precision, execution_provider=ep, profile=None).profile == ep
    else:
        with pytest.raises(UsageError, match=f"precision {precision} is not supported on execution provider {ep}"):
            resolve_build_options(precision=precision, execution_provider=ep, profile=None)


def test_cpu_int4_defaults_to_block_32_and_int8_compute() -> None:
    opts = resolve_build_options(precision="int4", execution_provider="cpu", profile=None)
    assert opts.ort_extra_options == {"block_size": "32", "accuracy_level": "4"}


def test_mobile_profile_is_int4_cpu_with_accuracy_level_4() -> None:
    opts = resolve_build_options(precision="int4", execution_provider="cpu", profile="mobile")
    assert (opts.profile, opts.ort_extra_options["accuracy_level"], opts.ort_extra_options["block_size"]) == (
        "mobile", "4", "32")
    with pytest.raises(UsageError, match="mobile is INT4 on the CPU EP, not int8/cpu"):
        resolve_build_options(precision="int8", execution_provider="cpu", profile="mobile")
    with pytest.raises(UsageError, match="mobile uses --accuracy-level 4"):
        resolve_build_options(precision="int4", execution_provider="cpu", profile="mobile", accuracy_level=1)


def test_profile_must_fit_the_execution_provider() -> None:
    with pytest.raises(UsageError, match="--profile cpu does not fit -e cuda"):
        resolve_build_options(precision="int4", execution_provider="cuda", profile="cpu")


def test_int4_flags_map_to_ort_options_and_are_refused_for_float_precisions() -> None:
    opts = resolve_build_options(precision="int4", execution_provider="cpu", profile=None, block_size=128,
                                 accuracy_level=1, algo="k_quant_last", extra_options={"shared_embeddings": "true"})
    assert opts.ort_extra_options == {"block_size": "128", "accuracy_level": "1", "algo_config": "k_quant_last",
                                      "shared_embeddings": "true"}
    with pytest.raises(UsageError, match="--block-size, --algo only apply to -p int4 or int8, not fp32"):
        resolve_build_options(precision="fp32", execution_provider="cpu", profile=None, block_size=32, algo="rtn")
    with pytest.raises(UsageError, match="--block-size 48 is not one of"):
        resolve_build_options(precision="int4", execution_provider="cpu", profile=None, block_size=48)


def test_extra_options_parse_and_refuse_malformed_repeated_or_flag_owned_keys() -> None:
    assert parse_extra_options(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(UsageError, match="must look like KEY=VALUE"):
        parse_extra_options(["novalue"])
    with pytest.raises(UsageError, match="given twice"):
        parse_extra_options(["a=1", "a=2"])
    with pytest.raises(UsageError, match="use that flag instead"):
        parse_extra_options(["block_size=64"])


@pytest.mark.parametrize(("source", "name"), [
    ("HuggingFaceTB/SmolLM2-135M", "smollm2-135m"),
    ("/m/Qwen2.5-0.5B-Instruct.Q8_0.gguf", "qwen2.5-0.5b-instruct.q8_0"),
    ("./my model/", "my-model"), ("___", "model"),
])
def test_derived_names_are_valid_manifest_names(source: str, name: str) -> None:
    assert derive_name(source) == name


def _safetensors_header_only(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file's header (what the parameter count reads); the data section is left out."""
    offset, header = 0, {}
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)


@pytest.mark.parametrize(("layers", "precision"), [(1, "fp32"), (30, "fp32"), (31, "int8"), (32, "int8")])
def test_auto_reference_is_fp32_up_to_a_billion_parameters_and_int8_above(tmp_path: Path, layers: int,
                                                                          precision: str) -> None:
    # 2^25 parameters a layer over two shards: 30 layers and the embedding are under 2^30, 31 are over.
    shards = [{f"model.layers.{i}.mlp.weight": [4096, 8192] for i in range(layers) if i % 2 == part}
              for part in (0, 1)]
    shards[0]["model.embed_tokens.weight"] = [16384, 4096]
    for n, shapes in enumerate(shards):
        _safetensors_header_only(tmp_path / f"model-{n}.safetensors", shapes)
    assert precision_for(tmp_path) == precision

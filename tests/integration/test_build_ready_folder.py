"""A ready onnxruntime-genai folder as SOURCE: packaged as it is, gated against `--reference`.

The ready folders here are what onnxruntime-genai's own builder writes (as a model's export
script or a vendor's published ONNX folder would be): nothing of ours touched them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from agent.serving.runtime import ModelRuntime
from agent.wire.errors import SourceError, UsageError
from builder.build import ready
from builder.build.ortbuild import run_ort_builder
from builder.build.package import verify_artifact
from builder.build.pipeline import DEFAULT_MAX_PPL_RATIO, BuildRequest, build_artifact


@pytest.fixture(scope="module")
def ready_folder(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory, builder_cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("vendor") / "tiny-int8-onnx"
    run_ort_builder(tiny_hf, out, precision="int8", execution_provider="cpu", cache_dir=builder_cache_dir / "ort")
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_ready_folder_ships_as_it_is_and_is_gated_against_its_reference(
        ready_folder: Path, tiny_hf: Path, tmp_path: Path, builder_cache_dir: Path) -> None:
    out = tmp_path / "artifact"
    result = build_artifact(BuildRequest(source=str(ready_folder), reference=str(tiny_hf), out_dir=out,
                                         cache_dir=builder_cache_dir))
    manifest = verify_artifact(out)
    assert (manifest.source.kind, manifest.source.made_from) == ("ort_genai", str(tiny_hf))
    # What a build would have chosen is read from the folder: int8 weights, the CPU provider, no options.
    assert (manifest.build.precision, manifest.build.execution_provider, manifest.build.builder_options) == (
        "int8", "cpu", {})
    # No rebuild: every file of the folder ships byte for byte, and nothing else but the manifest.
    shipped = {f.path: f.sha256 for f in manifest.files}
    assert shipped == {p.relative_to(ready_folder).as_posix(): _sha(p) for p in ready_folder.rglob("*") if p.is_file()}
    assert manifest.model_info.architecture == json.loads((tiny_hf / "config.json").read_text())["architectures"][0]
    assert 0 < manifest.evaluation.perplexity_ratio < DEFAULT_MAX_PPL_RATIO
    assert result.reference_perplexity == manifest.evaluation.reference_perplexity
    runtime = ModelRuntime(out, intra_op_num_threads=1)
    canary = manifest.evaluation.canary
    try:
        assert runtime.greedy_token_ids(canary.prompt, canary.max_new_tokens) == canary.expected_token_ids
    finally:
        runtime.close()


def test_what_a_ready_folder_cannot_be_built_with_is_refused_before_any_work(
        ready_folder: Path, tiny_hf: Path, tmp_path: Path, builder_cache_dir: Path) -> None:
    def build(source: Path = ready_folder, **options: object) -> None:
        build_artifact(BuildRequest(source=str(source), out_dir=tmp_path / "out", cache_dir=builder_cache_dir,
                                    **options))  # type: ignore[arg-type]

    with pytest.raises(UsageError, match="brings no full-precision weights .* pass --reference"):
        build()
    with pytest.raises(UsageError, match="is itself an onnxruntime-genai folder"):
        build(reference=str(ready_folder))
    with pytest.raises(UsageError, match="is a ready int8/cpu folder: -p fp32 would need a rebuild"):
        build(reference=str(tiny_hf), precision="fp32")
    with pytest.raises(UsageError, match="-e cuda would need a rebuild"):
        build(reference=str(tiny_hf), execution_provider="cuda")
    with pytest.raises(UsageError, match="is already built: --block-size does not apply"):
        build(reference=str(tiny_hf), block_size=32)
    with pytest.raises(UsageError, match="--reference is for a ready onnxruntime-genai folder"):
        build(source=tiny_hf, reference=str(tiny_hf))
    # A reference of another vocabulary is another model: its perplexity would gate nothing.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_hf, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    with pytest.raises(SourceError, match=r"vocabulary \(\d+ tokens\) is not its --reference's"):
        build(reference=str(other))
    # A folder that would make onnxruntime open a file outside itself never ships.
    escaping = tmp_path / "escaping"
    shutil.copytree(ready_folder, escaping)
    genai = json.loads((escaping / "genai_config.json").read_text())
    genai["model"]["decoder"]["filename"] = "../../etc/hostname"
    (escaping / "genai_config.json").write_text(json.dumps(genai))
    with pytest.raises(SourceError, match="cannot be shipped: .*not a path inside the model dir"):
        build(source=escaping, reference=str(tiny_hf))
    assert not (tmp_path / "out").exists()


def test_precision_and_provider_are_read_from_the_folder(ready_folder: Path, tiny_hf: Path, tmp_path: Path,
                                                         builder_cache_dir: Path) -> None:
    assert (ready.precision_of(ready_folder), ready.provider_of(ready_folder)) == ("int8", "cpu")
    out = tmp_path / "fp16-cuda"  # float weights (no MatMulNBits) and a provider in the config
    run_ort_builder(tiny_hf, out, precision="fp16", execution_provider="cuda", cache_dir=builder_cache_dir / "ort")
    assert (ready.precision_of(out), ready.provider_of(out)) == ("fp16", "cuda")

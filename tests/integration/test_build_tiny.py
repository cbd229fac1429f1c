"""Architecture coverage: tiny random-weight models of each family through the whole pipeline.

Random weights predict a near-uniform distribution, so their perplexity sits
near the vocabulary size (~49k) for fp32 and int4 alike and the ratio stays
near 1: the default quality gate applies unchanged and still proves the gate
ran. Quality itself is covered by the SmolLM2 build.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.wire.errors import ExitCode, QualityGateError
from builder.build import reference
from builder.build.package import verify_artifact
from builder.build.pipeline import DEFAULT_MAX_PPL_RATIO, BuildRequest, build_artifact
from builder.build.sources import source_sha256
from testkit.env import subprocess_env
from testkit.models import CONTEXT_LENGTH, VOCAB_SIZE

ARCH_CLASSES = {"phi3": "Phi3ForCausalLM", "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


@pytest.mark.parametrize("arch", ["phi3", "mistral", "gemma", "qwen2"])
def test_tiny_architecture_builds_to_a_verified_int4_artifact(arch: str, tiny_model_dir, tmp_path: Path,
                                                              builder_cache_dir: Path) -> None:
    out = tmp_path / "artifact"
    result = build_artifact(BuildRequest(source=str(tiny_model_dir(arch)), out_dir=out, cache_dir=builder_cache_dir))
    manifest = verify_artifact(out)
    assert manifest.model_info.architecture == ARCH_CLASSES[arch]
    assert (manifest.model_info.context_length, manifest.model_info.vocab_size) == (CONTEXT_LENGTH, VOCAB_SIZE)
    assert manifest.source.kind == "hf_dir" and manifest.name == f"tiny-{arch}-hf"
    assert manifest.build.precision == "int4"
    assert any(f.path.endswith(".onnx") for f in manifest.files)
    ev = manifest.evaluation
    assert 0.5 * VOCAB_SIZE < ev.reference_perplexity < 2 * VOCAB_SIZE  # random weights: near uniform
    assert ev.perplexity_ratio < DEFAULT_MAX_PPL_RATIO
    assert len(ev.canary.expected_token_ids) == ev.canary.max_new_tokens
    assert result.canary_token_ids == ev.canary.expected_token_ids and result.is_reused is False
    # The manifest names its own input: the sha256 of a sha256sum-style listing of the source
    # folder, recomputed here; and the cached reference it was judged against is that source's
    # own (the four architectures share one cache: none may reuse another's perplexity).
    src = tiny_model_dir(arch)
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(src).as_posix()}\n"
                      for p in sorted(src.rglob("*")) if p.is_file())
    assert manifest.source.sha256 == hashlib.sha256(listing.encode()).hexdigest()
    (ppl_file,) = (builder_cache_dir / "reference").glob(f"{manifest.source.sha256[:16]}-w*.ppl")
    assert float(ppl_file.read_text()) == ev.reference_perplexity
    # The seed-0 tiny llama is left out: it has the tiny mistral's very weights (one perplexity).
    others = [p for other in ARCH_CLASSES if other not in (arch, "llama")
              for p in (builder_cache_dir / "reference").glob(f"{source_sha256(tiny_model_dir(other))[:16]}-w*.ppl")]
    assert ev.reference_perplexity not in [float(p.read_text()) for p in others]


@pytest.mark.parametrize(("precision", "algo"), [("int8", None), ("fp32", None), ("int4", "k_quant_mixed")])
def test_other_precisions_and_algorithms_build_load_and_generate(precision: str, algo: str | None, tiny_model_dir,
                                                               tmp_path: Path, builder_cache_dir: Path) -> None:
    """INT8, FP32 and INT4 with k_quant_mixed through the whole pipeline (gate, footprint, package),
    then loaded and run by the device's runtime: its greedy tokens are the manifest's canary."""
    from agent.serving.runtime import ModelRuntime

    out = tmp_path / "artifact"
    result = build_artifact(BuildRequest(source=str(tiny_model_dir("llama")), out_dir=out, precision=precision,
                                         algo=algo, cache_dir=builder_cache_dir))
    manifest = verify_artifact(out)
    assert manifest.build.precision == precision
    assert manifest.build.builder_options.get("algo_config") == algo
    assert manifest.evaluation.perplexity_ratio < DEFAULT_MAX_PPL_RATIO
    if precision == "fp32":  # no quantization at all: the candidate is the reference
        assert manifest.evaluation.perplexity_ratio == pytest.approx(1.0, abs=1e-3)
    runtime = ModelRuntime(out, intra_op_num_threads=1)
    canary = manifest.evaluation.canary
    assert runtime.greedy_token_ids(canary.prompt, canary.max_new_tokens) == canary.expected_token_ids
    assert result.canary_token_ids == canary.expected_token_ids


def test_an_int8_reference_gates_without_an_fp32_copy_of_the_model(tiny_hf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"  # nothing of this source is cached yet
    out = tmp_path / "artifact"
    result = build_artifact(BuildRequest(source=str(tiny_hf), out_dir=out, reference_precision="int8",
                                         cache_dir=cache))
    manifest = verify_artifact(out)
    assert manifest.evaluation.reference_precision == "int8"
    assert '"reference_precision": "int8"' in (out / "manifest.json").read_text()
    built = sorted(p.name for p in (cache / "reference").iterdir() if p.is_dir())
    assert built == [f"{manifest.source.sha256[:16]}-int8"]  # the only reference built: no fp32 copy
    assert 0 < result.perplexity_ratio < DEFAULT_MAX_PPL_RATIO
    # Memory held both builds, so the reference was built beside the candidate.
    assert "build int4 onnx (int8 reference beside)" in result.stage_durations_s


def test_a_reference_built_after_the_candidate_measures_the_same(tiny_hf: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    beside = build_artifact(BuildRequest(source=str(tiny_hf), out_dir=tmp_path / "a", cache_dir=tmp_path / "c1"))
    # A fake reading of this host's memory: too little to hold two builds at once.
    monkeypatch.setattr(reference, "available_memory_bytes", lambda: 0)
    after = build_artifact(BuildRequest(source=str(tiny_hf), out_dir=tmp_path / "b", cache_dir=tmp_path / "c2"))
    assert "build int4 onnx (fp32 reference beside)" in beside.stage_durations_s
    assert "build int4 onnx" in after.stage_durations_s and beside.reference_precision == "fp32"
    assert after.reference_perplexity == beside.reference_perplexity
    assert after.perplexity == beside.perplexity


def test_quality_gate_failure_packages_nothing(tiny_model_dir, tmp_path: Path, builder_cache_dir: Path) -> None:
    out = tmp_path / "artifact"
    with pytest.raises(QualityGateError, match=r"over --max-ppl-ratio 0.5: .*nothing was packaged"):
        build_artifact(BuildRequest(source=str(tiny_model_dir("llama")), out_dir=out, cache_dir=builder_cache_dir,
                                    max_ppl_ratio=0.5))
    assert not out.exists() and not list(tmp_path.glob(".artifact.partial-*"))


def _fake_hub_cache(hf_cache: Path, repo_id: str, model_dir: Path) -> None:
    """Lay `model_dir` out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hf_id_builds_offline_from_the_cache_through_the_cli(tiny_model_dir, tmp_path: Path,
                                                             builder_cache_dir: Path) -> None:
    cache = tmp_path / "cache"
    _fake_hub_cache(cache / "hf", "edgefleet-test/tiny-llama", tiny_model_dir("llama"))
    # Share the converted/reference caches so the fp32 reference is built once per run.
    if (builder_cache_dir / "reference").is_dir():
        (cache / "reference").symlink_to(builder_cache_dir / "reference", target_is_directory=True)
    out = tmp_path / "artifact"
    proc = subprocess.run(
        [sys.executable, "-m", "builder.cli", "build", "edgefleet-test/tiny-llama", "-o", str(out), "-c", str(cache),
         "--name", "tiny", "--version", "3", "--label", "from the hub cache", "--json"],
        capture_output=True, text=True, env=subprocess_env(HF_HUB_OFFLINE="1"), timeout=600,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert proc.stderr == ""  # --json: nothing noisy on stderr
    result = json.loads(proc.stdout)
    assert (result["name"], result["version"], result["out_dir"]) == ("tiny", 3, str(out))
    manifest = verify_artifact(out)
    assert (manifest.source.kind, manifest.source.reference) == ("hf_id", "edgefleet-test/tiny-llama")
    assert manifest.label == "from the hub cache"
    assert manifest.model_info.architecture == "LlamaForCausalLM"
    assert set(os.listdir(tmp_path)) == {"artifact", "cache"}  # no .partial-* left next to OUT


def test_two_builds_of_one_output_take_turns_and_the_second_reuses_the_first(tiny_hf: Path, tmp_path: Path,
                                                                               builder_cache_dir: Path) -> None:
    """Two operators (or CI workers) building into the same OUT at once: neither removes the other's
    work in progress; the second waits, then finds the finished artifact."""
    out = tmp_path / "artifact"
    argv = [sys.executable, "-m", "builder.cli", "build", str(tiny_hf), "-o", str(out), "-c", str(builder_cache_dir),
            "--json"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
             for _ in range(2)]
    outcomes = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [ExitCode.OK, ExitCode.OK], [err[-2000:] for _, err in outcomes]
    reused = sorted(json.loads(stdout)["is_reused"] for stdout, _ in outcomes)
    assert reused == [False, True]
    waiter_stderr = next(err for stdout, err in outcomes if json.loads(stdout)["is_reused"])
    assert f"waiting for another build of {out} to finish" in waiter_stderr
    verify_artifact(out)
    assert set(os.listdir(tmp_path)) == {"artifact"}  # no .partial-* and no lock file left next to OUT

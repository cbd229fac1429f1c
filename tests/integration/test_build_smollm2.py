"""The SmolLM2 artifact built by the full pipeline: canary, manifest, reuse, refusal."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.wire.errors import ExitCode
from agent.wire.manifest import Manifest
from builder.build.evaluate import eval_text_sha256
from testkit.env import subprocess_env

_REPLAY = """
import json, sys
import onnxruntime_genai as og
model_dir, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = og.Model(model_dir)
tok = og.Tokenizer(model)
ids = list(tok.encode(prompt))
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(ids) + n, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(ids)
while not gen.is_done():
    gen.generate_next_token()
print(json.dumps([int(t) for t in gen.get_sequence(0)[len(ids):]]))
"""


def _manifest(artifact: Path) -> Manifest:
    return Manifest.model_validate_json((artifact / "manifest.json").read_bytes())


def test_canary_reproduces_in_a_fresh_process(smollm2_artifact: Path) -> None:
    canary = _manifest(smollm2_artifact).evaluation.canary
    # Only onnxruntime-genai in the child: what a device has.
    proc = subprocess.run([sys.executable, "-c", _REPLAY, str(smollm2_artifact), canary.prompt,
                           str(canary.max_new_tokens)], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(proc.stdout) == canary.expected_token_ids
    assert len(canary.expected_token_ids) == canary.max_new_tokens


def test_manifest_lists_every_file_with_correct_size_and_sha256(smollm2_artifact: Path) -> None:
    manifest = _manifest(smollm2_artifact)
    on_disk = {p.relative_to(smollm2_artifact).as_posix(): p for p in smollm2_artifact.rglob("*") if p.is_file()}
    on_disk.pop("manifest.json")
    assert {f.path for f in manifest.files} == set(on_disk)
    for f in manifest.files:
        data = on_disk[f.path].read_bytes()
        assert f.size == len(data), f.path
        assert f.sha256 == hashlib.sha256(data).hexdigest(), f.path
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= set(on_disk)


def test_manifest_records_build_evaluation_and_footprint(smollm2_artifact: Path) -> None:
    m = _manifest(smollm2_artifact)
    assert (m.name, m.version, m.source.kind, m.source.reference) == ("smollm2-135m", 1, "gguf", "smollm2-135m")
    assert (m.build.precision, m.build.execution_provider, m.build.profile) == ("int4", "cpu", "cpu")
    assert m.build.builder_options == {"block_size": "32", "accuracy_level": "4"}
    ev = m.evaluation
    assert ev.eval_tokens >= 1000 and ev.eval_text_sha256 == eval_text_sha256()
    # A real model on English prose: far below the ~49k of a uniform guess over the vocabulary.
    assert 5 < ev.reference_perplexity < ev.perplexity < 100
    assert ev.perplexity_ratio == ev.perplexity / ev.reference_perplexity <= ev.max_perplexity_ratio
    assert ev.decode_tokens_per_s > 0 and ev.prefill_tokens_per_s > 0
    # The probe held a 135M INT4 model plus an 8192-token KV cache: 0.3 to 3 GB.
    assert 300 * 2**20 < ev.peak_rss_bytes < 3 * 2**30
    assert m.requirements.min_ram_bytes == ev.peak_rss_bytes + m.requirements.ram_margin_bytes
    assert m.requirements.ram_margin_bytes >= 128 * 2**20
    assert m.requirements.min_free_disk_bytes >= m.total_file_bytes
    assert m.model_info.architecture == "LlamaForCausalLM"
    assert (m.model_info.context_length, m.model_info.vocab_size) == (8192, 49152)
    assert 100e6 < m.model_info.parameter_count < 200e6


def _cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=600, **kw)


def test_same_build_into_the_same_out_is_reused_untouched(smollm2_artifact: Path, builder_cache_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_artifact.iterdir()}
    proc = _cli("build", "smollm2-135m", "-o", str(smollm2_artifact), "-c", str(builder_cache_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["is_reused"] is True and result["name"] == "smollm2-135m"
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_artifact.iterdir()} == before


def test_out_holding_a_different_build_is_refused_and_kept(smollm2_artifact: Path, builder_cache_dir: Path) -> None:
    manifest_before = (smollm2_artifact / "manifest.json").read_bytes()
    proc = _cli("build", "smollm2-135m", "-o", str(smollm2_artifact), "-c", str(builder_cache_dir),
                "--version", "2", "--json")
    assert proc.returncode == ExitCode.USAGE
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "already holds a different build (smollm2-135m v1" in lines[0], proc.stderr
    assert (smollm2_artifact / "manifest.json").read_bytes() == manifest_before
    assert not list(smollm2_artifact.parent.glob(f".{smollm2_artifact.name}.partial-*"))


def test_perplexity_is_the_exp_mean_negative_log_likelihood_over_its_windows(smollm2_artifact: Path) -> None:
    import numpy as np
    import onnxruntime_genai as og

    from builder.build.evaluate import cpu_config, eval_text, perplexity_of

    model = og.Model(cpu_config(smollm2_artifact))
    ids = [int(t) for t in og.Tokenizer(model).encode(eval_text())][:700]
    nll, scored = 0.0, 0
    for start in range(0, len(ids), 300):  # windows of 300, 300 and 100 tokens, each scored whole
        window = ids[start:start + 300]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(window), do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(window)
        logits = np.asarray(gen.get_output("logits"), dtype=np.float64)[0][:-1]
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
        scored += len(window) - 1
    assert perplexity_of(model, ids, 300) == pytest.approx(float(np.exp(nll / scored)), rel=1e-12)

"""GPU targets built on a CPU-only host: `-e cuda|dml|webgpu` builds are gated on the very graph
that ships (run on this CPU), name their provider, and a device without it refuses them before
downloading. That they run on a real GPU is `bench/cuda_device.py`'s (README "GPU targets")."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.serving.runtime import ModelRuntime
from agent.wire.errors import ActivationError, ExitCode
from builder.build.package import verify_artifact
from builder.build.pipeline import DEFAULT_MAX_PPL_RATIO, BuildRequest, build_artifact
from testkit.artifacts import release_to_new_device, serving
from testkit.env import subprocess_env

# (precision, provider) -> what this host's CPU-only onnxruntime-genai says when asked for the provider.
TARGETS = {("int4", "cuda"): "Cuda interface not available",
           ("fp16", "dml"): "has not been built with DML support",
           ("int4", "webgpu"): "WebGPU execution provider is not supported in this build"}


@pytest.fixture(scope="module")
def gpu_builds(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory,
               builder_cache_dir: Path) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("gpu-builds")
    builds = {}
    for precision, provider in TARGETS:
        out = root / f"{precision}-{provider}"
        build_artifact(BuildRequest(source=str(tiny_hf), out_dir=out, name="tiny-gpu", precision=precision,
                                    execution_provider=provider, cache_dir=builder_cache_dir))
        builds[provider] = out
    yield builds


@pytest.mark.parametrize(("precision", "provider"), list(TARGETS))
def test_a_gpu_build_is_gated_here_on_the_graph_it_ships(precision: str, provider: str,
                                                         gpu_builds: dict[str, Path]) -> None:
    out = gpu_builds[provider]
    manifest = verify_artifact(out)
    assert (manifest.build.precision, manifest.build.execution_provider, manifest.build.profile) == (
        precision, provider, provider)
    assert manifest.requirements.execution_provider == provider and manifest.evaluation.measured_on == "cpu"
    assert manifest.evaluation.perplexity_ratio < DEFAULT_MAX_PPL_RATIO
    weights = sum(f.size for f in manifest.files if f.path.endswith((".onnx", ".onnx.data")))
    assert manifest.requirements.min_accelerator_memory_bytes > weights
    # The shipped config asks for the target provider: a device loads the model there or not at all.
    session = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert [list(p) for p in session["provider_options"]] == [[provider]]
    with pytest.raises(ActivationError, match=TARGETS[precision, provider]):
        ModelRuntime(out)
    # The same graph on this CPU replays the canary the gate recorded, token for token.
    runtime = ModelRuntime(out, providers=[], intra_op_num_threads=1)
    canary = manifest.evaluation.canary
    try:
        assert runtime.greedy_token_ids(canary.prompt, canary.max_new_tokens) == canary.expected_token_ids
    finally:
        runtime.close()


def test_a_cpu_device_refuses_a_cuda_release_before_downloading_it(gpu_builds: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    repo, state = release_to_new_device(tmp_path, gpu_builds["cuda"])
    with serving(repo.www_dir) as (url, faults):
        toml = tmp_path / "agent.toml"
        toml.write_text(f'device_id = "cpu-box"\nchannel = "stable"\nrepo_url = "{url}"\nstate_dir = "{state}"\n')
        done = subprocess.run([sys.executable, "-m", "agent.cli", "update", "--once", "--config", str(toml)],
                              env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == ExitCode.INCOMPATIBLE, done.stderr[-2000:]
    assert "needs the cuda execution provider, this device has cpu" in done.stderr
    assert not any("model.onnx" in path for path, _ in faults.requests)  # refused before any download
    assert not (state / "current").exists()

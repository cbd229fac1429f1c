"""builder.build.streamquant: onnxruntime-genai's builder quantizing weight by weight writes the very
files the stock builder writes (the runtime loads nothing new), and says that it streamed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from builder.build.ortbuild import run_ort_builder
from testkit.env import subprocess_env
from testkit.models import longrope_phi3_model


@pytest.fixture(scope="module")
def phi3_longrope(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_dir: Path) -> Path:
    """Phi-3's long/short rope: its graph holds an `If` with subgraphs, which the stock pass re-makes."""
    return longrope_phi3_model(tmp_path_factory.mktemp("phi3-longrope"), tokenizer_dir=smollm2_hf_dir)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# (source, precision, execution provider, extra options): the default recipe, INT8, and a CUDA
# (fp16) asymmetric build of a graph with subgraphs.
RECIPES = [
    ("tiny_hf", "int4", "cpu", {"block_size": "32", "accuracy_level": "4"}),
    ("tiny_hf", "int8", "cpu", {}),
    ("phi3_longrope", "int4", "cuda", {"is_symmetric": "false"}),
]


@pytest.mark.parametrize(("source", "precision", "provider", "extra"), RECIPES,
                         ids=["int4-cpu-b32", "int8-cpu", "int4-cuda-asymmetric-longrope"])
def test_streamed_quantization_writes_the_stock_builders_bytes(source: str, precision: str, provider: str,
                                                               extra: dict[str, str], request: pytest.FixtureRequest,
                                                               tmp_path: Path) -> None:
    hf: Path = request.getfixturevalue(source)
    stock, streamed, log = tmp_path / "stock", tmp_path / "streamed", tmp_path / "streamed.log"
    argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(stock),
            "-p", precision, "-e", provider, "-c", str(tmp_path / "cache")]
    if extra:
        argv += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    done = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    run_ort_builder(hf, streamed, precision=precision, execution_provider=provider, cache_dir=tmp_path / "cache",
                    extra_options=extra, log_path=log)

    assert "quantizing weight by weight while saving" in log.read_text()  # not the stock pass's fallback
    stock_files, streamed_files = _files(stock), _files(streamed)
    assert sorted(streamed_files) == sorted(stock_files)
    differing = [name for name in stock_files if stock_files[name] != streamed_files[name]]
    assert differing == []
    assert b"MatMulNBits" in streamed_files["model.onnx"]
    if source == "phi3_longrope":
        assert b"rope_caches_subgraph/If" in streamed_files["model.onnx"]

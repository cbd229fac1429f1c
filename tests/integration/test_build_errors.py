"""Bad input through the CLI: one clear line on stderr, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.wire.errors import ExitCode
from testkit.env import subprocess_env


def _build(source: str, out: Path, *extra: str, env: dict[str, str] | None = None,
           prefix: list[str] | None = None, **kw) -> subprocess.CompletedProcess[str]:
    cmd = [*(prefix or []), sys.executable, "-m", "builder.cli", "build", source, "-o", str(out), "--json", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or subprocess_env(), timeout=300, **kw)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("edge-builder: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert proc.stdout == ""


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_missing_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _build(str(tmp_path / "nope" / "model.gguf"), out, "-c", str(tmp_path / "cache"))
    _assert_one_line_error(proc, ExitCode.SOURCE_ERROR, "does not exist", "nope/model.gguf")
    _assert_nothing_written(out)


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    src = tmp_path / "notes"
    src.mkdir()
    (src / "readme.txt").write_text("not a model")
    out = tmp_path / "out"
    _assert_one_line_error(_build(str(src), out, "-c", str(tmp_path / "cache")), ExitCode.SOURCE_ERROR,
                           "is not a Hugging Face model (no config.json)")
    _assert_nothing_written(out)


def test_unsupported_architecture(tmp_path: Path) -> None:
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    (src / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    out = tmp_path / "out"
    _assert_one_line_error(_build(str(src), out, "-c", str(tmp_path / "cache")), ExitCode.SOURCE_ERROR,
                           "architecture BertForMaskedLM", "not supported", "LlamaForCausalLM")
    _assert_nothing_written(out)


def test_corrupt_gguf(tmp_path: Path) -> None:
    src = tmp_path / "model.gguf"
    src.write_bytes(b"PK\x03\x04" + os.urandom(4096))
    out = tmp_path / "out"
    _assert_one_line_error(_build(str(src), out, "-c", str(tmp_path / "cache")), ExitCode.SOURCE_ERROR,
                           "is not a GGUF file")
    _assert_nothing_written(out)


def test_truncated_gguf(tmp_path: Path) -> None:
    from builder.build.sources import smollm2_gguf_path

    src = tmp_path / "cut.gguf"
    with smollm2_gguf_path().open("rb") as f:
        src.write_bytes(f.read(2 * 2**20))  # a valid header, then the tensors stop
    out = tmp_path / "out"
    _assert_one_line_error(_build(str(src), out, "-c", str(tmp_path / "cache")), ExitCode.SOURCE_ERROR,
                           "cannot read GGUF", "cut.gguf")
    _assert_nothing_written(out)
    assert not list((tmp_path / "cache").glob("converted/*"))  # no half-converted cache entry either


def test_unwritable_output_dir(tmp_path: Path) -> None:
    prefix: list[str] = []
    if os.geteuid() == 0:
        # root ignores directory permissions: run the CLI as nobody so the kernel enforces them.
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): cannot drop to an unprivileged user")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # Directly under the system temp dir (world-traversable), not pytest's private 0700 tree.
    parent = Path(tempfile.mkdtemp(prefix="edgefleet-readonly-"))
    try:
        parent.chmod(0o555)
        out = parent / "out"
        proc = _build("smollm2-135m", out, "-c", str(tmp_path / "cache"), cwd="/", prefix=prefix)
        _assert_one_line_error(proc, ExitCode.USAGE, f"cannot write the output next to {out}", "Permission denied")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
        shutil.rmtree(parent)


def test_non_empty_out_without_manifest_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _assert_one_line_error(_build("smollm2-135m", out, "-c", str(tmp_path / "cache")), ExitCode.USAGE,
                           "non-empty folder without a manifest")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_invalid_precision_ep_combination_fails_before_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _build("smollm2-135m", out, "-p", "fp16", "-e", "cpu", "-c", str(tmp_path / "cache"))
    _assert_one_line_error(proc, ExitCode.USAGE, "precision fp16 is not supported on execution provider cpu",
                           "fp32/cpu")
    _assert_nothing_written(out)
    assert not (tmp_path / "cache").exists()


def test_hf_id_offline_and_not_cached_names_model_and_cache_dir(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = _build("edgefleet-test/not-cached-model", out, "-c", str(cache),
                  env=subprocess_env(HF_HUB_OFFLINE="1"))
    _assert_one_line_error(proc, ExitCode.SOURCE_ERROR, "model edgefleet-test/not-cached-model",
                           f"HF cache {cache / 'hf'}", "offline")
    _assert_nothing_written(out)


@pytest.mark.parametrize("flag", ["--version", "--max-ppl-ratio"])
def test_bad_numbers_are_usage_errors(tmp_path: Path, flag: str) -> None:
    proc = _build("smollm2-135m", tmp_path / "out", flag, "0")
    assert proc.returncode == ExitCode.USAGE
    assert "greater than 0" in proc.stderr and "Traceback" not in proc.stderr


def test_ort_builder_failure_shows_its_log_tail_and_keeps_the_log(tmp_path: Path, smollm2_hf_dir: Path) -> None:
    from testkit.models import make_tiny_model

    src = make_tiny_model("llama", tmp_path / "tiny", tokenizer_dir=smollm2_hf_dir)
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = _build(str(src), out, "-c", str(cache), "--extra-option", "kv_cache_quant_scheme=bogus")
    assert proc.returncode == ExitCode.FAILED
    first, *tail = proc.stderr.strip().splitlines()
    assert first.startswith("edge-builder: error: onnxruntime-genai model builder failed (exit 1)")
    assert any("bogus" in line for line in tail), proc.stderr  # the builder's own complaint, from its log
    assert "Traceback" not in first and len(tail) <= 8
    assert len(list((cache / "logs").glob("ortbuild-*.log"))) == 1  # the full log outlives the temp dir
    _assert_nothing_written(out)
    # The reference built beside was stopped: no builder left running, no half-made cache entry.
    assert subprocess.run(["pgrep", "-f", str(cache)], capture_output=True).returncode == 1
    assert not list((cache / "reference").glob(".*"))

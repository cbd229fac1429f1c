"""`edge-agent doctor` as a real process: refuses what does not fit, accepts what does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

from agent.cli.doctor import DoctorReport
from agent.wire.errors import ExitCode
from testkit.env import subprocess_env
from testkit.store import manifest_for, model_files


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", "doctor", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_doctor_cli_refuses_a_manifest_needing_too_much_ram(tmp_path: Path) -> None:
    need = psutil.virtual_memory().total * 4
    path = tmp_path / "manifest.json"
    path.write_text(manifest_for("phi3", 7, model_files(7), min_ram_bytes=need).model_dump_json())
    proc = _doctor("--manifest", str(path), "--state-dir", str(tmp_path), "--json", "--prefix-cache-mb", "0")
    assert proc.returncode == ExitCode.INCOMPATIBLE, proc.stderr
    doctor = DoctorReport.model_validate_json(proc.stdout)  # exactly one JSON object
    assert doctor.is_compatible is False and [s.kind for s in doctor.shortfalls] == ["ram"]
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("edge-agent: error:")]
    assert len(err_lines) == 1 and f"model phi3 v7 needs {need / 1024**3:.1f} GiB RAM" in err_lines[0]

    text = _doctor("--manifest", str(path), "--state-dir", str(tmp_path))
    assert text.returncode == ExitCode.INCOMPATIBLE and "CANNOT run here" in text.stdout
    assert "- ram: needs" in text.stdout


def test_doctor_counts_the_prefix_cache_with_the_models_ram(tmp_path: Path) -> None:
    """A model that fits this machine alone does not with a prefix cache as big as the machine."""
    path = tmp_path / "manifest.json"
    path.write_text(manifest_for("smollm2", 1, model_files(1)).model_dump_json())
    whole_ram_mb = psutil.virtual_memory().total >> 20
    proc = _doctor("--manifest", str(path), "--state-dir", str(tmp_path), "--json", "--prefix-cache-mb",
                   str(whole_ram_mb))
    assert proc.returncode == ExitCode.INCOMPATIBLE, proc.stderr
    doctor = DoctorReport.model_validate_json(proc.stdout)
    assert doctor.prefix_cache_bytes == whole_ram_mb << 20 and [s.kind for s in doctor.shortfalls] == ["ram"]
    assert "of the need is the prefix cache" in doctor.shortfalls[0].detail
    text = _doctor("--state-dir", str(tmp_path))
    assert "prefix cache         256.0 MiB (counted with a model's RAM)" in text.stdout


def test_doctor_cli_accepts_a_fitting_manifest_and_rejects_a_broken_one(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(manifest_for("smollm2", 1, model_files(1)).model_dump_json())
    proc = _doctor("--manifest", str(path), "--state-dir", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["is_compatible"] is True

    path.write_text('{"name": "x"}')
    proc = _doctor("--manifest", str(path), "--state-dir", str(tmp_path))
    assert proc.returncode == ExitCode.VERIFICATION_FAILED
    assert proc.stderr.strip().startswith(f"edge-agent: error: manifest {path} is not valid at")


def test_doctor_names_each_provider_it_refuses_and_why(tmp_path: Path) -> None:
    """This CPU wheel says WebGPU is "available" on any machine; the probe model cannot run on it here,
    and doctor says so in the runtime's words (and never lists it among the providers)."""
    text = _doctor("--state-dir", str(tmp_path))
    assert text.returncode == 0, text.stderr
    providers = next(line for line in text.stdout.splitlines() if line.startswith("onnxruntime-genai"))
    assert providers.endswith("(providers: cpu)")
    refused = [line.split(None, 2) for line in text.stdout.splitlines() if " refused " in line]
    (webgpu,) = [r for r in refused if r[:2] == ["webgpu", "refused"]]
    assert len(webgpu) == 3 and webgpu[2]  # the reason: no GPU here, or no WebGPU in this build
    report = json.loads(_doctor("--state-dir", str(tmp_path), "--json").stdout)["hardware"]
    assert report["execution_providers"] == ["cpu"] and report["accelerator_memory_bytes"] is None
    assert set(report["refused_execution_providers"]) >= {"webgpu"}

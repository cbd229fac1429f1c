"""deploy/install-device.sh into a temporary root (`--prefix`): a real venv with the
real agent, the service user, config, trust root and the enabled unit; run twice."""

from __future__ import annotations

import importlib.metadata
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from testkit.artifacts import new_repo
from testkit.env import REPO_ROOT
from testkit.wheels import make_wheel, renamed_wheel

SCRIPT = REPO_ROOT / "deploy" / "install-device.sh"


def _install(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(["bash", str(SCRIPT), "--prefix", str(prefix), "--python", sys.executable, *args],
                          capture_output=True, text=True, env=env, timeout=600, check=False)


def _config(path: Path, device_id: str) -> Path:
    path.write_text(f'device_id = "{device_id}"\nrepo_url = "http://127.0.0.1:8000"\nchannel = "stable"\n')
    return path


def test_install_into_a_prefix_is_complete_and_idempotent(tmp_path: Path) -> None:
    root_json = new_repo(tmp_path / "repo").metadata_dir / "root.json"
    prefix = tmp_path / "root"
    first = _install(prefix, "--root-json", str(root_json), "--config", str(_config(tmp_path / "a.toml", "box-1")))
    assert first.returncode == 0, first.stderr

    venv = prefix / "opt/edge-agent/venv"
    agent_cli = subprocess.run([str(venv / "bin/edge-agent"), "doctor", "--json", "--state-dir", str(tmp_path)],
                               capture_output=True, text=True, timeout=120, check=False)
    assert agent_cli.returncode == 0 and '"arch"' in agent_cli.stdout, agent_cli.stderr
    # The device venv has the agent's light dependencies only.
    no_torch = subprocess.run([str(venv / "bin/python"), "-c", "import torch"], capture_output=True, timeout=60)
    assert no_torch.returncode != 0

    passwd = (prefix / "etc/passwd").read_text().splitlines()
    assert [line.split(":")[0] for line in passwd].count("edge-agent") == 1
    assert (prefix / "etc/edge-agent/agent.toml").read_text() == (tmp_path / "a.toml").read_text()
    trust = prefix / "var/lib/edge-agent/trust/root.json"
    assert trust.read_bytes() == root_json.read_bytes()
    assert stat.S_IMODE((prefix / "var/lib/edge-agent").stat().st_mode) == 0o750
    unit = prefix / "etc/systemd/system/edge-agent.service"
    assert unit.read_text() == (REPO_ROOT / "systemd/edge-agent.service").read_text()
    wants = prefix / "etc/systemd/system/multi-user.target.wants/edge-agent.service"
    assert os.readlink(wants) == "/etc/systemd/system/edge-agent.service"

    # Second run: a new config and root are offered, but the device's own are kept.
    other_root = tmp_path / "other-root.json"
    other_root.write_text("{}")
    second = _install(prefix, "--root-json", str(other_root), "--config", str(_config(tmp_path / "b.toml", "box-2")))
    assert second.returncode == 0, second.stderr
    assert "user edge-agent exists" in second.stderr and "config kept" in second.stderr
    assert trust.read_bytes() == root_json.read_bytes()
    assert 'device_id = "box-1"' in (prefix / "etc/edge-agent/agent.toml").read_text()
    assert [line.split(":")[0] for line in (prefix / "etc/passwd").read_text().splitlines()].count("edge-agent") == 1

    # A bad config offered with --force-config names the key and replaces nothing.
    bad = tmp_path / "bad.toml"
    bad.write_text('device_id = "box-3"\nrepo_url = "http://x"\ncolour = "blue"\n')
    third = _install(prefix, "--config", str(bad), "--force-config")
    assert third.returncode != 0
    assert "colour" in third.stderr and "nothing was changed" in third.stderr
    assert 'device_id = "box-1"' in (prefix / "etc/edge-agent/agent.toml").read_text()


def test_first_install_needs_root_and_config(tmp_path: Path) -> None:
    result = _install(tmp_path / "root", "--config", str(_config(tmp_path / "a.toml", "box-1")))
    assert result.returncode != 0
    assert "first install needs --root-json" in result.stderr
    assert not (tmp_path / "root/opt").exists()  # refused before anything was installed


def test_cuda_install_swaps_the_cpu_runtime_for_the_cuda_one_and_stays_whole_when_run_again(
        tmp_path: Path) -> None:
    """`--cuda --cuda-wheels DIR` from an offline folder. FAKES, named as such: the "CUDA" wheels are
    this platform's CPU onnxruntime-genai and onnxruntime under the CUDA builds' names, and pip's
    CUDA libraries are empty wheels: the real ones weigh hundreds of MB and need a GPU to mean anything."""
    wheels = tmp_path / "wheels"
    cpu = tmp_path / "cpu"
    ort_version = importlib.metadata.version("onnxruntime")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "-d", str(cpu), "onnxruntime-genai==0.18.0", f"onnxruntime=={ort_version}"],
                   check=True, timeout=600)
    wheels.mkdir()
    (genai,) = cpu.glob("onnxruntime_genai-*.whl")
    (ort,) = cpu.glob("onnxruntime-*.whl")
    renamed_wheel(genai, "onnxruntime-genai-cuda", wheels, requirements={"onnxruntime": "onnxruntime-gpu"})
    renamed_wheel(ort, "onnxruntime-gpu", wheels)
    for name, version in (("nvidia-cuda-runtime", "13.0.0"), ("nvidia-cublas", "13.0.0"),
                          ("nvidia-cufft", "12.0.0"), ("nvidia-curand", "10.0.0")):
        make_wheel(wheels, name, version)

    root_json = new_repo(tmp_path / "repo").metadata_dir / "root.json"
    prefix = tmp_path / "root"
    venv = prefix / "opt/edge-agent/venv"
    config = _config(tmp_path / "a.toml", "gpu-1")
    for run in range(2):  # the second run reinstalls the CPU build as a dependency first
        done = _install(prefix, "--root-json", str(root_json), "--config", str(config), "--cuda",
                        "--cuda-wheels", str(wheels))
        assert done.returncode == 0, done.stderr
        assert "onnxruntime-genai-cuda 0.18.0 installed" in done.stderr
        dists = subprocess.run([str(venv / "bin/python"), "-m", "pip", "list", "--format=json"],
                               capture_output=True, text=True, timeout=120, check=True).stdout
        names = {d["name"].lower() for d in json.loads(dists)}
        assert {"onnxruntime-genai-cuda", "onnxruntime-gpu", "nvidia-cublas"} <= names, run
        assert not {"onnxruntime-genai", "onnxruntime"} & names, run
        doctor = subprocess.run([str(venv / "bin/edge-agent"), "doctor", "--json", "--state-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert doctor.returncode == 0, doctor.stderr
        hardware = json.loads(doctor.stdout)["hardware"]
        # The modules are whole (onnxruntime-genai loaded and ran the probe model on the CPU), and this
        # GPU-less machine is told why cuda is not among its providers.
        assert hardware["onnxruntime_genai_version"] == "0.18.0" and hardware["execution_providers"] == ["cpu"], run
        assert "no hardware" in hardware["refused_execution_providers"]["cuda"]

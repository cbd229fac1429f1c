"""deploy/install-device.sh into a temporary root (`--prefix`): a real venv with the
real agent, the service user, config, trust root and the enabled unit; run twice."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from testkit.artifacts import new_repo
from testkit.env import REPO_ROOT

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

"""systemd/edge-agent.service: `systemd-analyze verify` with zero output, and the keys we rely on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testkit.env import REPO_ROOT

UNIT = REPO_ROOT / "systemd" / "edge-agent.service"
REAL_BINARY = "/opt/edge-agent/venv/bin/edge-agent"


def _verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """verify checks that ExecStart's binary exists; point it at one that does,
    keeping every other key (and ExecStart's arguments) as in the real unit."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: run `make system-deps` (apt-get install systemd)")
    assert REAL_BINARY in text
    unit = tmp_path / "edge-agent.service"
    unit.write_text(text.replace(REAL_BINARY, shutil.which("true") or "/bin/true"))
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)


def _keys(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_unit_verifies_without_any_output(tmp_path: Path) -> None:
    result = _verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr


def test_verify_would_catch_a_bad_key(tmp_path: Path) -> None:
    """The check above is only worth something if verify speaks up about mistakes."""
    text = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomeDirs=yes")
    result = _verify(text, tmp_path)
    assert "Unknown key" in result.stderr and "ProtectHomeDirs" in result.stderr


def test_unit_has_the_contracted_settings() -> None:
    keys = _keys(UNIT.read_text())
    expected = {
        "Type": "notify", "Restart": "on-failure", "User": "edge-agent", "Group": "edge-agent",
        "StateDirectory": "edge-agent", "ConfigurationDirectory": "edge-agent", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/edge-agent",
    }
    for key, value in expected.items():
        assert keys.get(key) == [value], f"{key}: {keys.get(key)}"
    assert keys["ExecStart"] == [f"{REAL_BINARY} run --config /etc/edge-agent/agent.toml"]
    assert keys["WatchdogSec"][0].endswith("s") and "MemoryMax" in keys

"""An emulated aarch64 device for the tests: the builder's sandbox (a Debian arm64 root under
qemu-user, `builder.build.sandbox`) with the agent of this checkout, and edge-agent run in it.

EMULATION, named as such: the ARM kernels' numerics are real (qemu runs the aarch64 code),
their timings are not an ARM board's. The root is built once into the builder cache
(EDGEFLEET_TEST_CACHE keeps it between runs on one machine; CI builds it from nothing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builder.build.sandbox import Arm64Sandbox
from testkit.env import subprocess_env


@pytest.fixture(scope="session")
def arm64(builder_cache_dir: Path) -> Iterator[Arm64Sandbox]:
    sandbox = Arm64Sandbox(builder_cache_dir)
    sandbox.ensure()
    yield sandbox
    sandbox.unmount()


@dataclass(frozen=True)
class CliBuild:
    out: Path
    stderr: str  # the build's progress as a user sees it (empty when reused from EDGEFLEET_TEST_CACHE)


@pytest.fixture(scope="session")
def smollm2_mobile_arm(arm64: Arm64Sandbox, model_cache_dir: Path, builder_cache_dir: Path) -> CliBuild:
    """`edge-builder build smollm2-135m --profile mobile --check-arch aarch64` as smollm2 v2, through the
    CLI: the mobile build the builder's tests check and the ARM device's second release."""
    out = model_cache_dir / "smollm2-mobile-arm-v2"
    if (out / "manifest.json").is_file():
        return CliBuild(out, "")
    done = subprocess.run([sys.executable, "-m", "builder.cli", "build", "smollm2-135m", "-o", str(out), "--name",
                           "smollm2", "--version", "2", "--profile", "mobile", "--check-arch", "aarch64",
                           "-c", str(builder_cache_dir)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "", done.stdout  # without --json, all of it goes to stderr
    return CliBuild(out, done.stderr)


@dataclass
class ArmDevice:
    """An edge-agent provisioned inside the sandbox: its config and state live under `/srv/<name>`."""

    sandbox: Arm64Sandbox
    name: str
    repo_url: str

    @property
    def home(self) -> str:
        return f"/srv/{self.name}"

    @property
    def state_dir(self) -> Path:
        """The host path of the device's state dir."""
        return self.sandbox.path(f"{self.home}/state")

    def provision(self, root_json: Path) -> None:
        shutil.rmtree(self.sandbox.path(self.home), ignore_errors=True)
        (self.state_dir / "trust").mkdir(parents=True)
        shutil.copyfile(root_json, self.state_dir / "trust" / "root.json")
        self.sandbox.path(f"{self.home}/agent.toml").write_text(
            f'device_id = "{self.name}"\nrepo_url = "{self.repo_url}"\nstate_dir = "{self.home}/state"\n'
            'intra_op_num_threads = 1\n')

    def agent(self, *args: str, env: dict[str, str] | None = None,
              timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        """`edge-agent ARGS` on the device (the config is passed where a command takes one)."""
        config = ["--config", f"{self.home}/agent.toml"] if args and args[0] in ("update", "run") else []
        return self.sandbox.run(["-m", "agent.cli", "-v", *args, *config], env=env, timeout_s=timeout_s)

    def update_once(self, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Any]:
        done = self.agent("update", "--once", "--json", env=env)
        outcome = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else None
        return done, outcome

    def current(self) -> Path | None:
        """Where `current` points, as a path inside the sandbox."""
        link = self.state_dir / "current"
        if not link.is_symlink():
            return None
        return Path(f"{self.home}/state") / link.readlink()


_SWITCH = """
import asyncio, json, sys
from pathlib import Path
from agent.serving.host import ModelHost
from agent.wire.errors import ActivationError
from agent.wire.manifest import Canary

async def main():
    host = ModelHost(threads=1)
    try:
        await host.switch(Path(sys.argv[1]), canary=Canary.model_validate_json(sys.argv[2]))
        return None
    except ActivationError as e:
        return str(e)
    finally:
        await host.close()

print(json.dumps({"refused": asyncio.run(main())}))
"""


def switch_on_arm(sandbox: Arm64Sandbox, model_dir: Path, canary_json: str) -> str | None:
    """Load `model_dir` (a host path) in a model worker on the device, as a switch does, with the
    canary: None when the worker would serve, else why it was refused."""
    inside = "/tmp/edgefleet-switch"
    shutil.rmtree(sandbox.path(inside), ignore_errors=True)
    shutil.copytree(model_dir, sandbox.path(inside))
    try:
        done = sandbox.run(["-c", _SWITCH, inside, canary_json], timeout_s=600)
    finally:
        shutil.rmtree(sandbox.path(inside), ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    refused: str | None = json.loads(done.stdout.strip().splitlines()[-1])["refused"]
    return refused

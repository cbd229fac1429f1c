"""An aarch64 device on an x86 host: a Debian arm64 root run under qemu-user.

What it is for: running the agent, and onnxruntime-genai's ARM kernels, the way an ARM
board runs them, on the operator's machine (`edge-builder build --check-arch aarch64`)
and in the tests. The numerics are the ARM kernels' own (qemu executes the real aarch64
instructions); the timings are not an ARM board's.

Layout, under `<cache_dir>/sandbox/` (built once per machine, then reused):

```
bookworm-arm64/                Debian bookworm, minbase + python3 + libgomp1 (debootstrap's packages,
                               unpacked on the host: see `_debootstrap`)
bookworm-arm64/opt/edgefleet/  site/: the agent's dependencies as PyPI's aarch64 wheels (keyed
                               by the requirement list) and the agent package of this host
```

It needs root (debootstrap, chroot, mount) and Debian's `debootstrap`, `dpkg`, `qemu-user-static`
and `binfmt-support`. Only `/proc` is mounted inside: with the host's `/sys`, onnxruntime's
cpuinfo reads x86 topology as ARM and crashes, and without it the kernels still run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.wire.errors import BuildError, UsageError
from builder.build.locks import exclusive

log = logging.getLogger(__name__)

SUPPORTED_ARCHES = ("aarch64",)
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("EDGEFLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")
_PYTHON_VERSION = "3.11"  # bookworm's python3
_WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64")
_SITE = "opt/edgefleet/site"
_BINFMT = Path("/proc/sys/fs/binfmt_misc")
# Tool -> the Debian package that brings it.
_HOST_TOOLS = {"debootstrap": "debootstrap", "dpkg-deb": "dpkg", "qemu-aarch64-static": "qemu-user-static",
               "update-binfmts": "binfmt-support", "chroot": "coreutils"}


def agent_requirements() -> list[str]:
    """What the agent needs on a device: the installed distribution's requirements, no extras."""
    try:
        requires = importlib.metadata.requires("edgefleet") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise UsageError("edgefleet is not installed in this environment: pip install -e . first") from e
    return sorted(r for r in requires if "extra ==" not in r)


class Arm64Sandbox:
    """A Debian arm64 root under qemu-user. `ensure()` builds or refreshes it; `run()` runs in it."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = cache_dir / "sandbox" / f"{DEBIAN_SUITE}-arm64"
        self.site = self.root / _SITE

    # -- setup ---------------------------------------------------------------------------------
    def ensure(self) -> None:
        """Make the sandbox ready: host tools, binfmt, the Debian root, the wheels, this agent.

        Raises:
            UsageError: not root, or a host tool is missing (the message names the apt-get line).
            BuildError: debootstrap or pip failed (the message has the tail of their output).
        """
        if os.geteuid() != 0:
            raise UsageError("the aarch64 sandbox needs root (debootstrap, chroot, mount): run as root")
        missing = sorted({pkg for tool, pkg in _HOST_TOOLS.items() if shutil.which(tool) is None
                          and shutil.which(tool, path="/usr/sbin:/sbin") is None})
        if missing:
            raise UsageError(f"the aarch64 sandbox needs {', '.join(missing)}: apt-get install {' '.join(missing)}")
        _enable_binfmt()
        with exclusive(self.root):  # two builds or test workers setting it up at once
            if not (self.root / "usr/bin/python3").is_file():
                self._debootstrap()
            self._install_wheels()
            self._install_agent()
            self._mount_proc()

    def _debootstrap(self) -> None:
        partial = self.root.with_name(self.root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        log.info("event=sandbox_debootstrap root=%s mirror=%s", self.root, DEBIAN_MIRROR)
        _run_host(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3,libgomp1",
                   DEBIAN_SUITE, str(partial), DEBIAN_MIRROR], "debootstrap of the arm64 root", timeout_s=1800)
        # debootstrap's second stage would run every package's maintainer scripts under qemu (about 2
        # minutes on 2 cores). The agent needs none of them (no services, users or alternatives): the
        # packages it downloaded are unpacked on the host instead, in seconds.
        archives = partial / "var" / "cache" / "apt" / "archives"
        for deb in sorted(archives.glob("*.deb")):
            _run_host(["dpkg-deb", "--extract", str(deb), str(partial)], f"unpacking {deb.name}", timeout_s=300)
            deb.unlink()
        if not (partial / "usr" / "bin" / "python3").is_file():
            raise BuildError(f"debootstrap unpacked no python3 into {partial}: check the mirror {DEBIAN_MIRROR}")
        os.replace(partial, self.root)

    def _install_wheels(self) -> None:
        requirements = agent_requirements()
        key = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:16]
        stamp = self.site / f".wheels-{key}"
        if stamp.is_file():
            return
        shutil.rmtree(self.site, ignore_errors=True)
        self.site.mkdir(parents=True)
        platforms = [arg for p in _WHEEL_PLATFORMS for arg in ("--platform", p)]
        # The host's pip resolves for the device's platform: no compiler, no emulated pip.
        _run_host([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "--target", str(self.site), *platforms, "--implementation", "cp",
                   "--python-version", _PYTHON_VERSION, "--only-binary=:all:", *requirements],
                  "pip install of the agent's aarch64 wheels", timeout_s=1800)
        stamp.write_text("\n".join(requirements) + "\n")

    def _install_agent(self) -> None:
        """This host's `agent` package, copied afresh: the sandbox runs the code under test."""
        spec = importlib.util.find_spec("agent")  # found, not imported: the host side stays off the device code
        if spec is None or not spec.submodule_search_locations:
            raise UsageError("the agent package is not installed in this environment: pip install -e . first")
        source = Path(list(spec.submodule_search_locations)[0])
        target = self.site / "agent"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))

    def _mount_proc(self) -> None:
        proc = self.root / "proc"
        proc.mkdir(exist_ok=True)
        if not os.path.ismount(proc):
            _run_host(["mount", "-t", "proc", "proc", str(proc)], "mounting /proc in the sandbox", timeout_s=30)

    def unmount(self) -> None:
        proc = self.root / "proc"
        if os.path.ismount(proc):
            subprocess.run(["umount", "-l", str(proc)], check=False, capture_output=True)

    # -- use -----------------------------------------------------------------------------------
    def path(self, inside: str) -> Path:
        """The host path of `inside` (an absolute path in the sandbox)."""
        return self.root / inside.lstrip("/")

    def command(self, argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        """argv that runs `argv` (a program in the sandbox) with the agent importable."""
        variables = {"PYTHONPATH": f"/{_SITE}", "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root",
                     "LANG": "C.UTF-8", **(env or {})}
        return ["chroot", str(self.root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in variables.items()),
                *argv]

    def python(self, args: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
        return self.command(["/usr/bin/python3", *args], env)

    def canary_leads(self, model_dir: Path, prompt: str, token_ids: list[int]) -> list[float]:
        """The canary's teacher-forced leads of `model_dir` (a host path) on this sandbox's CPU.

        Raises:
            BuildError: the model does not load or run in the sandbox.
        """
        inside = f"/tmp/edgefleet-canary-{os.getpid()}"
        shutil.rmtree(self.path(inside), ignore_errors=True)
        shutil.copytree(model_dir, self.path(inside))
        code = ("import json, sys; from pathlib import Path; from agent.serving.runtime import ModelRuntime; "
                "args = json.loads(sys.argv[1]); "
                "runtime = ModelRuntime(Path(args['dir']), providers=[]); "  # the CPU, whatever the build's target
                "print(json.dumps(runtime.teacher_forced_leads(args['prompt'], args['ids'])))")
        try:
            done = self.run(["-c", code, json.dumps({"dir": inside, "prompt": prompt, "ids": token_ids})])
        finally:
            shutil.rmtree(self.path(inside), ignore_errors=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-10:])
            raise BuildError(f"the canary did not run in the aarch64 sandbox (exit {done.returncode}):\n{tail}")
        try:
            return [float(x) for x in json.loads(done.stdout.strip().splitlines()[-1])]
        except (ValueError, IndexError) as e:
            raise BuildError(f"the aarch64 sandbox printed no leads: {done.stdout[-300:]!r}") from e

    def run(self, args: Sequence[str], *, env: dict[str, str] | None = None,
            timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
        """Run the sandbox's python3 with `args`; output captured as text."""
        return subprocess.run(self.python(args, env), capture_output=True, text=True, timeout=timeout_s, check=False)


def _enable_binfmt() -> None:
    """Register qemu-aarch64 with the kernel (with F: the interpreter works inside a chroot)."""
    entry = _BINFMT / "qemu-aarch64"
    if entry.is_file() and entry.read_text().startswith("enabled"):
        return
    if not (_BINFMT / "register").exists():
        _run_host(["mount", "-t", "binfmt_misc", "binfmt_misc", str(_BINFMT)], "mounting binfmt_misc", timeout_s=30)
    _run_host(["update-binfmts", "--enable", "qemu-aarch64"], "enabling qemu-aarch64 in binfmt_misc", timeout_s=60)
    if not (entry.is_file() and entry.read_text().startswith("enabled")):
        raise UsageError("qemu-aarch64 is not registered with binfmt_misc after update-binfmts: install "
                         "qemu-user-static and binfmt-support, and run where binfmt_misc can be mounted")


def _run_host(argv: list[str], what: str, timeout_s: float) -> None:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"{what} took over {timeout_s:.0f} s: check the network and the mirror") from e
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise BuildError(f"{what} failed with exit code {done.returncode}:\n{tail}")

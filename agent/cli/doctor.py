"""`edge-agent doctor`: what this device has, and whether it can run a given manifest."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from agent.config import DEFAULT_STATE_DIR, ENV_PREFIX
from agent.serving.prefix_cache import DEFAULT_BUDGET_BYTES
from agent.system.hardware import probe
from agent.update.compat import HardwareReport, Shortfall, check_manifest, format_shortfalls, human_bytes
from agent.update.statemachine import ModelRef
from agent.wire.base import FrozenModel
from agent.wire.cli import HelpFormatter, print_json
from agent.wire.errors import ExitCode, IncompatibleModelError, ManifestError, UsageError
from agent.wire.manifest import Manifest

EXAMPLE = """example:
  edge-agent doctor --manifest artifacts/smollm2/manifest.json --state-dir /var/lib/edge-agent
"""


class DoctorReport(FrozenModel):
    """`edge-agent doctor --json`."""

    schema_version: Literal[1] = 1
    hardware: HardwareReport
    prefix_cache_bytes: int = 0  # KV the model worker may keep beyond the model, counted with its RAM
    model: ModelRef | None = None
    is_compatible: bool | None = None
    shortfalls: list[Shortfall] = []
    verdict: str | None = None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "doctor", help="probe this device; with --manifest, say whether it can run that model",
        description=__doc__, epilog=EXAMPLE + "\n" + ExitCode.help_text(), formatter_class=HelpFormatter)
    p.add_argument("--manifest", type=Path, metavar="FILE", default=None,
                   help="a model manifest.json to check this device against")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   default=Path(os.environ.get(f"{ENV_PREFIX}STATE_DIR", DEFAULT_STATE_DIR)),
                   help=f"the device store whose filesystem's free disk counts (env: {ENV_PREFIX}STATE_DIR)")
    p.add_argument("--disk-cap-bytes", type=int, metavar="BYTES", default=None,
                   help=f"also check the model fits the store's disk cap (env: {ENV_PREFIX}DISK_CAP_BYTES)")
    p.add_argument("--prefix-cache-mb", type=int, metavar="MB",
                   default=int(os.environ.get(f"{ENV_PREFIX}PREFIX_CACHE_MB", DEFAULT_BUDGET_BYTES >> 20)),
                   help="the agent's prefix cache (agent.toml prefix_cache_mb), counted with the model's RAM "
                        f"(env: {ENV_PREFIX}PREFIX_CACHE_MB)")
    p.add_argument("--json", action="store_true", help="print one JSON object (DoctorReport) to stdout")
    p.set_defaults(handler=run)


def _load_manifest(path: Path) -> Manifest:
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ManifestError(f"cannot read manifest {path}: {e.strerror or e}") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ManifestError(f"manifest {path} is not valid at {where}: {first['msg']}"
                            f" ({len(e.errors())} error(s) in all)") from e


def _print_text(report: DoctorReport) -> None:
    hw = report.hardware
    print(f"arch                 {hw.arch} ({hw.os})")
    print(f"cpu count            {hw.cpu_count}")
    print(f"cpu features         {', '.join(hw.cpu_features) or 'none of note'}")
    print(f"ram total/available  {human_bytes(hw.total_ram_bytes)} / {human_bytes(hw.available_ram_bytes)}")
    print(f"free disk            {human_bytes(hw.free_disk_bytes)} ({hw.state_dir})")
    print(f"onnxruntime-genai    {hw.onnxruntime_genai_version or 'not installed'}"
          f" (providers: {', '.join(hw.execution_providers) or 'none'})")
    for provider, why in sorted(hw.refused_execution_providers.items()):
        print(f"  {provider + ' refused':<19}{why}")
    if hw.accelerator_memory_bytes is not None:
        print(f"gpu memory           {human_bytes(hw.accelerator_memory_bytes)}")
    print(f"prefix cache         {human_bytes(report.prefix_cache_bytes)} (counted with a model's RAM)"
          if report.prefix_cache_bytes else "prefix cache         off")
    if report.model is not None:
        print(f"model {report.model}:  {'can run here' if report.is_compatible else 'CANNOT run here'}")
        for s in report.shortfalls:
            print(f"  - {s.kind}: {s.detail}: {s.remedy}")


def run(args: argparse.Namespace) -> int:
    disk_cap = args.disk_cap_bytes
    if disk_cap is None and os.environ.get(f"{ENV_PREFIX}DISK_CAP_BYTES"):
        disk_cap = int(os.environ[f"{ENV_PREFIX}DISK_CAP_BYTES"])
    if args.prefix_cache_mb < 0:
        raise UsageError(f"--prefix-cache-mb must be >= 0 (got {args.prefix_cache_mb})")
    cache_bytes = args.prefix_cache_mb << 20
    hardware = probe(args.state_dir)
    report = DoctorReport(hardware=hardware, prefix_cache_bytes=cache_bytes)
    if args.manifest is not None:
        manifest = _load_manifest(args.manifest)
        shortfalls = check_manifest(manifest, hardware, disk_cap, prefix_cache_bytes=cache_bytes)
        report = DoctorReport(
            hardware=hardware, prefix_cache_bytes=cache_bytes,
            model=ModelRef(name=manifest.name, version=manifest.version),
            is_compatible=not shortfalls, shortfalls=shortfalls,
            verdict=format_shortfalls(manifest.name, manifest.version, shortfalls) if shortfalls else "compatible")
    if args.json:
        print_json(report)
    else:
        _print_text(report)
    if report.is_compatible is False:
        raise IncompatibleModelError(report.verdict or "incompatible")
    return int(ExitCode.OK)

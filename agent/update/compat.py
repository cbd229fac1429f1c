"""Whether this device can run a model: a manifest's requirements against a hardware report.

Pure: values in, values out (the probe that fills a `HardwareReport` is the I/O shell
`agent.system.hardware`). Each check says exactly which requirement fails by how much, so
the checker refuses a model *before* anything is downloaded.

RAM is compared with the device's total RAM: `min_ram_bytes` is the peak RSS of the model
alone plus a margin, and a device whose total RAM is below it can never run the model.
Available RAM is reported too; it decides later whether old and new model fit side by side
during a switch (the serving layer's call).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from agent.wire.base import FrozenModel
from agent.wire.errors import IncompatibleModelError
from agent.wire.manifest import Manifest, Requirements

_GIB = 1024**3


class RuntimeProbe(FrozenModel):
    """The installed onnxruntime-genai and the execution providers that work with it here."""

    version: str | None
    execution_providers: list[str] = Field(default_factory=list)
    refused_execution_providers: dict[str, str] = Field(
        default_factory=dict, description="provider -> why it does not work here though it is built in")
    accelerator_memory_bytes: int | None = None


class HardwareReport(FrozenModel):
    """One probe of this device (`edge-agent doctor --json` prints it)."""

    schema_version: Literal[1] = 1
    total_ram_bytes: int = Field(ge=0)
    available_ram_bytes: int = Field(ge=0)
    state_dir: str
    free_disk_bytes: int = Field(ge=0, description="free bytes on the filesystem of the state dir")
    cpu_count: int = Field(ge=1)
    arch: str = Field(description="platform.machine()")
    cpu_features: list[str] = Field(description="the notable features present (see NOTABLE_FEATURES)")
    cpu_flags: list[str] = Field(description="every CPU flag the OS shows, with aliases added")
    onnxruntime_genai_version: str | None
    execution_providers: list[str] = Field(
        description="the providers that work here: built into onnxruntime-genai, their hardware present, and a"
        " model loaded and run on each (cpu, unless onnxruntime-genai is broken)")
    accelerator_memory_bytes: int | None = Field(
        default=None, ge=0, description="memory of the CUDA GPU the cuda provider runs on; None where unknown")
    refused_execution_providers: dict[str, str] = Field(
        default_factory=dict, description="provider -> why it does not work here though it is built in")
    os: str


ShortfallKind = Literal["ram", "disk", "arch", "cpu_features", "onnxruntime_genai_version", "execution_provider",
                        "accelerator_memory", "disk_cap"]


class Shortfall(FrozenModel):
    """One requirement this device does not meet."""

    kind: ShortfallKind
    required: str
    available: str
    short_by_bytes: int | None = None
    detail: str = Field(description="needs ..., this device has ...")
    remedy: str


# -- pure checks -------------------------------------------------------------------
def version_key(version: str) -> tuple[tuple[int, ...], int, str]:
    """A sort key for versions like 0.18.0, 0.18.0rc1, 0.18.0.dev20250101 (a pre-release sorts first).

    Raises:
        ValueError: the version does not start with a number.
    """
    m = re.match(r"^v?(\d+(?:\.\d+)*)(.*)$", version.strip())
    if not m:
        raise ValueError(f"version {version!r} does not start with a number")
    release = tuple(int(p) for p in m.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]  # 0.18 == 0.18.0
    suffix = m.group(2).lstrip(".-+")
    if suffix.startswith("post"):
        return release, 2, suffix
    return release, 0 if suffix else 1, suffix


def check_requirements(requirements: Requirements, report: HardwareReport,
                       prefix_cache_bytes: int = 0) -> list[Shortfall]:
    """Every requirement of a manifest this device does not meet; empty when it can run the model.
    `prefix_cache_bytes`: the KV this device's worker may keep beyond the model (`prefix_cache_mb`)."""
    out: list[Shortfall] = []
    other_channel = "move the device to another channel"
    needed_ram = requirements.min_ram_bytes + prefix_cache_bytes
    if report.total_ram_bytes < needed_ram:
        cache = f" ({human_bytes(prefix_cache_bytes)} of the need is the prefix cache)" if prefix_cache_bytes else ""
        out.append(Shortfall(
            kind="ram", required=str(needed_ram), available=str(report.total_ram_bytes),
            short_by_bytes=needed_ram - report.total_ram_bytes,
            detail=f"needs {human_bytes(needed_ram)} RAM, this device has {human_bytes(report.total_ram_bytes)}{cache}",
            remedy=(f"{'lower prefix_cache_mb, ' if prefix_cache_bytes else ''}publish a smaller build or "
                    f"{other_channel}")))
    if report.free_disk_bytes < requirements.min_free_disk_bytes:
        out.append(Shortfall(
            kind="disk", required=str(requirements.min_free_disk_bytes), available=str(report.free_disk_bytes),
            short_by_bytes=requirements.min_free_disk_bytes - report.free_disk_bytes,
            detail=(f"needs {human_bytes(requirements.min_free_disk_bytes)} free disk, this device has"
                    f" {human_bytes(report.free_disk_bytes)} free in {report.state_dir}"),
            remedy=f"free disk space, publish a smaller build or {other_channel}"))
    if report.arch not in requirements.arch:
        out.append(Shortfall(
            kind="arch", required=",".join(requirements.arch), available=report.arch,
            detail=f"is built for {', '.join(requirements.arch)}, this device is {report.arch}",
            remedy=f"publish a build for {report.arch} or {other_channel}"))
    flags = set(report.cpu_flags)
    missing = [f for f in requirements.cpu_features if f.lower() not in flags]
    if missing:
        out.append(Shortfall(
            kind="cpu_features", required=",".join(requirements.cpu_features), available=",".join(report.cpu_features),
            detail=f"needs CPU features {', '.join(missing)}, this device's CPU lacks them",
            remedy=f"publish a build that does not need them or {other_channel}"))
    out += _check_ort_version(requirements.min_onnxruntime_genai_version, report.onnxruntime_genai_version)
    if requirements.execution_provider not in report.execution_providers:
        out.append(Shortfall(
            kind="execution_provider", required=requirements.execution_provider,
            available=",".join(report.execution_providers) or "none",
            detail=(f"needs the {requirements.execution_provider} execution provider, this device has"
                    f" {', '.join(report.execution_providers) or 'none'}"),
            remedy=f"install onnxruntime-genai with {requirements.execution_provider} support or publish a cpu build"))
    needed, has = requirements.min_accelerator_memory_bytes, report.accelerator_memory_bytes
    if requirements.execution_provider != "cpu" and has is not None and has < needed:
        out.append(Shortfall(
            kind="accelerator_memory", required=str(needed), available=str(has), short_by_bytes=needed - has,
            detail=(f"needs {human_bytes(needed)} of {requirements.execution_provider} accelerator memory, this"
                    f" device's GPU has {human_bytes(has)}"),
            remedy=f"publish a smaller build (-p int4, a shorter --context-length) or {other_channel}"))
    return out


def _check_ort_version(required: str, installed: str | None) -> list[Shortfall]:
    def shortfall(detail: str) -> Shortfall:
        return Shortfall(kind="onnxruntime_genai_version", required=required, available=installed or "none",
                         detail=detail,
                         remedy=f"upgrade onnxruntime-genai on the device to {required} or later,"
                                " or publish a build made with the installed version")
    if installed is None:
        return [shortfall(f"needs onnxruntime-genai {required} or later, this device has none installed")]
    try:
        too_old = version_key(installed) < version_key(required)
    except ValueError as e:
        return [shortfall(f"needs onnxruntime-genai {required} or later and the versions cannot be compared: {e}")]
    if too_old:
        return [shortfall(f"needs onnxruntime-genai {required} or later, this device has {installed}")]
    return []


def check_disk_cap(manifest: Manifest, disk_cap_bytes: int) -> list[Shortfall]:
    """A model bigger than the store's whole cap can never be installed."""
    if manifest.total_file_bytes <= disk_cap_bytes:
        return []
    return [Shortfall(
        kind="disk_cap", required=str(manifest.total_file_bytes), available=str(disk_cap_bytes),
        short_by_bytes=manifest.total_file_bytes - disk_cap_bytes,
        detail=(f"has {human_bytes(manifest.total_file_bytes)} of files, the store's disk cap is"
                f" {human_bytes(disk_cap_bytes)}"),
        remedy="raise disk_cap_bytes (EDGE_AGENT_DISK_CAP_BYTES), publish a smaller build"
               " or move the device to another channel")]


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", _GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_store_room(disk_cap_bytes: int, protected_bytes: int, missing_bytes: int) -> list[Shortfall]:
    """Whether the new files fit under the cap next to what GC may not remove (current, previous, staging)."""
    if protected_bytes + missing_bytes <= disk_cap_bytes:
        return []
    return [Shortfall(
        kind="disk_cap", required=str(protected_bytes + missing_bytes), available=str(disk_cap_bytes),
        short_by_bytes=protected_bytes + missing_bytes - disk_cap_bytes,
        detail=(f"needs {human_bytes(missing_bytes)} more in the store, which keeps {human_bytes(protected_bytes)}"
                f" for the current and previous models under its cap of {human_bytes(disk_cap_bytes)}"),
        remedy="raise disk_cap_bytes (EDGE_AGENT_DISK_CAP_BYTES), publish a smaller build"
               " or move the device to another channel")]


def check_manifest(manifest: Manifest, report: HardwareReport, disk_cap_bytes: int | None = None,
                   *, protected_bytes: int = 0, missing_bytes: int | None = None,
                   prefix_cache_bytes: int = 0) -> list[Shortfall]:
    """All shortfalls: the requirements, and with a cap, whether the model fits the store.

    `protected_bytes` is what GC may not remove, `missing_bytes` what the update adds
    (files whose blob is not in the store yet); without them only the model's own size is checked.
    """
    out = check_requirements(manifest.requirements, report, prefix_cache_bytes)
    if disk_cap_bytes is not None:
        too_big = check_disk_cap(manifest, disk_cap_bytes)
        out += too_big
        if not too_big and missing_bytes is not None:
            out += check_store_room(disk_cap_bytes, protected_bytes, missing_bytes)
    return out


def format_shortfalls(name: str, version: int, shortfalls: list[Shortfall]) -> str:
    """One line in the house style: "model X vN needs ..., this device has ...: what to do"."""
    return "; ".join(f"model {name} v{version} {s.detail}: {s.remedy}" for s in shortfalls)


def raise_if_incompatible(manifest: Manifest, report: HardwareReport, disk_cap_bytes: int | None = None) -> None:
    """Raises:
        IncompatibleModelError: the device cannot run `manifest`; the message names every shortfall.
    """
    shortfalls = check_manifest(manifest, report, disk_cap_bytes)
    if shortfalls:
        raise IncompatibleModelError(format_shortfalls(manifest.name, manifest.version, shortfalls))

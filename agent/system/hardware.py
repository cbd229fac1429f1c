"""What this device has: RAM, disk, CPU architecture and features, onnxruntime-genai and its
execution providers (psutil, /proc/cpuinfo, package metadata).

`probe()` fills a `HardwareReport`; whether a model fits is the pure `agent.update.compat`.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.system.cudalibs import preload_pip_cuda_libraries
from agent.update.compat import HardwareReport, RuntimeProbe

# The distributions onnxruntime-genai ships as, and the execution provider each adds.
_ORT_GENAI_DISTS: dict[str, str | None] = {
    "onnxruntime-genai": None,
    "onnxruntime-genai-cuda": "cuda",
    "onnxruntime-genai-directml": "dml",
}
# Features that matter for INT4/INT8 kernels, shown by `doctor`; checks use every flag.
NOTABLE_FEATURES = ("avx2", "avx512", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8",
                    "neon", "asimd", "dotprod", "asimddp", "i8mm", "sve", "bf16")
# x86 and Arm names for one feature: a manifest may use either.
_ALIASES: dict[str, tuple[str, ...]] = {
    "asimd": ("neon",), "neon": ("asimd",),
    "asimddp": ("dotprod",), "dotprod": ("asimddp",),
    "avx512f": ("avx512",),
    "svei8mm": ("i8mm",),
}

log = logging.getLogger(__name__)


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo"), auxv: Path = Path("/proc/self/auxv"),
                   machine: str | None = None) -> set[str]:
    """CPU flags: on Arm the kernel's hardware capabilities (`AT_HWCAP`/`AT_HWCAP2`, what the
    kernels themselves test), else /proc/cpuinfo (`flags` on x86); empty where there is none.

    Arm reads the auxiliary vector because it is per process and always the truth for the code
    running: /proc/cpuinfo may describe another CPU (under qemu-user it is the host's).
    """
    if (machine or platform.machine()).lower() in ("aarch64", "arm64"):
        try:
            return add_aliases(parse_arm64_hwcaps(auxv.read_bytes()))
        except OSError:
            pass
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    return parse_cpu_flags(text)


# linux/arch/arm64/include/uapi/asm/hwcap.h: bit -> the name /proc/cpuinfo shows.
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_ARM64_HWCAP = {0: "fp", 1: "asimd", 3: "aes", 4: "pmull", 5: "sha1", 6: "sha2", 7: "crc32", 8: "atomics",
                9: "fphp", 10: "asimdhp", 12: "asimdrdm", 17: "sha3", 20: "asimddp", 21: "sha512", 22: "sve",
                23: "asimdfhm"}
_ARM64_HWCAP2 = {1: "sve2", 9: "svei8mm", 12: "svebf16", 13: "i8mm", 14: "bf16"}


def parse_arm64_hwcaps(auxv: bytes) -> set[str]:
    """The named arm64 features in a 64-bit little-endian auxiliary vector (/proc/self/auxv)."""
    entries = dict(struct.iter_unpack("<QQ", auxv[: len(auxv) - len(auxv) % 16]))
    hwcap, hwcap2 = entries.get(_AT_HWCAP, 0), entries.get(_AT_HWCAP2, 0)
    return ({name for bit, name in _ARM64_HWCAP.items() if hwcap >> bit & 1}
            | {name for bit, name in _ARM64_HWCAP2.items() if hwcap2 >> bit & 1})


def parse_cpu_flags(cpuinfo_text: str) -> set[str]:
    flags: set[str] = set()
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.lower().split())
    return add_aliases(flags)


def add_aliases(flags: set[str]) -> set[str]:
    out = set(flags)
    for flag in flags:
        out.update(_ALIASES.get(flag, ()))
    return out


def probe_onnxruntime_genai() -> RuntimeProbe:
    """The installed onnxruntime-genai version (package metadata) and the execution providers
    that work on this device: built into it, the hardware they drive present here, and a tiny
    bundled model loaded and run on each (onnxruntime-genai's `is_*_available()` only says
    support was compiled in: the CPU wheel says WebGPU on a machine without any GPU).
    """
    version: str | None = None
    compiled: set[str] = set()
    for dist, provider in _ORT_GENAI_DISTS.items():
        try:
            v = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        version = version or v
        compiled.add("cpu")
        if provider:
            compiled.add(provider)
    if version is not None and importlib.util.find_spec("onnxruntime_genai") is not None:
        try:
            # A light import (tens of ms; no model is loaded).
            import onnxruntime_genai as og

            for name in ACCELERATOR_PROVIDERS:
                if getattr(og, f"is_{name}_available", lambda: False)():
                    compiled.add(name)
        except (ImportError, OSError) as e:  # a broken install runs nothing
            log.warning("event=ort_genai_import_failed error=%r", str(e))
            return RuntimeProbe(version=version, refused_execution_providers={
                "cpu": f"onnxruntime-genai does not import ({e}): reinstall it"})
    with_hardware = usable_providers(compiled, DeviceEvidence.read())
    refused = {name: "onnxruntime-genai reports it, but this device shows no hardware for it"
               for name in sorted(compiled - with_hardware)}
    usable = set()
    for name in sorted(with_hardware):
        failure = provider_failure(name)  # cpu too: a broken install runs nothing
        if failure is None:
            usable.add(name)
        else:
            refused[name] = failure
            log.warning("event=execution_provider_refused provider=%s reason=%r", name, failure)
    return RuntimeProbe(version=version, execution_providers=sorted(usable), refused_execution_providers=refused,
                        accelerator_memory_bytes=nvidia_gpu_memory_bytes() if "cuda" in usable else None)


# A one-layer random llama (fp16, 64 tokens, 32 KB; `python -m builder.build.probemodel` makes it) that
# every provider can load: running one step on it proves the provider works, not just that it is built in.
PROVIDER_PROBE_MODEL = Path(__file__).with_name("provider_probe")


def provider_failure(provider: str, model_dir: Path = PROVIDER_PROBE_MODEL) -> str | None:
    """Why `provider` does not work here (its first line), or None when the bundled model runs on it."""
    if provider == "cuda":
        preload_pip_cuda_libraries()
    try:
        import onnxruntime_genai as og

        config = og.Config(str(model_dir))
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
        model = og.Model(config)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=8, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens([1, 5, 6])
        generator.generate_next_token()
        del generator, params, model
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai raises plain RuntimeError/OSError
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return None


def nvidia_gpu_memory_bytes() -> int | None:
    """Total memory of the first NVIDIA GPU (`nvidia-smi`, which ships with the driver); None if unknown."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split()[0]) * 1024 * 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# Providers that drive an accelerator, and so need one present to be usable.
ACCELERATOR_PROVIDERS = ("cuda", "dml", "webgpu", "qnn", "openvino")


@dataclass(frozen=True)
class DeviceEvidence:
    """What the OS shows of this device's accelerators."""

    system: str  # platform.system()
    machine: str  # platform.machine()
    has_nvidia_driver: bool
    has_gpu_render_node: bool  # a DRM render node: any GPU with a kernel driver (Vulkan, so WebGPU)
    has_qualcomm_dsp: bool  # FastRPC nodes of a Hexagon DSP/NPU
    has_intel_device: bool  # an Intel CPU, GPU or NPU (what OpenVINO runs on)

    @classmethod
    def read(cls) -> DeviceEvidence:
        def present(*patterns: str) -> bool:
            return any(glob.glob(p) for p in patterns)

        cpuinfo = Path("/proc/cpuinfo")
        try:
            is_intel_cpu = "GenuineIntel" in cpuinfo.read_text(errors="replace")
        except OSError:
            is_intel_cpu = False
        return cls(
            system=platform.system(),
            machine=platform.machine(),
            has_nvidia_driver=present("/proc/driver/nvidia/version", "/dev/nvidiactl"),
            has_gpu_render_node=present("/dev/dri/renderD*"),
            has_qualcomm_dsp=present("/dev/fastrpc-*", "/dev/adsprpc-smd"),
            has_intel_device=is_intel_cpu or present("/dev/accel/accel*"),
        )


def usable_providers(compiled: set[str], evidence: DeviceEvidence) -> set[str]:
    """The compiled-in providers whose hardware this device has (cpu needs none)."""
    on_linux = evidence.system == "Linux"
    has_hardware = {
        "cpu": True,
        "cuda": evidence.has_nvidia_driver or evidence.system == "Windows",
        "dml": evidence.system == "Windows",
        # Off Linux (Windows, macOS) every machine has a graphics adapter WebGPU can use.
        "webgpu": not on_linux or evidence.has_gpu_render_node or evidence.has_nvidia_driver,
        "qnn": evidence.has_qualcomm_dsp or (evidence.system == "Windows" and evidence.machine == "ARM64"),
        "openvino": evidence.has_intel_device,
    }
    return {p for p in compiled if has_hardware.get(p, False)}


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe(state_dir: Path, runtime: RuntimeProbe | None = None) -> HardwareReport:
    """Probe this device. `state_dir` need not exist yet (its nearest existing parent is measured).

    `runtime`: what `probe_onnxruntime_genai()` measured earlier; the daemon passes it so that
    its API process never imports onnxruntime-genai (~15 MB RSS).
    """
    mem = psutil.virtual_memory()
    flags = read_cpu_flags()
    runtime = runtime if runtime is not None else probe_onnxruntime_genai()
    return HardwareReport(
        total_ram_bytes=mem.total,
        available_ram_bytes=mem.available,
        state_dir=str(state_dir),
        free_disk_bytes=psutil.disk_usage(str(_existing_ancestor(state_dir))).free,
        cpu_count=os.cpu_count() or 1,
        arch=platform.machine(),
        cpu_features=sorted(f for f in NOTABLE_FEATURES if f in flags),
        cpu_flags=sorted(flags),
        onnxruntime_genai_version=runtime.version,
        execution_providers=runtime.execution_providers,
        accelerator_memory_bytes=runtime.accelerator_memory_bytes,
        refused_execution_providers=runtime.refused_execution_providers,
        os=f"{platform.system()} {platform.release()}",
    )


def probe_onnxruntime_genai_in_subprocess(timeout_s: float = 120.0) -> RuntimeProbe:
    """`probe_onnxruntime_genai()` run in a short-lived child process, so the caller's
    process does not keep onnxruntime's libraries (or a GPU context) mapped. Falls back to
    probing in-process."""
    import subprocess
    import sys

    code = "from agent.system.hardware import probe_onnxruntime_genai as p; print(p().model_dump_json())"
    from agent.system.childproc import python_child_env

    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                             env=python_child_env(), check=True).stdout
        return RuntimeProbe.model_validate_json(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        log.warning("event=ort_genai_probe_subprocess_failed error=%r: probing in-process", str(e))
        return probe_onnxruntime_genai()

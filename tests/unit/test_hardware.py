"""The hardware probe on this machine, requirement checks against it, and `edge-agent doctor`."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import struct
from pathlib import Path

import psutil
import pytest

from agent.system.cudalibs import pip_cuda_libraries
from agent.system.hardware import (
    DeviceEvidence,
    parse_cpu_flags,
    probe,
    provider_failure,
    read_cpu_flags,
    usable_providers,
)
from agent.update.compat import (
    HardwareReport,
    check_disk_cap,
    check_requirements,
    format_shortfalls,
    raise_if_incompatible,
    version_key,
)
from agent.wire.errors import IncompatibleModelError
from agent.wire.manifest import Requirements
from testkit.store import manifest_for, model_files, requirements

TIB = 1024**4


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> HardwareReport:
    return probe(tmp_path_factory.mktemp("state") / "not-yet-created")


def test_probe_is_sane_on_this_machine(report: HardwareReport) -> None:
    assert 0 < report.available_ram_bytes <= report.total_ram_bytes == psutil.virtual_memory().total
    assert report.free_disk_bytes > 0 and report.state_dir.endswith("not-yet-created")
    assert report.cpu_count == os.cpu_count()
    assert report.arch == platform.machine()
    assert report.onnxruntime_genai_version == importlib.metadata.version("onnxruntime-genai")
    assert "cpu" in report.execution_providers
    import onnxruntime_genai as og

    evidence = DeviceEvidence.read()
    # A provider is reported when it is compiled in, its hardware is here and the probe model runs on it.
    for provider in ("cuda", "webgpu"):
        compiled = getattr(og, f"is_{provider}_available")()
        has_hardware = usable_providers({provider}, evidence) == {provider}
        works = compiled and has_hardware and provider_failure(provider) is None
        assert (provider in report.execution_providers) == works
        assert (provider in report.refused_execution_providers) == (compiled and not works)
    assert set(report.cpu_features) <= set(report.cpu_flags)
    if report.arch == "x86_64":
        assert {"sse2", "fpu"} <= set(report.cpu_flags)
    HardwareReport.model_validate_json(report.model_dump_json())


def test_arm_cpuinfo_features_get_both_names() -> None:
    # /proc/cpuinfo of a Raspberry Pi 5 (Cortex-A76), one core.
    text = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics"
            " fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n")
    flags = parse_cpu_flags(text)
    assert {"asimd", "neon", "asimddp", "dotprod"} <= flags and "i8mm" not in flags


def test_this_machine_meets_modest_requirements(report: HardwareReport) -> None:
    assert check_requirements(Requirements.model_validate(requirements()), report) == []


def _req(**overrides: object) -> Requirements:
    return Requirements.model_validate(requirements(**overrides))


def test_ram_shortfall_says_by_how_much(report: HardwareReport) -> None:
    need = report.total_ram_bytes * 2
    [s] = check_requirements(_req(min_ram_bytes=need), report)
    assert s.kind == "ram" and s.short_by_bytes == need - report.total_ram_bytes
    msg = format_shortfalls("phi3", 7, [s])
    gib_have = f"{report.total_ram_bytes / 1024**3:.1f} GiB"
    assert msg == (f"model phi3 v7 needs {need / 1024**3:.1f} GiB RAM, this device has {gib_have}:"
                   " publish a smaller build or move the device to another channel")


def test_disk_shortfall(report: HardwareReport) -> None:
    [s] = check_requirements(_req(min_free_disk_bytes=report.free_disk_bytes + TIB), report)
    assert s.kind == "disk" and s.short_by_bytes == TIB and report.state_dir in s.detail


def test_foreign_arch(report: HardwareReport) -> None:
    [s] = check_requirements(_req(arch=["riscv64", "s390x"]), report)
    assert s.kind == "arch" and s.detail == f"is built for riscv64, s390x, this device is {report.arch}"


def test_missing_cpu_features_are_named(report: HardwareReport) -> None:
    present = report.cpu_flags[0]
    [s] = check_requirements(_req(cpu_features=[present, "sme2", "made_up_feature"]), report)
    assert s.kind == "cpu_features" and "sme2, made_up_feature" in s.detail and present not in s.detail


@pytest.mark.parametrize(("required", "is_ok"), [("0.18.0", True), ("0.18", True), ("0.17.9", True),
                                                  ("0.18.0rc1", True), ("0.18.1", False), ("0.19.0", False),
                                                  ("1.0", False), ("99.0.0", False)])
def test_onnxruntime_genai_version_is_compared_as_a_version(report: HardwareReport, required: str,
                                                             is_ok: bool) -> None:
    assert report.onnxruntime_genai_version == "0.18.0"
    shortfalls = check_requirements(_req(min_onnxruntime_genai_version=required), report)
    assert (shortfalls == []) is is_ok
    if not is_ok:
        assert shortfalls[0].detail == f"needs onnxruntime-genai {required} or later, this device has 0.18.0"


def test_version_key_orders_prereleases_first() -> None:
    assert version_key("0.9.0") < version_key("0.10.0") < version_key("0.10.1rc1") < version_key("0.10.1")
    assert version_key("0.10.1") < version_key("0.10.1.post1")
    with pytest.raises(ValueError, match="does not start with a number"):
        version_key("latest")


def test_missing_execution_provider(report: HardwareReport) -> None:
    if "dml" in report.execution_providers:
        pytest.skip("this machine has DirectML")
    [s] = check_requirements(_req(execution_provider="dml"), report)
    assert s.kind == "execution_provider" and s.detail.startswith("needs the dml execution provider")


def test_a_provider_counts_only_when_the_bundled_model_runs_on_it() -> None:
    assert provider_failure("cpu") is None
    # This CPU wheel says is_webgpu_available() on any machine, GPU or not; its onnxruntime has no WebGPU.
    import onnxruntime_genai as og

    assert og.is_webgpu_available()
    assert provider_failure("webgpu") == "WebGPU execution provider is not supported in this build."
    assert "not been built with DML support" in (provider_failure("dml") or "")
    assert "Cuda interface not available" in (provider_failure("cuda") or "")


def test_gpu_memory_short_of_a_gpu_builds_estimate(report: HardwareReport) -> None:
    gpu = report.model_copy(update={"execution_providers": [*report.execution_providers, "cuda"],
                                    "accelerator_memory_bytes": 4 * 1024**3})  # FAKE: a 4 GiB GPU
    needs = _req(execution_provider="cuda", min_accelerator_memory_bytes=6 * 1024**3)
    [s] = check_requirements(needs, gpu)
    assert s.kind == "accelerator_memory" and s.short_by_bytes == 2 * 1024**3
    assert s.detail == "needs 6.0 GiB of cuda accelerator memory, this device's GPU has 4.0 GiB"
    assert check_requirements(_req(execution_provider="cuda", min_accelerator_memory_bytes=4 * 1024**3), gpu) == []
    # Where the GPU's memory is unknown (DirectML, WebGPU), the canary at activation is the check.
    assert check_requirements(needs, gpu.model_copy(update={"accelerator_memory_bytes": None})) == []


def test_model_bigger_than_the_disk_cap() -> None:
    manifest = manifest_for("m", 3, model_files(3, size=5000))
    [s] = check_disk_cap(manifest, 4000)
    assert s.kind == "disk_cap" and s.short_by_bytes == manifest.total_file_bytes - 4000
    assert check_disk_cap(manifest, 10**6) == []


def test_raise_if_incompatible_names_every_shortfall(report: HardwareReport) -> None:
    manifest = manifest_for("phi3", 7, model_files(7), arch=["riscv64"], min_onnxruntime_genai_version="9.0")
    with pytest.raises(IncompatibleModelError) as e:
        raise_if_incompatible(manifest, report)
    assert str(e.value).count("model phi3 v7 ") == 2 and "riscv64" in str(e.value) and "9.0" in str(e.value)


_NONE = DeviceEvidence(system="Linux", machine="x86_64", has_nvidia_driver=False, has_gpu_render_node=False,
                       has_qualcomm_dsp=False, has_intel_device=False)
_ALL_COMPILED = {"cpu", "cuda", "dml", "webgpu", "qnn", "openvino"}


@pytest.mark.parametrize(("evidence", "usable"), [
    (_NONE, {"cpu"}),  # a headless Linux box: compiled-in accelerators are not usable
    (dataclasses.replace(_NONE, has_gpu_render_node=True), {"cpu", "webgpu"}),
    (dataclasses.replace(_NONE, has_nvidia_driver=True), {"cpu", "cuda", "webgpu"}),
    (dataclasses.replace(_NONE, has_qualcomm_dsp=True), {"cpu", "qnn"}),
    (dataclasses.replace(_NONE, has_intel_device=True), {"cpu", "openvino"}),
    (dataclasses.replace(_NONE, system="Windows"), {"cpu", "cuda", "dml", "webgpu"}),
    (dataclasses.replace(_NONE, system="Windows", machine="ARM64"),
     {"cpu", "cuda", "dml", "webgpu", "qnn"}),
])
def test_a_provider_is_usable_only_with_its_hardware(evidence: DeviceEvidence, usable: set[str]) -> None:
    assert usable_providers(_ALL_COMPILED, evidence) == usable
    assert usable_providers({"cpu"}, evidence) == {"cpu"}  # never more than is compiled in


def _auxv(hwcap: int, hwcap2: int) -> bytes:
    return struct.pack("<6Q", 16, hwcap, 26, hwcap2, 0, 0)


def test_arm64_features_come_from_the_kernels_hwcaps(tmp_path: Path) -> None:
    """What an aarch64 process is told (here the values qemu-user gives its emulated CPU), not
    /proc/cpuinfo, which under emulation describes the host."""
    auxv = tmp_path / "auxv"
    auxv.write_bytes(_auxv(0xECFFFFFB, 0x7F877FFF))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags : fpu avx2 avx512f\n")
    flags = read_cpu_flags(cpuinfo, auxv, machine="aarch64")
    assert {"asimd", "neon", "asimddp", "dotprod", "i8mm", "sve", "bf16"} <= flags
    assert "avx2" not in flags
    auxv.write_bytes(_auxv(0b11, 0))  # fp and asimd only: a Cortex-A53
    assert read_cpu_flags(cpuinfo, auxv, machine="aarch64") == {"fp", "asimd", "neon"}
    assert "avx2" in read_cpu_flags(cpuinfo, auxv, machine="x86_64")


def test_pip_cuda_libraries_are_found_in_both_wheel_layouts_and_loaded_in_dependency_order(tmp_path: Path) -> None:
    cu13 = tmp_path / "site-a" / "nvidia" / "cu13" / "lib"  # CUDA 13 wheels: one folder
    cu12 = tmp_path / "site-b" / "nvidia" / "cufft" / "lib"  # older wheels: one folder per library
    for folder, names in ((cu13, ["libcufft.so.12", "libcublas.so.13", "libcudart.so.13", "libcublasLt.so.13",
                                  "libcudart.so.13.0.96", "libnvrtc.so.13"]),
                          (cu12, ["libcurand.so.10"])):
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_bytes(b"")
    roots = [tmp_path / "site-a" / "nvidia", tmp_path / "site-b" / "nvidia"]
    assert [p.name for p in pip_cuda_libraries(roots)] == [
        "libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcufft.so.12"]
    assert pip_cuda_libraries([tmp_path / "nowhere"]) == []


def test_the_prefix_cache_counts_with_the_models_ram(report: HardwareReport) -> None:
    fits_alone = report.total_ram_bytes - (64 << 20)
    assert check_requirements(_req(min_ram_bytes=fits_alone), report) == []
    [s] = check_requirements(_req(min_ram_bytes=fits_alone), report, prefix_cache_bytes=256 << 20)
    assert s.kind == "ram" and s.short_by_bytes == 192 << 20
    assert s.detail.endswith("(256.0 MiB of the need is the prefix cache)")
    assert s.remedy.startswith("lower prefix_cache_mb")

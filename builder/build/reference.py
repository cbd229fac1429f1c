"""The quality gate's reference: which build of the source the built model is compared with, and
that build's perplexity, cached per source, precision and evaluation text.

The reference goes through the same ORT builder and runtime as the candidate, so the ratio
isolates what quantization costs. `auto` compares a model of up to FP32_REFERENCE_MAX_PARAMS
parameters with its FP32 build, a larger one with its INT8 build: an FP32 copy of a 3.8B model
(15.3 GB) does not fit a 16 GB build host, and INT8 sits close to FP32 (README "Builder").

The reference build needs nothing from the candidate's, so it runs beside it when this host's
memory holds both (`start_beside`): the ORT builder keeps about one core busy, and two builds on
two cores take little longer than one.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import psutil

from agent.wire.manifest import Precision, ReferencePrecision
from builder.build import evaluate, modelinfo
from builder.build.locks import atomic_dir, exclusive
from builder.build.ortbuild import run_ort_builder

log = logging.getLogger(__name__)

FP32_REFERENCE_MAX_PARAMS = 1 << 30  # 4 GiB of FP32 weights, about 1B parameters
# Peak RSS of a build, a little over what was measured (README "Builder"): a quantizing build
# streams its weights (Llama 1.1B 1.73 GB and Phi-3.5-mini 5.12 GB from 2.2 and 7.85 GB of bf16:
# about 0.41 GB + 0.60x; Llama 8B's shape, 4.92 GB from 14.76 GB, stays well under); an FP32 or
# FP16 one holds the model in FP32 (1.28x its FP32 bytes).
STREAMED_PEAK_BASE_BYTES = 512 << 20
STREAMED_PEAK_PER_WEIGHT_BYTE = 0.65
UNQUANTIZED_PEAK_PER_FP32_BYTE = 1.3


def precision_for(hf_dir: Path) -> ReferencePrecision:
    """`auto`'s choice for the model in `hf_dir`, by its parameter count (safetensors headers)."""
    return "fp32" if modelinfo.parameter_count(hf_dir) <= FP32_REFERENCE_MAX_PARAMS else "int8"


def build_peak_bytes(hf_dir: Path, precision: Precision) -> int:
    """What a build of `hf_dir` at `precision` is expected to peak at."""
    if precision in ("int4", "int8"):
        weight_bytes = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
        return STREAMED_PEAK_BASE_BYTES + int(STREAMED_PEAK_PER_WEIGHT_BYTE * weight_bytes)
    return int(UNQUANTIZED_PEAK_PER_FP32_BYTE * 4 * modelinfo.parameter_count(hf_dir))


def available_memory_bytes() -> int:
    """Memory this process may still take: the host's available memory (psutil, as the agent reads
    it), or less where its cgroup's limit leaves less."""
    available = int(psutil.virtual_memory().available)
    limit = _cgroup_memory_limit()
    if limit is not None:
        available = min(available, limit - int(psutil.Process().memory_info().rss))
    return max(0, available)


def own_memory_cgroup() -> tuple[Path, str] | None:
    """This process's memory cgroup folder and the name of its limit file (v1 or v2), None where
    there is none (not Linux, no memory controller)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folder, limit_file = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
        elif "memory" in controllers.split(","):
            folder, limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
        else:
            continue
        if (folder / limit_file).is_file():
            return folder, limit_file
    return None


class Reference:
    """The reference of one source at one precision: its cached perplexity, or the build (started
    beside the candidate's, or when asked for) and the measurement that make it."""

    def __init__(self, hf_dir: Path, source_sha256: str, cache_dir: Path, precision: ReferencePrecision,
                 log_path: Path) -> None:
        self.hf_dir, self.cache_dir, self.precision = hf_dir, cache_dir, precision
        self._log_path = log_path
        tag = "" if precision == "fp32" else f"{precision}-"  # fp32 keeps the key older caches hold
        self._ppl_key = f"{source_sha256[:16]}-{tag}w{{window}}-{evaluate.eval_text_sha256()[:12]}.ppl"
        self._build_dir = cache_dir / "reference" / f"{source_sha256[:16]}-{precision}"
        self._cancel = threading.Event()
        self._beside: threading.Thread | None = None
        self._beside_error: BaseException | None = None

    def start_beside(self, candidate_peak_bytes: int) -> bool:
        """Start the reference build in the background when it is still to be made and memory holds
        it beside a candidate build of `candidate_peak_bytes`; True if started."""
        measured = (self.cache_dir / "reference").glob(self._ppl_key.format(window="*"))
        if self._build_dir.exists() or any(measured):
            return False
        needed = candidate_peak_bytes + build_peak_bytes(self.hf_dir, self.precision)
        available = available_memory_bytes()
        if needed > available:
            log.info("event=reference_after_build needed=%d available=%d", needed, available)
            return False

        def build() -> None:
            try:
                self._build()
            except BaseException as e:  # re-raised in the build's own thread by perplexity()
                self._beside_error = e

        self._beside = threading.Thread(target=build, name="reference-build", daemon=True)
        self._beside.start()
        log.info("event=reference_beside_build needed=%d available=%d", needed, available)
        return True

    def perplexity(self, window: int) -> float:
        """The reference perplexity over `window`-token windows: cached, or measured on its build
        (waited for, or made now).

        Raises:
            BuildError: the reference build failed.
        """
        if self._beside is not None:
            self._beside.join()
            self._beside = None
            if self._beside_error is not None:
                raise self._beside_error
        ppl_file = self.cache_dir / "reference" / self._ppl_key.format(window=window)
        if ppl_file.is_file():
            return float(ppl_file.read_text())
        build_dir = self._build()
        with exclusive(ppl_file):  # one measurement, and no reader of a half-written file
            if ppl_file.is_file():
                return float(ppl_file.read_text())
            ppl, _ = evaluate.measure_perplexity(build_dir, window=window)
            tmp = ppl_file.with_name(f".{ppl_file.name}.tmp")
            tmp.write_text(repr(ppl))
            os.replace(tmp, ppl_file)
        return ppl

    def cancel(self) -> None:
        """Stop a build started beside (the candidate's build failed) and wait for it to end."""
        self._cancel.set()
        if self._beside is not None:
            self._beside.join()

    def _build(self) -> Path:
        return atomic_dir(self._build_dir, lambda tmp: run_ort_builder(
            self.hf_dir, tmp, precision=self.precision, execution_provider="cpu",
            cache_dir=self.cache_dir / "ort", log_path=self._log_path, cancel=self._cancel))


def _cgroup_memory_limit() -> int | None:
    """This process's memory cgroup limit, None when unlimited or unknown."""
    cgroup = own_memory_cgroup()
    if cgroup is None:
        return None
    try:
        text = (cgroup[0] / cgroup[1]).read_text().strip()
    except OSError:
        return None
    return int(text) if text != "max" and int(text) < 1 << 60 else None  # v1 writes "no limit" as a huge number

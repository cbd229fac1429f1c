"""The build pipeline: SOURCE -> checked, evaluated, packaged artifact in OUT.

`build_artifact(request) -> result` is the whole of `edge-builder build` minus
argument parsing. Crash safety: everything is written into a temp dir next to
OUT (same filesystem) and renamed into place as the last step, so OUT is
either absent, the previous content, or a complete artifact whose
manifest.json lists every file; a failed or killed build leaves at most a
`.NAME.partial-*` dir that the next build of the same OUT removes.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field

from agent.wire.base import FrozenModel
from agent.wire.canary import judge_leads
from agent.wire.contract import CONTRACTS_DIR
from agent.wire.durable import fsync_dir
from agent.wire.errors import BuildError, QualityGateError, UsageError
from agent.wire.genai_config import image_tag
from agent.wire.hashing import sha256_file
from agent.wire.manifest import (
    MANIFEST_FILENAME,
    BuildInfo,
    Canary,
    Evaluation,
    ExecutionProvider,
    ImageCanary,
    Manifest,
    ModelInfo,
    ModelName,
    Precision,
    ReferencePrecision,
    Requirements,
    SourceInfo,
)
from builder.build import contracts, evaluate, footprint, modelinfo, package, ready, sources
from builder.build import reference as gate_reference
from builder.build.locks import atomic_dir, exclusive
from builder.build.options import MOBILE_MAX_CONTEXT_LENGTH, BuildOptions, resolve_build_options
from builder.build.ortbuild import run_ort_builder, set_context_length
from builder.build.progress import NullProgress, Progress

log = logging.getLogger(__name__)

# From measurements on SmolLM2-135M (README "Builder"): int4 block 32 lands at
# ~1.10x the fp32 perplexity, block 128 at ~1.2x, int8 at ~1.0x. 1.5 passes
# every sane recipe with room for models that quantize worse, and fails a
# broken build (wrong scales, a bad checkpoint) that is off by far more.
DEFAULT_MAX_PPL_RATIO = 1.5
STAGES = 10
_PARTIAL_MARK = ".partial-"
# The names platform.machine() gives one instruction set on Linux, Windows and macOS.
_ARCH_NAMES = {"x86_64": ["x86_64", "AMD64"], "AMD64": ["x86_64", "AMD64"],
               "aarch64": ["aarch64", "arm64"], "arm64": ["aarch64", "arm64"]}


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_CACHE_DIR", Path.home() / ".cache" / "edgefleet"))


class BuildRequest(FrozenModel):
    """What to build; the CLI fills it from flags."""

    source: str
    out_dir: Path
    name: ModelName | None = None
    version: int = Field(default=1, gt=0)
    label: str = ""
    precision: Precision = "int4"
    execution_provider: ExecutionProvider = "cpu"
    profile: str | None = None
    block_size: int | None = None
    accuracy_level: int | None = None
    algo: str | None = None
    extra_options: dict[str, str] = Field(default_factory=dict)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    max_ppl_ratio: float = Field(default=DEFAULT_MAX_PPL_RATIO, gt=0)
    context_length: int | None = Field(default=None, gt=16)
    # Instruction sets to replay the canary on besides this host's (an emulated device each).
    check_arches: list[Literal["aarch64"]] = Field(default_factory=list)
    # Output contract files (`<name>.json`), put into the artifact and checked against the built model.
    contracts: list[Path] = Field(default_factory=list)
    # For a ready onnxruntime-genai folder: the model it was made from (an HF folder or id, a GGUF);
    # its FP32 build is the quality gate's reference.
    reference: str | None = None
    # The gate's reference: an FP32 build, or an INT8 one (about half FP32's size; its distance from
    # FP32: README "Builder"); auto: builder.build.reference.precision_for.
    reference_precision: ReferencePrecision | Literal["auto"] = "auto"


class BuildResult(FrozenModel):
    """The `--json` summary of a build."""

    schema_version: int = 1
    out_dir: str
    name: str
    version: int
    precision: str
    execution_provider: str
    profile: str
    is_reused: bool = Field(description="OUT already held this exact build; nothing was rebuilt")
    file_count: int
    total_file_bytes: int
    perplexity: float
    reference_perplexity: float
    perplexity_ratio: float
    max_perplexity_ratio: float
    reference_precision: str = Field(default="fp32", description="the precision of the reference build")
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    peak_rss_bytes: int
    min_ram_bytes: int
    min_accelerator_memory_bytes: int = 0
    context_length: int
    canary_token_ids: list[int]
    contracts: list[str] = Field(default_factory=list, description="the output contracts the artifact carries")
    duration_s: float
    stage_durations_s: dict[str, float]


def _result(out_dir: Path, m: Manifest, reused: bool, duration_s: float, stages: dict[str, float]) -> BuildResult:
    ev = m.evaluation
    return BuildResult(
        out_dir=str(out_dir), name=m.name, version=m.version, precision=m.build.precision,
        execution_provider=m.build.execution_provider, profile=m.build.profile, is_reused=reused,
        file_count=len(m.files), total_file_bytes=m.total_file_bytes, perplexity=ev.perplexity,
        reference_perplexity=ev.reference_perplexity, perplexity_ratio=ev.perplexity_ratio,
        max_perplexity_ratio=ev.max_perplexity_ratio, reference_precision=ev.reference_precision,
        decode_tokens_per_s=ev.decode_tokens_per_s,
        prefill_tokens_per_s=ev.prefill_tokens_per_s, peak_rss_bytes=ev.peak_rss_bytes,
        min_ram_bytes=m.requirements.min_ram_bytes,
        min_accelerator_memory_bytes=m.requirements.min_accelerator_memory_bytes,
        context_length=m.model_info.context_length,
        canary_token_ids=ev.canary.expected_token_ids, duration_s=duration_s, stage_durations_s=stages,
        contracts=sorted(Path(f.path).stem for f in m.files if f.path.startswith(f"{CONTRACTS_DIR}/")),
    )


def _is_same_build(m: Manifest, name: str, version: int, source_sha256: str, opts: BuildOptions,
                   context_length: int | None, made_from: str | None, reference_precision: str) -> bool:
    return (m.name == name and m.version == version and m.source.sha256 == source_sha256
            and m.build.precision == opts.precision and m.build.execution_provider == opts.execution_provider
            and m.build.profile == opts.profile and m.build.builder_options == opts.ort_extra_options
            and (context_length is None or m.model_info.context_length == context_length)
            and m.source.made_from == made_from and reference_precision in ("auto", m.evaluation.reference_precision))


def _check_out_dir(out_dir: Path) -> Manifest | None:
    """The manifest already in OUT (None when OUT is absent or empty).

    Raises:
        UsageError: OUT is a file, or a non-empty folder that is not an artifact.
    """
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise UsageError(f"output {out_dir} exists and is not a folder: choose another -o")
    if not any(out_dir.iterdir()):
        return None
    if not (out_dir / MANIFEST_FILENAME).is_file():
        raise UsageError(f"output {out_dir} is a non-empty folder without a manifest: choose another -o or empty it")
    return package.read_manifest(out_dir)


def _make_temp_dir(out_dir: Path) -> Path:
    """A temp dir next to OUT (same filesystem, so the final rename is atomic).

    Raises:
        UsageError: OUT's parent cannot be created or written.
    """
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{out_dir.name}{_PARTIAL_MARK}*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build of the same OUT
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_PARTIAL_MARK}", dir=parent))
    except OSError as e:
        raise UsageError(f"cannot write the output next to {out_dir}: {e.strerror or e}: "
                         "choose a writable -o") from e


def _hf_dir_for(resolved: sources.ResolvedSource, source_sha256: str, cache_dir: Path,
                progress: evaluate.Progress | None = None) -> Path:
    if resolved.kind != "gguf":
        return resolved.path
    from builder.build.convert import gguf_to_hf_dir

    return atomic_dir(cache_dir / "converted" / source_sha256[:16],
                       lambda tmp: gguf_to_hf_dir(resolved.path, tmp, progress))


def _versions() -> tuple[str, str, str]:
    import importlib.metadata as md

    def v(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "unknown"
    return v("onnxruntime-genai"), v("onnxruntime"), v("transformers")


def build_artifact(request: BuildRequest, progress: Progress | None = None) -> BuildResult:
    """Build, evaluate, gate and package `request.source` into `request.out_dir`, stage by stage.

    Raises:
        UsageError: a bad option combination or output dir (before any work).
        SourceError: the source is missing, not a model, or unsupported.
        BuildError: the ORT builder, evaluation or footprint probe failed.
        QualityGateError: perplexity ratio over `max_ppl_ratio`; nothing is packaged.
    """
    run = _Run(request, progress or NullProgress())
    with _output_lock(run.out_dir):
        return _build_artifact(request, run)


@contextmanager
def _output_lock(out_dir: Path) -> Iterator[None]:
    """Hold OUT's build lock: a second build of the same OUT waits, then reuses what the first made.

    Raises:
        UsageError: OUT's parent cannot be created or written.
    """
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir.parent, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as e:
        raise UsageError(f"cannot write the output next to {out_dir}: {e.strerror or e}: "
                         "choose a writable -o") from e
    with exclusive(out_dir, on_wait=lambda: log.warning("waiting for another build of %s to finish", out_dir)):
        yield


def _build_artifact(request: BuildRequest, run: _Run) -> BuildResult:
    with run.stage("check options and output"):
        contract_files = contracts.read_contract_files(request.contracts)
        opts, existing, work = _check_request(request, run.out_dir)
    ref: gate_reference.Reference | None = None
    try:
        with run.stage("resolve source"):
            source = _resolve_source(request, run.cache_dir)
            reference = _resolve_reference(request, source, run.cache_dir)
            if source.resolved.kind == "ort_genai":
                opts = ready.folder_options(source.resolved.path, request.source, precision=request.precision,
                                            execution_provider=request.execution_provider, unused={
                                                "--block-size": request.block_size,
                                                "--accuracy-level": request.accuracy_level, "--algo": request.algo,
                                                "--profile": request.profile,
                                                "--extra-option": request.extra_options or None})
            if existing is not None:
                return run.result(_reuse(existing, source, request, opts, run.out_dir, contract_files),
                                  is_reused=True)
        with run.stage("convert source"):
            hf_dir = _convert_source(reference, run.cache_dir, run.progress.update)
        reference_precision: ReferencePrecision = (gate_reference.precision_for(hf_dir)
                                                   if request.reference_precision == "auto"
                                                   else request.reference_precision)
        ref = gate_reference.Reference(hf_dir, reference.sha256, run.cache_dir, reference_precision,
                                       work / "reference.log")
        if source.resolved.kind == "ort_genai":
            with run.stage("copy the ready folder"):
                artifact = ready.copy_to_artifact(source.resolved.path, hf_dir, work / "artifact")
                if request.context_length is not None:
                    set_context_length(artifact, request.context_length)
                info = modelinfo.model_info(hf_dir, artifact)
        else:
            beside = ref.start_beside(gate_reference.build_peak_bytes(hf_dir, opts.precision))
            with run.stage(f"build {opts.precision} onnx" + (f" ({reference_precision} reference beside)"
                                                             if beside else "")):
                artifact, info = _build_onnx(hf_dir, work, opts, request.context_length, run.cache_dir)
        window = min(evaluate.PPL_WINDOW_TOKENS, info.context_length)
        with run.stage(f"evaluate {reference_precision} reference"):
            ref_ppl = ref.perplexity(window)
        with run.stage("evaluate built model"):
            measured = evaluate.measure_model(artifact, progress=run.progress.update)
            image_canary = _image_canary(artifact)
        for arch in request.check_arches:
            with run.stage(f"check canary on {arch}"):
                _check_canary_on(arch, artifact, measured, run.cache_dir)
        with run.stage("quality gate"):
            ratio = _quality_gate(source.name, opts, measured, ref_ppl, request.max_ppl_ratio, reference_precision)
        with run.stage("measure footprint"):
            fp = footprint.measure_footprint(artifact, info.context_length)
        if contract_files:
            with run.stage(f"check {len(contract_files)} contract(s)"):
                contracts.check_contracts(artifact, contracts.add_to_artifact(artifact, contract_files))
        with run.stage("package"):
            manifest = _package(artifact, request, source, opts, info, measured,
                                _Gate(ref_ppl, reference_precision, ratio), fp, image_canary)
        with run.stage("publish to output"):
            _publish(artifact, run.out_dir)
        log.info("event=build_done name=%s version=%s out=%s ratio=%.3f", source.name, request.version,
                 run.out_dir, ratio)
        return run.result(manifest, is_reused=False)
    finally:
        if ref is not None:
            ref.cancel()
        shutil.rmtree(work, ignore_errors=True)


class _Run:
    """One build's paths, progress and stage timings."""

    def __init__(self, request: BuildRequest, progress: Progress) -> None:
        self.progress = progress
        self.out_dir = request.out_dir.expanduser().absolute()
        self.cache_dir = request.cache_dir.expanduser().absolute()
        self.stages: dict[str, float] = {}
        self._started = time.monotonic()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0, ok = time.monotonic(), False
        with self.progress.stage(name):
            try:
                yield
                ok = True
            finally:
                self.stages[name] = round(time.monotonic() - t0, 2)
                log.info("event=build_stage stage=%s duration_s=%.2f ok=%s", name.replace(" ", "_"),
                         self.stages[name], ok)

    def result(self, manifest: Manifest, *, is_reused: bool) -> BuildResult:
        return _result(self.out_dir, manifest, is_reused, round(time.monotonic() - self._started, 2), self.stages)


@dataclass(frozen=True)
class _Source:
    resolved: sources.ResolvedSource
    name: str
    sha256: str


def _check_request(request: BuildRequest, out_dir: Path) -> tuple[BuildOptions, Manifest | None, Path]:
    """The options, what OUT already holds, and a temp dir next to OUT.

    Raises:
        UsageError: a bad option combination, or an output that cannot be used.
    """
    opts = resolve_build_options(
        precision=request.precision, execution_provider=request.execution_provider, profile=request.profile,
        block_size=request.block_size, accuracy_level=request.accuracy_level, algo=request.algo,
        extra_options=request.extra_options,
    )
    existing = _check_out_dir(out_dir)
    return opts, existing, _make_temp_dir(out_dir)


def _resolve_source(request: BuildRequest, cache_dir: Path) -> _Source:
    resolved = sources.resolve_source(request.source, cache_dir)
    return _Source(resolved=resolved, name=request.name or resolved.default_name,
                   sha256=sources.source_sha256(resolved.path))


def _resolve_reference(request: BuildRequest, source: _Source, cache_dir: Path) -> _Source:
    """What the reference is built from: the source itself, or a ready folder's `--reference`.

    Raises:
        UsageError: a ready folder without `--reference`, or `--reference` for a source that has weights.
        SourceError: the reference cannot be resolved.
    """
    if source.resolved.kind != "ort_genai":
        if request.reference is not None:
            raise UsageError(f"--reference is for a ready onnxruntime-genai folder; {request.source} is built from its"
                             " own weights, which are the reference: drop --reference")
        return source
    if request.reference is None:
        raise UsageError(f"{request.source} is a ready onnxruntime-genai folder: it brings no full-precision weights"
                         " for the quality gate's reference, so pass --reference with the model it was made from"
                         " (a Hugging Face folder or id, or a GGUF file)")
    resolved = sources.resolve_source(request.reference, cache_dir)
    if resolved.kind == "ort_genai":
        raise UsageError(f"--reference {request.reference} is itself an onnxruntime-genai folder: pass the model it"
                         " was made from")
    return _Source(resolved=resolved, name=resolved.default_name, sha256=sources.source_sha256(resolved.path))


def _reuse(existing: Manifest, source: _Source, request: BuildRequest, opts: BuildOptions, out_dir: Path,
           contract_files: dict[str, Path]) -> Manifest:
    """OUT already holds this exact build: verify it and reuse it.

    Raises:
        UsageError: OUT holds a different build (or other contracts).
        ManifestError: OUT's files no longer match its manifest.
    """
    held = {f.path: f.sha256 for f in existing.files if f.path.startswith(f"{CONTRACTS_DIR}/")}
    wanted = {f"{CONTRACTS_DIR}/{name}.json": sha256_file(path) for name, path in contract_files.items()}
    if not _is_same_build(existing, source.name, request.version, source.sha256, opts, request.context_length,
                          request.reference, request.reference_precision) \
            or held != wanted:
        raise UsageError(
            f"output {out_dir} already holds a different build ({existing.name} v{existing.version}, "
            f"{existing.build.precision}/{existing.build.profile}): choose another -o or remove it"
        )
    return package.verify_artifact(out_dir)


def source_hf_dir(source: str, cache_dir: Path) -> Path:
    """The Hugging Face folder a build of `source` reads: a GGUF converted once into the cache
    (where every later build of it finds it), a folder as it is.

    Raises:
        SourceError: the source cannot be resolved or converted.
    """
    resolved = sources.resolve_source(source, cache_dir)
    return _hf_dir_for(resolved, sources.source_sha256(resolved.path), cache_dir)


def _convert_source(source: _Source, cache_dir: Path, progress: evaluate.Progress | None = None) -> Path:
    hf_dir = _hf_dir_for(source.resolved, source.sha256, cache_dir, progress)
    sources.check_architecture(hf_dir)  # before minutes in the ORT builder
    return hf_dir


def _build_onnx(hf_dir: Path, work: Path, opts: BuildOptions, context_length: int | None,
                cache_dir: Path) -> tuple[Path, ModelInfo]:
    """onnxruntime-genai's builder into `work/artifact`, at the requested (or mobile) context length."""
    artifact = work / "artifact"
    log_path = work / "ortbuild.log"
    try:
        run_ort_builder(hf_dir, artifact, precision=opts.precision, execution_provider=opts.execution_provider,
                        cache_dir=cache_dir / "ort", extra_options=opts.ort_extra_options, log_path=log_path)
    except BuildError as e:
        # The temp dir goes away; the full log must not.
        kept = _keep_log(log_path, cache_dir)
        first, _, tail = str(e).partition("\n")
        raise BuildError(f"{first.rstrip(':')} (full log: {kept}):\n{tail}") from e
    if context_length is None and opts.profile == "mobile":
        native = modelinfo.model_info(hf_dir, artifact).context_length
        context_length = min(native, MOBILE_MAX_CONTEXT_LENGTH)
    if context_length is not None:
        set_context_length(artifact, context_length)
    return artifact, modelinfo.model_info(hf_dir, artifact)


def _quality_gate(name: str, opts: BuildOptions, measured: evaluate.Measurement, ref_ppl: float,
                  max_ppl_ratio: float, reference_precision: str = "fp32") -> float:
    """The perplexity ratio to the reference.

    Raises:
        QualityGateError: the ratio is over `max_ppl_ratio`.
    """
    ratio = evaluate.perplexity_ratio(measured.perplexity, ref_ppl)
    if ratio > max_ppl_ratio:
        raise QualityGateError(
            f"{name} {opts.precision} perplexity {measured.perplexity:.3f} is {ratio:.3f}x the {reference_precision} "
            f"reference {ref_ppl:.3f}, over --max-ppl-ratio {max_ppl_ratio}: try --block-size 32, "
            "--algo k_quant_last or -p int8; nothing was packaged"
        )
    return ratio


def _image_canary(artifact: Path) -> ImageCanary | None:
    """For a model that takes images: the canary picture copied into the artifact, and the canary
    measured on it; None for a text model."""
    tag = image_tag(artifact)
    if tag is None:
        return None
    (artifact / evaluate.CANARY_IMAGE_FILE).write_bytes(evaluate.canary_picture())
    measured = evaluate.measure_image_canary(artifact, tag)
    return ImageCanary(image_file=evaluate.CANARY_IMAGE_FILE, prompt=measured.prompt,
                       expected_token_ids=measured.token_ids, expected_leads=measured.leads)


class _Gate(NamedTuple):
    reference_perplexity: float
    reference_precision: ReferencePrecision
    ratio: float


def _package(artifact: Path, request: BuildRequest, source: _Source, opts: BuildOptions, info: ModelInfo,
             measured: evaluate.Measurement, gate: _Gate, fp: footprint.Footprint,
             image_canary: ImageCanary | None = None) -> Manifest:
    """The manifest of `artifact`, validated and written into it."""
    files = package.list_files(artifact)
    total = sum(f.size for f in files)
    og_v, ort_v, tf_v = _versions()
    manifest = Manifest(
        name=source.name, version=request.version, label=request.label,
        created_at=dt.datetime.now(dt.UTC),
        source=SourceInfo(kind=source.resolved.kind, reference=source.resolved.reference, sha256=source.sha256,
                          made_from=request.reference),
        build=BuildInfo(precision=opts.precision, execution_provider=opts.execution_provider,
                        profile=opts.profile, onnxruntime_genai_version=og_v, onnxruntime_version=ort_v,
                        transformers_version=tf_v, builder_options=opts.ort_extra_options),
        files=files,
        requirements=Requirements(
            min_ram_bytes=fp.min_ram_bytes, ram_margin_bytes=fp.ram_margin_bytes,
            min_free_disk_bytes=footprint.min_free_disk_bytes(total),
            arch=_checked_arches(request.check_arches),
            cpu_features=[], min_onnxruntime_genai_version=og_v,
            execution_provider=opts.execution_provider,
            min_accelerator_memory_bytes=(0 if opts.execution_provider == "cpu" else
                                          footprint.accelerator_memory_bytes(artifact, fp.context_length)),
        ),
        evaluation=Evaluation(
            perplexity=measured.perplexity, reference_perplexity=gate.reference_perplexity,
            perplexity_ratio=gate.ratio, max_perplexity_ratio=request.max_ppl_ratio,
            reference_precision=gate.reference_precision,
            eval_text_sha256=measured.eval_text_sha256,
            eval_tokens=measured.eval_tokens, decode_tokens_per_s=measured.decode_tokens_per_s,
            prefill_tokens_per_s=measured.prefill_tokens_per_s, peak_rss_bytes=fp.peak_rss_bytes,
            measured_on="cpu",  # every provider's graph is evaluated on this host's CPU (`evaluate.load_model`)
            canary=Canary(prompt=measured.canary_prompt, max_new_tokens=measured.canary_max_new_tokens,
                          expected_token_ids=measured.canary_token_ids, expected_leads=measured.canary_leads,
                          image=image_canary),
        ),
        model_info=info,
    )
    package.write_manifest(artifact, manifest)
    return manifest


def _checked_arches(extra: list[Literal["aarch64"]]) -> list[str]:
    """The architectures the canary ran on: this host's, and each one checked in a sandbox."""
    names: list[str] = []
    for arch in [platform.machine(), *extra]:
        names += [n for n in _ARCH_NAMES.get(arch, [arch]) if n not in names]
    return names


def _check_canary_on(arch: str, artifact: Path, measured: evaluate.Measurement, cache_dir: Path) -> None:
    """Replay the canary on `arch` (its real kernels, emulated): its leads must match this host's.

    Raises:
        QualityGateError: the canary moves more than a CPU difference explains there.
        UsageError, BuildError: the sandbox cannot be set up or run.
    """
    from builder.build.sandbox import Arm64Sandbox

    if platform.machine() in _ARCH_NAMES.get(arch, [arch]):
        return  # this host is that architecture: the canary just ran here
    sandbox = Arm64Sandbox(cache_dir)
    sandbox.ensure()
    leads = sandbox.canary_leads(artifact, measured.canary_prompt, measured.canary_token_ids)
    verdict = judge_leads(measured.canary_leads, leads)
    log.info("event=canary_checked arch=%s passed=%s worst_position=%d worst_change=%.3f", arch, verdict.passed,
             verdict.worst_position, verdict.worst_change)
    if not verdict.passed:
        raise QualityGateError(f"the canary on {arch} does not match this host's: {verdict.reason}; the build is"
                               f" fragile across CPUs: try --block-size 32 or -p int8, or ship it without {arch}")


def _publish(artifact: Path, out_dir: Path) -> None:
    """Rename the finished artifact onto OUT: the one step a reader of OUT can see.

    Raises:
        UsageError: another process filled OUT during the build.
    """
    if _check_out_dir(out_dir) is not None:  # someone else filled OUT meanwhile
        raise UsageError(f"output {out_dir} was filled by another process during the build: not replacing it")
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    os.rename(artifact, out_dir)
    fsync_dir(out_dir.parent)


def _keep_log(log_path: Path, cache_dir: Path) -> Path:
    """Copy the ORT builder log out of the temp dir before it is removed."""
    dest = cache_dir / "logs" / f"ortbuild-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}.log"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if log_path.is_file():
        shutil.copyfile(log_path, dest)
    log.info("event=ort_builder_failed log=%s", dest)
    return dest


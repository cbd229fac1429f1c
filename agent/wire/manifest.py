"""The model manifest (design section 3): the contract between builder and device.

The device defines what it accepts, so the model lives in `agent/` and the
builder imports it. On the device a manifest is only trusted after TUF has
verified its bytes; this model then rejects the shapes an attacker or a bug
could still produce (absolute paths, `..`, duplicates, negative sizes).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from agent.wire.base import FrozenModel
from agent.wire.paths import check_relative_path

MANIFEST_FILENAME = "manifest.json"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

Precision = Literal["int4", "int8", "fp16", "fp32"]
ExecutionProvider = Literal["cpu", "cuda", "dml", "webgpu"]
Profile = Literal["cpu", "mobile", "cuda", "dml", "webgpu"]
ReferencePrecision = Literal["fp32", "int8"]


def check_model_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-' "
            "and start with a letter or digit"
        )
    return name


def check_sha256(value: str) -> str:
    if not _SHA256_RE.match(value):
        raise ValueError(f"{value!r} is not a lowercase hex sha256 digest")
    return value


Sha256Hex = Annotated[str, AfterValidator(check_sha256)]
RelativePath = Annotated[str, AfterValidator(check_relative_path)]
ModelName = Annotated[str, AfterValidator(check_model_name)]


class SourceInfo(FrozenModel):
    kind: Literal["hf_id", "hf_dir", "gguf", "ort_genai"]  # ort_genai: a ready folder, packaged as it was
    reference: str = Field(min_length=1)
    sha256: Sha256Hex  # over the source files, sorted by relative path
    made_from: str | None = Field(  # left out when None, so older agents read every other manifest
        default=None, exclude_if=lambda v: v is None,
        description="a ready folder's --reference: the model it was made from, whose FP32 build the gate compared")


class BuildInfo(FrozenModel):
    precision: Precision
    execution_provider: ExecutionProvider
    profile: Profile
    onnxruntime_genai_version: str
    onnxruntime_version: str
    transformers_version: str
    builder_options: dict[str, str] = Field(default_factory=dict)


class ManifestFile(FrozenModel):
    path: RelativePath
    size: int = Field(ge=0)
    sha256: Sha256Hex


class Requirements(FrozenModel):
    min_ram_bytes: int = Field(ge=0)
    ram_margin_bytes: int = Field(ge=0, description="part of min_ram_bytes that is margin over the measured peak RSS")
    min_free_disk_bytes: int = Field(ge=0)
    arch: list[str] = Field(min_length=1, description="platform.machine() values, e.g. x86_64, aarch64")
    cpu_features: list[str] = Field(default_factory=list)
    min_onnxruntime_genai_version: str
    execution_provider: ExecutionProvider
    # Left out of a CPU build's manifest (exclude_if), which so stays readable by agents from before it.
    min_accelerator_memory_bytes: int = Field(
        default=0, ge=0, exclude_if=lambda v: v == 0,
        description="a GPU build's estimate of the accelerator memory it needs (weights and the KV cache at the"
        " context length, plus a margin); 0 for the CPU. The device's canary proves it at activation")


class ImageCanary(FrozenModel):
    """The canary of a model that takes images: a picture shipped in the artifact (a file of
    `files`, so verified with the rest) and a raw prompt whose image tag stands for it."""

    image_file: RelativePath
    prompt: str
    expected_token_ids: list[int] = Field(min_length=1)
    expected_leads: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_lead_per_token(self) -> ImageCanary:
        if len(self.expected_leads) != len(self.expected_token_ids):
            raise ValueError(f"image canary: expected_leads has {len(self.expected_leads)} values for "
                             f"{len(self.expected_token_ids)} expected tokens")
        return self


class Canary(FrozenModel):
    """The canary a device replays before it switches (the rule: `agent.wire.canary`)."""

    prompt: str
    max_new_tokens: int = Field(gt=0)
    expected_token_ids: list[int] = Field(min_length=1)
    # Per expected token, its logit's lead over the best other token on the build host, teacher
    # forced. Absent in manifests built before leads were recorded (and then not written out, so
    # such a manifest's bytes stay what they were).
    expected_leads: list[float] | None = Field(default=None, exclude_if=lambda leads: leads is None)
    # A model that takes images replays this one too (left out of a text model's manifest).
    image: ImageCanary | None = Field(default=None, exclude_if=lambda image: image is None)

    @model_validator(mode="after")
    def _one_lead_per_token(self) -> Canary:
        if self.expected_leads is not None and len(self.expected_leads) != len(self.expected_token_ids):
            raise ValueError(f"expected_leads has {len(self.expected_leads)} values for "
                             f"{len(self.expected_token_ids)} expected tokens")
        return self


class Evaluation(FrozenModel):
    perplexity: float = Field(gt=0)
    reference_perplexity: float = Field(gt=0)
    perplexity_ratio: float = Field(gt=0)
    max_perplexity_ratio: float = Field(gt=0)
    reference_precision: ReferencePrecision = Field(  # left out when fp32, like the GPU fields
        default="fp32", exclude_if=lambda v: v == "fp32",
        description="the precision of the source's build the perplexity was compared with")
    eval_text_sha256: Sha256Hex
    eval_tokens: int = Field(gt=0)
    decode_tokens_per_s: float = Field(ge=0)
    prefill_tokens_per_s: float = Field(ge=0)
    peak_rss_bytes: int = Field(ge=0)
    canary: Canary
    measured_on: ExecutionProvider = Field(  # left out when "cpu", like min_accelerator_memory_bytes
        default="cpu", exclude_if=lambda v: v == "cpu",
        description="the provider every figure here was measured on: the build host's CPU, for a GPU build too"
        " (its very graph runs there); a device replays the canary on its own provider")


class ModelInfo(FrozenModel):
    architecture: str
    parameter_count: int = Field(ge=0)
    context_length: int = Field(gt=0)
    vocab_size: int = Field(gt=0)


class Manifest(FrozenModel):
    schema_version: Literal[1] = 1
    name: ModelName
    version: int = Field(gt=0)
    label: str = ""
    created_at: dt.datetime
    source: SourceInfo
    build: BuildInfo
    files: list[ManifestFile] = Field(min_length=1)
    requirements: Requirements
    evaluation: Evaluation
    model_info: ModelInfo

    @model_validator(mode="after")
    def _files_are_unique(self) -> Manifest:
        # Case-folded so that two entries cannot collide on a case-insensitive filesystem.
        files: dict[str, str] = {}
        for f in self.files:
            if f.path.casefold() in files:
                raise ValueError(f"duplicate file path {f.path!r} in manifest")
            files[f.path.casefold()] = f.path
        if MANIFEST_FILENAME in files:
            raise ValueError(f"{MANIFEST_FILENAME} must not list itself")
        # A file cannot also be a directory of another file (`a` and `a/b`): no model dir could hold both.
        for key, path in files.items():
            parts = key.split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if parent in files or parent == MANIFEST_FILENAME:
                    raise ValueError(f"file path {files.get(parent, MANIFEST_FILENAME)!r} is also a directory "
                                     f"of {path!r} in manifest")
        image = self.evaluation.canary.image
        if image is not None and image.image_file not in {f.path for f in self.files}:
            raise ValueError(f"the image canary's picture {image.image_file!r} is not one of the manifest's files")
        return self

    @property
    def total_file_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> ManifestFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def target_prefix(self) -> str:
        """The TUF target path prefix of this model version (design section 2)."""
        return f"models/{self.name}/{self.version}"

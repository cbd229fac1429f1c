"""A ready onnxruntime-genai folder as the source: no rebuild, the same gate.

The folder (a model's own export script's output, a vendor's published ONNX folder) already
holds what the runtime loads: `genai_config.json`, the ONNX graph and weights, the tokenizer.
It is copied as it is; what a build would have chosen is read from it (the precision from the
graph's weights, the provider from its config). It brings no full-precision weights, so the
quality gate's reference comes from `--reference`: the model it was made from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from agent.wire.errors import ActivationError, SourceError, UsageError
from agent.wire.loadcheck import GENAI_CONFIG, check_model_dir
from agent.wire.manifest import ExecutionProvider, Precision
from builder.build.options import BuildOptions

_PROVIDERS: dict[str, ExecutionProvider] = {"cuda": "cuda", "dml": "dml", "webgpu": "webgpu"}
# onnx.TensorProto data types of float weights.
_FLOAT16, _FLOAT32, _BFLOAT16 = 10, 1, 16


def is_ready_folder(path: Path) -> bool:
    return path.is_dir() and (path / GENAI_CONFIG).is_file()


def check_ready_folder(path: Path) -> None:
    """Raises:
        SourceError: the config does not parse, or the folder would make onnxruntime open a file
            outside itself, a custom operator library or a profile (`agent.wire.loadcheck`).
    """
    try:
        check_model_dir(path)
    except ActivationError as e:
        raise SourceError(f"ready folder {path} cannot be shipped: {e}") from e
    config = _config(path)
    if not isinstance(config.get("model"), dict) or "decoder" not in config["model"]:
        raise SourceError(f"{path / GENAI_CONFIG} has no model.decoder: it is not an onnxruntime-genai model")


def _config(path: Path) -> dict:
    try:
        config = json.loads((path / GENAI_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{path / GENAI_CONFIG} is not readable JSON ({e})") from e
    if not isinstance(config, dict):
        raise SourceError(f"{path / GENAI_CONFIG} is not a JSON object")
    return config


def provider_of(path: Path) -> ExecutionProvider:
    """The provider the folder's config asks for first (cpu when none)."""
    options = _config(path)["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    for entry in options:
        for name in entry:
            if name in _PROVIDERS:
                return _PROVIDERS[name]
            raise SourceError(f"{path / GENAI_CONFIG} asks for the {name} provider, which edgefleet does not ship")
    return "cpu"


def precision_of(path: Path) -> Precision:
    """int4/int8 when the decoder's MatMuls are MatMulNBits of that width, else the float type of
    its largest initializer (fp16 or fp32)."""
    import onnx

    filename = _config(path)["model"]["decoder"]["filename"]
    model = onnx.load(str(path / filename), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            if bits in (4, 8):
                return "int4" if bits == 4 else "int8"
            raise SourceError(f"{path / filename} quantizes to {bits} bits: only 4 and 8 ship")

    def size(t: onnx.TensorProto) -> int:
        count = 1
        for d in t.dims:
            count *= d
        return count

    floats = [t for t in model.graph.initializer if t.data_type in (_FLOAT16, _FLOAT32, _BFLOAT16)]
    if not floats:
        raise SourceError(f"{path / filename} has no float or MatMulNBits weights: cannot tell its precision")
    largest = max(floats, key=size)
    if largest.data_type == _BFLOAT16:
        raise SourceError(f"{path / filename} keeps its weights in bf16, which no manifest precision names")
    return "fp16" if largest.data_type == _FLOAT16 else "fp32"


def check_matches_reference(path: Path, reference_hf_dir: Path) -> None:
    """The reference must be the same model: the same vocabulary at least.

    Raises:
        SourceError: the vocabulary sizes differ.
    """
    vocab = _config(path)["model"].get("vocab_size")
    reference = json.loads((reference_hf_dir / "config.json").read_text()).get("vocab_size")
    if vocab is not None and reference is not None and int(vocab) != int(reference):
        raise SourceError(f"the ready folder's vocabulary ({vocab} tokens) is not its --reference's ({reference}):"
                          " pass the model the folder was made from")


def folder_options(path: Path, source: str, *, precision: str, execution_provider: str,
                   unused: dict[str, object]) -> BuildOptions:
    """The folder's precision and provider, read from it; build flags that would change them refused
    (`precision`/`execution_provider` at their defaults, int4 and cpu, ask for nothing; `unused`:
    the quantization flags, flag -> value, None when not given).

    Raises:
        UsageError: a flag asks for something other than what the folder is.
    """
    found_precision, found_provider = precision_of(path), provider_of(path)
    for flag, value, default, found in (("-p", precision, "int4", found_precision),
                                         ("-e", execution_provider, "cpu", found_provider)):
        if value not in (default, found):
            raise UsageError(f"{source} is a ready {found_precision}/{found_provider} folder: {flag} {value} would"
                             " need a rebuild; build from the model's own weights instead")
    given = [flag for flag, value in unused.items() if value is not None]
    if given:
        raise UsageError(f"{source} is already built: {', '.join(given)} does not apply")
    return BuildOptions(precision=found_precision, execution_provider=found_provider, profile=found_provider,
                        ort_extra_options={})


def copy_to_artifact(path: Path, reference_hf_dir: Path, artifact: Path) -> Path:
    """The folder, checked against its reference, copied into `artifact` (returned)."""
    check_matches_reference(path, reference_hf_dir)
    copy_folder(path, artifact)
    return artifact


def copy_folder(path: Path, out: Path) -> None:
    """The folder's regular files into `out` (symlinks followed, hidden entries skipped).

    Raises:
        SourceError: it holds something other than files and folders.
    """
    for item in sorted(path.rglob("*")):
        rel = item.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        target = out / rel
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif item.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item, target)
        else:
            raise SourceError(f"{item} is neither a file nor a folder: a model folder holds only those")

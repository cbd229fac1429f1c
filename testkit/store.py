"""Helpers for store/updater tests: small real artifacts (manifest + files) on disk."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from agent.store.store import Store
from agent.wire.channel import ChannelFile
from agent.wire.manifest import MANIFEST_FILENAME, Manifest

SHA = "a" * 64


def requirements(**overrides: Any) -> dict[str, Any]:
    """Requirements this machine meets; override one field to make it fail."""
    req: dict[str, Any] = {
        "min_ram_bytes": 64 * 1024**2, "ram_margin_bytes": 16 * 1024**2, "min_free_disk_bytes": 1024**2,
        "arch": [platform.machine()], "cpu_features": [], "min_onnxruntime_genai_version": "0.18.0",
        "execution_provider": "cpu",
    }
    req.update(overrides)
    return req


def manifest_for(name: str, version: int, files: dict[str, bytes], **req_overrides: Any) -> Manifest:
    return Manifest.model_validate({
        "schema_version": 1, "name": name, "version": version, "label": f"test {name} v{version}",
        "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC).isoformat(),
        "source": {"kind": "gguf", "reference": "test.gguf", "sha256": SHA},
        "build": {"precision": "int4", "execution_provider": "cpu", "profile": "cpu",
                  "onnxruntime_genai_version": "0.18.0", "onnxruntime_version": "1.22",
                  "transformers_version": "5.0", "builder_options": {}},
        "files": [{"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in files.items()],
        "requirements": requirements(**req_overrides),
        "evaluation": {"perplexity": 10.0, "reference_perplexity": 9.0, "perplexity_ratio": 1.11,
                       "max_perplexity_ratio": 1.5, "eval_text_sha256": SHA, "eval_tokens": 1000,
                       "decode_tokens_per_s": 1.0, "prefill_tokens_per_s": 1.0, "peak_rss_bytes": 1,
                       "canary": {"prompt": "hi", "max_new_tokens": 2, "expected_token_ids": [1, 2]}},
        "model_info": {"architecture": "llama", "parameter_count": 1, "context_length": 8, "vocab_size": 8},
    })


def model_files(version: int, size: int = 4096, shared: bytes | None = None) -> dict[str, bytes]:
    """A small model: a genai_config.json, a unique weights file and optionally a shared tokenizer."""
    files = {
        "genai_config.json": json.dumps({"model": {"type": "llama", "version": version}}).encode(),
        "model.onnx.data": bytes([version % 251]) * size,
    }
    if shared is not None:
        files["tokenizer.json"] = shared
    return files


def write_artifact(repo: Path, manifest: Manifest, files: dict[str, bytes]) -> Path:
    """Lay out an artifact the way the TUF target paths name it: repo/models/<name>/<version>/."""
    out = repo / manifest.target_prefix()
    if out.exists():
        shutil.rmtree(out)
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    (out / MANIFEST_FILENAME).write_bytes(manifest.model_dump_json(indent=1).encode())
    return out


def publish_channel(repo: Path, channel: str, name: str, version: int, allow_downgrade: bool = False) -> None:
    path = repo / "channels" / f"{channel}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ChannelFile(channel=channel, model=name, version=version,
                                allow_downgrade=allow_downgrade).model_dump_json())


def adopt_files(store: Store, manifest: Manifest, files: dict[str, bytes]) -> None:
    """Adopt the files as blobs, as a verified download would."""
    store.ensure_layout()
    for f in manifest.files:
        if not store.has_blob(f.sha256):
            staged = store.staging_file(f"{f.sha256}.part")
            staged.write_bytes(files[f.path])
            store.adopt_blob(staged, f.sha256)


def install(store: Store, manifest: Manifest, files: dict[str, bytes]) -> Path:
    """Adopt the files as blobs and assemble the model dir."""
    adopt_files(store, manifest, files)
    return store.assemble_model(manifest, manifest.model_dump_json(indent=1).encode())


def hardlinked_twin(model_dir: Path, dest: Path) -> Path:
    """`dest`, a second model dir with the same files as `model_dir` (hard links): two
    "versions" to switch between without copying the weights."""
    dest.mkdir()
    for f in model_dir.iterdir():
        if f.is_file():
            os.link(f, dest / f.name)
    return dest

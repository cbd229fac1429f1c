"""Benchmark: onnxruntime-genai's builder against ours (builder.build.streamquant) on models of the
sizes people ship, side by side in one run: wall time and peak RSS of each, and whether their files
are the same bytes.

The models are random weights in real shapes, made from configs in bf16 (no download) and kept in
--models-dir: Llama 1.1B (TinyLlama's shape), Phi-3.5-mini (3.8B, long/short rope), Llama 8B.
All use SmolLM2's tokenizer and vocabulary (49,152 tokens), which adds 0.1B to Phi-3.5-mini's
count. A builder killed for memory is reported as such (run it under a memory cgroup to see that).

    python bench/build_at_size.py --shape llama-1b [--shape phi3.5-mini] [-p int4] [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.build.pipeline import source_hf_dir  # noqa: E402

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)),
    "phi3.5-mini": ("Phi3Config", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=131072, original_max_position_embeddings=4096,
                                       rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                                                     "long_factor": [1.5] * 48})),
    "llama-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                     rope_theta=500000.0)),
}
VOCAB = 49152  # SmolLM2's tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def make_model(shape: str, out: Path, tokenizer_dir: Path) -> Path:
    """A random bf16 model of `shape` in `out` (kept: made once per machine)."""
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers as tf

    class_name, extra = SHAPES[shape]
    config = getattr(tf, class_name)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                     tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    t0 = time.monotonic()
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, tmp / name)
    os.replace(tmp, out)
    params = sum(p.numel() for p in model.parameters())
    print(f"made {shape}: {params / 1e9:.2f}B parameters, bf16, in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return out


@dataclass
class Run:
    wall_s: float
    peak_rss_bytes: int
    outcome: str  # "ok", "killed (SIGKILL: out of memory?)", "exit N"


def run_measured(argv: list[str], log: Path) -> Run:
    """Run `argv` as its own process; its peak RSS is what the kernel reports for it (wait4)."""
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1"))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        outcome = "killed (SIGKILL: out of memory?)" if sig == signal.SIGKILL else f"killed by signal {sig}"
    else:
        code = os.WEXITSTATUS(status)
        outcome = "ok" if code == 0 else f"exit {code}"
    return Run(round(wall, 1), usage.ru_maxrss * 1024, outcome)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def _same_files(a: Path, b: Path) -> str:
    if not (a.is_dir() and b.is_dir()):
        return "n/a"
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return "no (file lists differ)"
    for name in names:
        if subprocess.run(["cmp", "-s", str(a / name), str(b / name)]).returncode != 0:
            return f"no ({name})"
    return "yes"


def bench_shape(shape: str, precision: str, models_dir: Path, tokenizer_dir: Path, work: Path) -> list[str]:
    hf = make_model(shape, models_dir / f"{shape}-bf16", tokenizer_dir)
    weight_bytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    runs: dict[str, Run] = {}
    outs: dict[str, Path] = {}
    for name, module in (("onnxruntime-genai builder", "onnxruntime_genai.models.builder"),
                         ("edgefleet (streamquant)", "builder.build.streamquant")):
        out = work / f"{shape}-{precision}-{module.split('.')[-1]}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, "-m", module, "-i", str(hf), "-o", str(out), "-p", precision, "-e", "cpu",
                "-c", str(work / "cache"), "--extra_options", "block_size=32", "accuracy_level=4"]
        print(f"{shape}: {name} ...", file=sys.stderr, flush=True)
        runs[name] = run_measured(argv, work / f"{out.name}.log")
        outs[name] = out
        print(f"  {runs[name]}", file=sys.stderr, flush=True)
    stock, ours = runs.values()
    artifact = sum(p.stat().st_size for p in next(iter(outs.values())).glob("*")) if stock.outcome == "ok" else 0
    same = _same_files(*outs.values())
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    ratio = f"{ours.peak_rss_bytes / stock.peak_rss_bytes:.2f}" if stock.outcome == "ok" else "n/a"
    return [f"| {shape} ({_gb(weight_bytes)} GB bf16)"
            f" | {stock.outcome}, {stock.wall_s} s, {_gb(stock.peak_rss_bytes)} GB"
            f" | {ours.outcome}, {ours.wall_s} s, {_gb(ours.peak_rss_bytes)} GB | {ratio}"
            f" | {ours.peak_rss_bytes / weight_bytes:.2f} | {same} | {_gb(artifact) if artifact else 'n/a'} |"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default llama-1b")
    parser.add_argument("-p", "--precision", default="int4", choices=["int4", "int8"])
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "edgefleet" / "bench-models")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "edgefleet",
                        help="builder cache holding (or receiving) the SmolLM2 conversion whose tokenizer is used")
    args = parser.parse_args()
    tokenizer_dir = source_hf_dir("smollm2-135m", args.cache_dir)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    rows = ["| model | onnxruntime-genai builder: outcome, wall, peak RSS | ours | peak ours/theirs"
            " | peak ours / bf16 weight bytes | same bytes | artifact GB |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="build-at-size-", dir=args.models_dir) as work:
        for shape in args.shape or ["llama-1b"]:
            rows += bench_shape(shape, args.precision, args.models_dir, tokenizer_dir, Path(work))
    print(f"{args.precision}, block 32, accuracy level 4, -e cpu; {os.cpu_count()} CPUs")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

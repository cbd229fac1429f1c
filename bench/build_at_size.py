"""Benchmark: onnxruntime-genai's builder against ours (builder.build.streamquant) on models of the
sizes people ship, side by side in one run: wall time and peak RSS of each, and whether their files
are the same bytes. With --whole, also the whole `edge-builder build` (gate, footprint) and its
stages, from the bf16 model or from a GGUF of it; with --gguf, a GGUF of the shape (llama
architecture, Q4_0) turned into a Hugging Face folder by transformers' own loading and by ours
(builder.build.convert), side by side.

The models are random weights in real shapes, made from configs in bf16 (no download) and kept in
--models-dir: Llama 1.1B (TinyLlama's shape), Phi-3.5-mini (3.8B, long/short rope), Llama 8B.
All use SmolLM2's tokenizer and vocabulary (49,152 tokens), which adds 0.1B to Phi-3.5-mini's
count. A run killed for memory is reported as such; --memory-limit runs each measured process in a
memory cgroup of that size (cgroup v1 or v2; needs root), the way a smaller build host would.

    python bench/build_at_size.py --shape llama-1b [--shape phi3.5-mini] [-p int4] [--models-dir DIR]
        [--whole bf16] [--whole gguf] [--gguf] [--memory-limit 12G] [--skip-builders]
"""

from __future__ import annotations

import argparse
import json
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

from builder.build import reference, sources  # noqa: E402
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
    """A random bf16 model of `shape` in `out` (kept: made once per machine), written one tensor at
    a time (an 8B model never whole in memory): normal(0, 0.02) weights and unit norms, as
    transformers initializes them."""
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    class_name, extra = SHAPES[shape]
    config = getattr(tf, class_name)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                     tie_word_embeddings=False, **extra)
    config.dtype = "bfloat16"
    t0 = time.monotonic()
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    config.architectures = [type(model).__name__]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}

    def flush() -> None:
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()

    for name, size in shapes.items():
        if name.endswith("norm.weight"):
            shard[name] = torch.ones(size, dtype=torch.bfloat16)
        else:
            shard[name] = (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
        if sum(t.nbytes for t in shard.values()) >= 2 << 30:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, tmp / name)
    os.replace(tmp, out)
    params = sum(size.numel() for size in shapes.values())
    print(f"made {shape}: {params / 1e9:.2f}B parameters, bf16, in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return out


@dataclass
class Run:
    wall_s: float
    peak_rss_bytes: int
    outcome: str  # "ok", "killed (SIGKILL: out of memory?)", "exit N"


class MemoryCgroup:
    """A memory cgroup of `limit_bytes` under this process's own, for the measured processes."""

    def __init__(self, limit_bytes: int) -> None:
        own = reference.own_memory_cgroup()
        if own is None:
            raise SystemExit("--memory-limit: this process has no memory cgroup to make one under")
        parent, limit_file = own
        self.path = parent / f"edgefleet-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / limit_file).write_text(str(limit_bytes))
        self.limit_bytes = limit_bytes

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        self.path.rmdir()


def run_measured(argv: list[str], log: Path, cgroup: MemoryCgroup | None = None) -> Run:
    """Run `argv` as its own process (in `cgroup`, if given); its peak RSS is what the kernel reports
    for it and the descendants it waited for (wait4)."""
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=cgroup.enter if cgroup else None,
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


def bench_builders(shape: str, hf: Path, precision: str, work: Path, cgroup: MemoryCgroup | None) -> str:
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
        runs[name] = run_measured(argv, work / f"{out.name}.log", cgroup)
        outs[name] = out
        print(f"  {runs[name]}", file=sys.stderr, flush=True)
    stock, ours = runs.values()
    artifact = sum(p.stat().st_size for p in outs["edgefleet (streamquant)"].glob("*")) if ours.outcome == "ok" else 0
    same = _same_files(*outs.values()) if stock.outcome == ours.outcome == "ok" else "n/a"
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    ratio = f"{ours.peak_rss_bytes / stock.peak_rss_bytes:.2f}" if stock.outcome == "ok" else "n/a"
    return (f"| {shape} ({_gb(weight_bytes)} GB bf16)"
            f" | {stock.outcome}, {stock.wall_s} s, {_gb(stock.peak_rss_bytes)} GB"
            f" | {ours.outcome}, {ours.wall_s} s, {_gb(ours.peak_rss_bytes)} GB | {ratio}"
            f" | {ours.peak_rss_bytes / weight_bytes:.2f} | {same} | {_gb(artifact) if artifact else 'n/a'} |")


def bench_whole(label: str, source: Path, work: Path, cgroup: MemoryCgroup | None) -> str:
    """The whole `edge-builder build` of `source` (int4, context 2048, a fresh cache): outcome, wall
    time, the largest process's peak RSS, each stage's seconds."""
    out, cache = work / f"whole-{label}", work / f"whole-{label}-cache"
    for d in (out, cache):
        shutil.rmtree(d, ignore_errors=True)
    argv = [sys.executable, "-m", "builder.cli", "build", str(source), "-o", str(out), "--context-length",
            "2048", "--cache-dir", str(cache), "--json"]
    print(f"{label}: edge-builder build ...", file=sys.stderr, flush=True)
    log = work / f"whole-{label}.log"
    run = run_measured(argv, log, cgroup)
    print(f"  {run}", file=sys.stderr, flush=True)
    stages, tok_s, ratio, size = "", "n/a", "n/a", "n/a"
    if run.outcome == "ok":
        result = json.loads(log.read_text().strip().splitlines()[-1])
        stages = ", ".join(f"{name} {s:.0f}" for name, s in result["stage_durations_s"].items() if s >= 1)
        tok_s = f"{result['decode_tokens_per_s']:.1f}"
        ratio = f"{result['perplexity_ratio']:.3f} ({result['reference_precision']})"
        size = f"{_gb(result['total_file_bytes'])} GB, min RAM {_gb(result['min_ram_bytes'])} GB"
    for d in (out, cache):
        shutil.rmtree(d, ignore_errors=True)
    return (f"| {label} | {run.outcome}, {run.wall_s} s | {_gb(run.peak_rss_bytes)} GB | {ratio} | {tok_s} | {size}"
            f" | {stages} |")


GGUF_BLOCK = 32  # Q4_0: an fp16 scale and 32 4-bit values in 18 bytes


def make_gguf(shape: str, out: Path, template: Path) -> Path:
    """A random Q4_0 GGUF of `shape`'s dimensions in llama.cpp's llama architecture, with the
    template's (SmolLM2's) tokenizer: random nibbles under one scale, written without ever holding
    the model in float (kept: made once per machine)."""
    if out.is_file():
        return out
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    t0 = time.monotonic()
    _, dims = SHAPES[shape]
    hidden, ffn, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    heads, kv_heads = dims["num_attention_heads"], dims["num_key_value_heads"]
    head_dim = hidden // heads
    tmp = out.with_name(out.name + ".partial")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name(f"random {shape}")
    writer.add_block_count(layers)
    writer.add_context_length(min(dims["max_position_embeddings"], 8192))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(dims.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(VOCAB)
    for key, field in GGUFReader(template).fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    rng = np.random.default_rng(0)
    scale = np.array([0.02 / 8], dtype=np.float16).view(np.uint8)

    def q4_0(rows: int, cols: int) -> Any:
        blocks = rng.integers(0, 256, size=(rows, cols // GGUF_BLOCK, 18), dtype=np.uint8)
        blocks[..., :2] = scale
        return blocks.reshape(rows, -1)

    def add(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, q4_0(rows, cols), raw_dtype=GGMLQuantizationType.Q4_0)  # shape: of the bytes

    add("token_embd.weight", VOCAB, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    add("output.weight", VOCAB, hidden)
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, dtype=np.float32))
        add(f"blk.{i}.attn_q.weight", hidden, hidden)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    print(f"made {out.name}: {out.stat().st_size / 1e9:.2f} GB in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return out


_TRANSFORMERS_CONVERSION = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM
path, out = Path(sys.argv[1]), sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
del model.config.quantization_config
model.hf_quantizer = None
model.save_pretrained(out)
"""


def bench_gguf(shape: str, gguf: Path, work: Path, cgroup: MemoryCgroup | None) -> str:
    """transformers' GGUF loading against ours (the tensors only: both read the tokenizer alike)."""
    runs: list[Run] = []
    for name, argv in (("transformers", [sys.executable, "-c", _TRANSFORMERS_CONVERSION]),
                       ("edgefleet", [sys.executable, "-c", "import sys; from pathlib import Path; "
                                      "from builder.build.convert import gguf_to_hf_dir; "
                                      "gguf_to_hf_dir(Path(sys.argv[1]), Path(sys.argv[2]))"])):
        out = work / f"gguf-{shape}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"{shape} GGUF: {name} ...", file=sys.stderr, flush=True)
        runs.append(run_measured([*argv, str(gguf), str(out)], work / f"{out.name}.log", cgroup))
        print(f"  {runs[-1]}", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    theirs, ours = runs
    ratio = f"{ours.peak_rss_bytes / theirs.peak_rss_bytes:.2f}" if theirs.outcome == "ok" else "n/a"
    return (f"| {shape} Q4_0 GGUF ({_gb(gguf.stat().st_size)} GB) | {theirs.outcome}, {theirs.wall_s} s,"
            f" {_gb(theirs.peak_rss_bytes)} GB | {ours.outcome}, {ours.wall_s} s, {_gb(ours.peak_rss_bytes)} GB"
            f" | {ratio} |")


def _bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def _row(table: list[str], row: str) -> None:
    table.append(row)
    print(row, file=sys.stderr, flush=True)  # kept if a later run fails


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default llama-1b")
    parser.add_argument("-p", "--precision", default="int4", choices=["int4", "int8"])
    parser.add_argument("--models-dir", type=Path, default=Path.home() / ".cache" / "edgefleet" / "bench-models")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "edgefleet",
                        help="builder cache holding (or receiving) the SmolLM2 conversion whose tokenizer is used")
    parser.add_argument("--whole", action="append", choices=["bf16", "gguf"], default=[],
                        help="also run the whole edge-builder build of each shape from this source (repeatable; "
                             "gguf implies --gguf)")
    parser.add_argument("--gguf", action="store_true",
                        help="also turn a Q4_0 GGUF of each shape into a Hugging Face folder both ways")
    parser.add_argument("--skip-builders", action="store_true", help="leave out the two ORT builders' comparison")
    parser.add_argument("--memory-limit", type=_bytes, default=None, metavar="BYTES",
                        help="run each measured process in a memory cgroup of this size (e.g. 12G; needs root)")
    args = parser.parse_args()
    tokenizer_dir = source_hf_dir("smollm2-135m", args.cache_dir)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    cgroup = MemoryCgroup(args.memory_limit) if args.memory_limit else None
    builders = ["| model | onnxruntime-genai builder: outcome, wall, peak RSS | ours | peak ours/theirs"
                " | peak ours / bf16 weight bytes | same bytes | artifact GB |", "|---|---|---|---|---|---|---|"]
    wholes = ["| source | edge-builder build: outcome, wall | largest process's peak RSS | perplexity ratio"
              " (reference) | decode tok/s | artifact | stages (s) |", "|---|---|---|---|---|---|---|"]
    ggufs = ["| GGUF | transformers: outcome, wall, peak RSS | ours | peak ours/theirs |", "|---|---|---|---|"]
    try:
        with tempfile.TemporaryDirectory(prefix="build-at-size-", dir=args.models_dir) as tmp:
            work = Path(tmp)
            for shape in args.shape or ["llama-1b"]:
                hf = make_model(shape, args.models_dir / f"{shape}-bf16", tokenizer_dir)
                if not args.skip_builders:
                    _row(builders, bench_builders(shape, hf, args.precision, work, cgroup))
                if "bf16" in args.whole:
                    _row(wholes, bench_whole(f"{shape} bf16", hf, work, cgroup))
                if args.gguf or "gguf" in args.whole:
                    gguf = make_gguf(shape, args.models_dir / f"{shape}-q4_0.gguf",
                                     sources.smollm2_gguf_path())
                    _row(ggufs, bench_gguf(shape, gguf, work, cgroup))
                    if "gguf" in args.whole:
                        _row(wholes, bench_whole(f"{shape} Q4_0 GGUF", gguf, work, cgroup))
    finally:
        if cgroup is not None:
            cgroup.close()
    limit = f", in a {args.memory_limit / (1 << 30):.1f} GiB memory cgroup" if args.memory_limit else ""
    print(f"{args.precision}, block 32, accuracy level 4, -e cpu; {os.cpu_count()} CPUs{limit}")
    for table, wanted in ((builders, not args.skip_builders), (wholes, args.whole),
                          (ggufs, args.gguf or "gguf" in args.whole)):
        if wanted:
            print("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

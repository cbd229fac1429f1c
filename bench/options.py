"""What the request options cost: the same streamed greedy chat request through the
HTTP API of a real `edge-agent serve`, plain, under each `response_format`
(constrained decoding), with log-probabilities, and with logits changed (logit_bias,
OpenAI's penalties). Decode tokens/s of each
against the plain request (goal for a JSON schema: at least 0.9), and the time
to first token each adds (a schema or grammar is compiled before the first token).

Runs alternate the variants so the load of a shared machine hits all alike.

    python bench/options.py MODEL_DIR [-n 5] [--max-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime_genai as og  # noqa: E402

from bench.serve import api_run, start_server  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm, as JSON."

STORY = {"type": "object", "additionalProperties": False, "required": ["title", "story"],
         "properties": {"title": {"type": "string", "maxLength": 60}, "story": {"type": "string"}}}
# A schema of the size people send for extraction: nested objects, arrays, enums, bounds.
RECORD = {
    "type": "object", "additionalProperties": False,
    "required": ["title", "genre", "year", "rating", "characters", "places", "summary", "tags", "sequel"],
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "genre": {"enum": ["drama", "adventure", "horror", "comedy", "mystery"]},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "characters": {"type": "array", "maxItems": 6, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "role", "age"],
            "properties": {"name": {"type": "string", "maxLength": 40},
                           "role": {"enum": ["hero", "villain", "helper", "bystander"]},
                           "age": {"type": "integer", "minimum": 0, "maximum": 120}}}},
        "places": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 40}},
        "summary": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z-]{2,20}$"}, "maxItems": 8},
        "sequel": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 80}]},
    },
}
# name: the request fields each variant adds to the plain one
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema (2 fields)": {"response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "story", "schema": STORY}}},
    "json_schema (extraction)": {"response_format": {"type": "json_schema",
                                                     "json_schema": {"name": "record", "schema": RECORD}}},
    "logprobs": {"logprobs": True},
    "logprobs, top 5": {"logprobs": True, "top_logprobs": 5},
    "logprobs, top 20": {"logprobs": True, "top_logprobs": 20},
    "logit_bias, 2 tokens": {"logit_bias": {"13": -100, "11": 5}},
    "presence + frequency penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("-n", type=int, default=5, help="runs per variant")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    # Stream interval 0: one chunk per token, so the first token's time is measured, not a timer's.
    proc, url = start_server(args.model_dir, args.threads, 0)
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in VARIANTS}
    try:
        for fields in VARIANTS.values():  # warm-up: pages the weights in, allocates the KV cache
            api_run(url, 16, PROMPT, fields)
        for _ in range(args.n):
            for name, fields in VARIANTS.items():
                results[name].append(api_run(url, args.max_tokens, PROMPT, fields))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    print(f"# bench/options.py  model={args.model_dir.name} threads={args.threads} max_tokens={args.max_tokens} "
          f"n={args.n} cpus={os.cpu_count()} python={platform.python_version()} onnxruntime-genai={og.__version__}")
    print()
    print("| request | tokens (median) | decode tok/s (median) | / plain | TTFT ms (median) | TTFT added ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    plain_tps = statistics.median(r[1] for r in results["plain"])
    plain_ttft = statistics.median(r[0] for r in results["plain"]) * 1000
    for name, runs in results.items():
        tps = statistics.median(r[1] for r in runs)
        ttft = statistics.median(r[0] for r in runs) * 1000
        tokens = statistics.median(r[2] for r in runs)
        print(f"| {name} | {tokens:g} | {tps:.1f} | {tps / plain_tps:.3f} | {ttft:.1f} | {ttft - plain_ttft:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The worker's batched decode against what onnxruntime-genai 0.18 can batch on the CPU, side
by side in one process and one run: N requests of 64 greedy tokens each (prefill included),
N = 1, 2, 4, 8, 16, by

- `round-robin`: one onnxruntime-genai generator per request, stepped in turn (what the model
  worker did before the batched decode, and still does for beam search and constraints);
- `engine`: onnxruntime-genai's continuous-batching `Engine`, every request begun at once;
- `static batch`: one generator of batch size N (its sequences start and end together, so it
  serves a burst, not clients that come and go);
- `batched decode`: the worker's own (`agent/serving/batch.py`): the decoder graph run through
  onnxruntime, every request's KV in a slot, one run per group of slots per token.

For each way: aggregate tokens/s, its ratio to round-robin, how many of its answers equal the
answer the same request gets from the same way alone (does load change answers?), and the
process's RSS growth while it ran. Rounds alternate the order of the ways; medians are printed.

    python bench/batching.py MODEL_DIR [-n 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnxruntime_genai as og  # noqa: E402
import psutil  # noqa: E402

from agent.system.hardware import NOTABLE_FEATURES, read_cpu_flags  # noqa: E402

NEW_TOKENS = 64
COUNTS = (1, 2, 4, 8, 16)
_PROCESS = psutil.Process()

Answers = list[list[int]]


def prompts(tokenizer: og.Tokenizer, n: int) -> list[list[int]]:
    """`n` distinct chat prompts of one length (a static batch takes no ragged prompts)."""
    out = [list(tokenizer.encode(f"<|im_start|>user\n(request {10 + i}) Write a long story about a lighthouse "
                                 "keeper and a storm.<|im_end|>\n<|im_start|>assistant\n")) for i in range(n)]
    if len({len(p) for p in out}) != 1:
        raise SystemExit("the prompts tokenize to different lengths: pick another template")
    return out


def round_robin(model: og.Model, batch: list[list[int]]) -> Answers:
    generators = []
    for p in batch:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(p) + NEW_TOKENS, do_sample=False)
        generators.append(og.Generator(model, params))
    for g, p in zip(generators, batch, strict=True):
        g.append_tokens(p)
    live = list(generators)
    while live:
        for g in list(live):
            if g.is_done():
                live.remove(g)
            else:
                g.generate_next_token()
    return [list(g.get_sequence(0))[len(p):] for g, p in zip(generators, batch, strict=True)]


def engine(model: og.Model, batch: list[list[int]]) -> Answers:
    eng = og.Engine(model)
    events = eng.create_event_buffer(256)
    requests, answers = [], {}
    for p in batch:
        request = eng.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(NEW_TOKENS)
        options.set_do_sample(False)
        request.begin_turn(np.array(p, dtype=np.int32), options)
        requests.append(request)
        answers[str(request)] = []
    token_flag = int(og.EngineEventFlags.TOKEN.value)
    while eng.has_pending_requests():
        for event in eng.run(events):
            if int(event.flags) & token_flag:
                answers[str(event.request)].append(int(event.token))
    return [answers[str(r)] for r in requests]


def static_batch(model: og.Model, batch: list[list[int]]) -> Answers:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(batch[0]) + NEW_TOKENS, do_sample=False, batch_size=len(batch))
    g = og.Generator(model, params)
    g.append_tokens(np.array(batch, dtype=np.int32))
    while not g.is_done():
        g.generate_next_token()
    return [list(g.get_sequence(i))[len(batch[0]):] for i in range(len(batch))]


class WorkerBatch:
    """The `batched decode` way: the worker's own (`agent.serving.batch`), stepped as the worker
    steps it: every request prefilled, then one decode run per group of slots per token."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        from agent.serving.runtime import ModelRuntime

        self.runtime = ModelRuntime(model_dir, intra_op_num_threads=threads, batch=True)
        if self.runtime.decoder is None:
            raise SystemExit(f"the batched decode cannot run {model_dir}: see the log")

    def decoded_kv_differs(self, prompt: list[int], tokens: int = 16) -> tuple[int, int]:
        """How many of the KV buffers (a layer's keys or values) differ, over decoded positions,
        between `tokens` decoded one per run and the same tokens in one prefill batch: what keeps
        the prefix cache from reusing a completion before it recomputes it. (differing, of all)"""
        import numpy as np

        from agent.serving.batch import GROUP_ROWS
        from agent.serving.sampling import chooser

        decoder = self.runtime.decoder
        assert decoder is not None
        start = len(prompt) - len(prompt) % 16  # a cell boundary: both prefill the prompt alike
        decoded, prefilled = decoder.free_slot() or decoder.add_slots(), decoder.free_slot()
        assert prefilled is not None and decoded.group is prefilled.group
        try:
            logits = decoder.prefill(decoded, prompt[:start])
            sequence = prompt[:start]
            for _ in range(tokens):
                sequence.append(chooser().greedy([logits])[0])
                logits = decoder.decode([(decoded, sequence[-1])])[0]
            decoder.prefill(prefilled, sequence)
            group, graph = decoded.group, decoder.graph
            shape = (GROUP_ROWS, graph.kv_heads, group.room, graph.head_size)
            buffers = [np.frombuffer(b, np.float32).reshape(shape) for b in group.buffers]
            differing = sum(not np.array_equal(b[decoded.index, :, start:len(sequence)],
                                               b[prefilled.index, :, start:len(sequence)]) for b in buffers)
            return differing, len(buffers)
        finally:
            decoded.close()
            prefilled.close()

    def __call__(self, _model: og.Model, batch: list[list[int]]) -> Answers:
        from agent.serving.generation import decode_all
        from agent.wire.worker import SamplingOptions

        options = SamplingOptions(temperature=0.0, max_tokens=NEW_TOKENS)
        generations = [self.runtime.start_batched(p, options) for p in batch]
        for g in generations:
            g.prefill_step()
        while live := [g for g in generations if g.is_decoding]:
            decode_all(live)
        for g in generations:
            g.release()
        return [g.completion_ids for g in generations]


WAYS: dict[str, Callable[[og.Model, list[list[int]]], Answers]] = {
    "round-robin": round_robin, "engine": engine, "static batch": static_batch}


def timed(way: Callable[[og.Model, list[list[int]]], Answers], model: og.Model,
          batch: list[list[int]]) -> tuple[float, Answers, float]:
    """Tokens/s, the answers, and the peak RSS above the start (sampled every 10 ms) in MiB."""
    start_rss = peak = _PROCESS.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, _PROCESS.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        answers = way(model, batch)
        seconds = time.perf_counter() - started
    finally:
        done.set()
        sampler.join()
    return sum(map(len, answers)) / seconds, answers, (peak - start_rss) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="an onnxruntime-genai model dir (e.g. edge-builder build smollm2-135m)")
    p.add_argument("-n", "--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    config = og.Config(str(args.model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    all_prompts = prompts(og.Tokenizer(model), max(COUNTS))
    ways = dict(WAYS)
    batched = ways["batched decode"] = WorkerBatch(args.model_dir, args.threads)
    for way in ways.values():
        way(model, all_prompts[:1])  # the first run allocates arenas
    # Each way's answer to each prompt alone: what load must not change.
    alone = {name: [way(model, [q])[0] for q in all_prompts] for name, way in ways.items()}
    rows: dict[tuple[int, str], list[tuple[float, int, float]]] = {}
    for r in range(args.rounds):
        for n in COUNTS:
            names = list(ways)
            for name in names if r % 2 == 0 else list(reversed(names)):
                tok_s, answers, grown = timed(ways[name], model, all_prompts[:n])
                same = sum(a == b for a, b in zip(answers, alone[name], strict=False))
                rows.setdefault((n, name), []).append((tok_s, same, grown))
        print(f"round {r + 1} done", file=sys.stderr)
    features = " ".join(f for f in NOTABLE_FEATURES if f in read_cpu_flags())
    print(f"# {platform.machine()} ({features}), {os.cpu_count()} CPUs, {args.threads} threads, {args.rounds} rounds "
          f"(median), {NEW_TOKENS} tokens per request, {args.model_dir.name}")
    print("| requests | way | aggregate tok/s | / round-robin | answers equal to the way's alone | RSS growth MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (n, name), values in rows.items():
        tok_s = statistics.median(v[0] for v in values)
        base = statistics.median(v[0] for v in rows[(n, "round-robin")])
        same = min(v[1] for v in values)
        print(f"| {n} | {name} | {tok_s:.1f} | {tok_s / base:.2f} | {same} of {n} | "
              f"{statistics.median(v[2] for v in values):.0f} |")
    assert batched.runtime.decoder is not None
    same_as_generators = alone["batched decode"] == alone["round-robin"]
    print(f"\nbatched decode: answers alone {'equal' if same_as_generators else 'differ from'} onnxruntime-genai's; "
          f"every run's rows a multiple of {batched.runtime.decoder.row_multiple} on these kernels")
    differing, buffers = batched.decoded_kv_differs(all_prompts[0])
    print(f"a decoded token's KV against the same token's in a prefill: {differing} of {buffers} KV buffers differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

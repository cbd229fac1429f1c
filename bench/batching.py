"""What onnxruntime-genai 0.18 can batch on the CPU, side by side in one process and one run:
N requests of 64 greedy tokens each (prefill included), N = 1, 2, 4, 8, 16, by

- `round-robin`: one generator per request, stepped in turn (what the model worker does);
- `engine`: onnxruntime-genai's continuous-batching `Engine`, every request begun at once;
- `static batch`: one generator of batch size N (its sequences start and end together, so it
  serves a burst, not clients that come and go);

- `own batch`: a candidate, not onnxruntime-genai's: the decoder session run directly
  (onnxruntime), every request's KV in a slot of one buffer, each decode step run for up to
  `OWN_ROWS_PER_RUN` requests at once, a row left alone given a dummy partner row (so that every
  row is computed in a group of rows, as a prefill computes it);

and, for one request, `pairs`: each decode step recomputes the previous token with the new one
(a batch of two rows), which gives every token the KV a prefill gives it (see
agent/serving/prefix_cache.py), at the cost printed.

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
from typing import Any

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


def pairs(model: og.Model, batch: list[list[int]]) -> Answers:
    (p,) = batch
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(p) + NEW_TOKENS, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(p)
    while not g.is_done():
        g.generate_next_token()
        sequence = list(g.get_sequence(0))
        if not g.is_done():
            g.rewind_to(len(sequence) - 2)
            g.append_tokens(sequence[-2:])
    return [list(g.get_sequence(0))[len(p):]]


# A run of 8 rows costs far more than two runs of 4 (the CPU kernels change method above 4 rows;
# figures in the README), so 8 requests step as two runs of 4.
OWN_ROWS_PER_RUN = 4


class OwnBatch:
    """The `own batch` way: KV slots in one buffer per layer, slot `requests` kept for dummy rows."""

    def __init__(self, model_dir: Path, threads: int, requests: int, max_length: int) -> None:
        import onnxruntime as ort

        decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.ort = ort
        self.session = ort.InferenceSession(str(model_dir / decoder["filename"]), options,
                                            providers=["CPUExecutionProvider"])
        shape = (requests + 1, decoder["num_key_value_heads"], max_length, decoder["head_size"])
        self.kv = {(layer, kind): np.zeros(shape, np.float32)
                   for layer in range(decoder["num_hidden_layers"]) for kind in ("key", "value")}
        self._bindings: dict[tuple[int, int], Any] = {}
        self.dummy = requests

    def run(self, first_slot: int, ids: list[list[int]], lengths: list[int]) -> np.ndarray:
        """One session run over slots first_slot.. (one row each, `ids` appended to the KV of that
        slot, which then holds `lengths` tokens); the last row's logits of each."""
        mask = np.zeros((len(ids), max(lengths)), np.int64)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        binding = self._bindings.get((first_slot, len(ids)))
        if binding is None:  # the KV slots' bindings of this row span, made once
            binding = self._bindings[(first_slot, len(ids))] = self.session.io_binding()
            for (layer, kind), buffer in self.kv.items():
                # Past and present are one buffer: the attention writes the new KV in place.
                value = self.ort.OrtValue.ortvalue_from_numpy(buffer[first_slot:first_slot + len(ids)])
                binding.bind_ortvalue_input(f"past_key_values.{layer}.{kind}", value)
                binding.bind_ortvalue_output(f"present.{layer}.{kind}", value)
        binding.bind_cpu_input("input_ids", np.asarray(ids, np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        logits: np.ndarray = binding.copy_outputs_to_cpu()[0][:, -1, :]
        return logits

    def __call__(self, _model: og.Model, batch: list[list[int]]) -> Answers:
        return self.generate(batch)[0]

    def decoded_kv_is_a_prefills(self, batch: list[list[int]]) -> bool:
        """Whether the first request's KV after decoding is its whole sequence's prefill KV (then a
        finished answer is reusable at once): its last logits against a prefill's, bit for bit."""
        sequences, logits = self.generate(batch)[1:]
        prefill = self.run(self.dummy, [sequences[0][:-1]], [len(sequences[0]) - 1])[0]
        return bool(np.array_equal(prefill, logits[0]))

    def generate(self, batch: list[list[int]]) -> tuple[Answers, list[list[int]], list[np.ndarray]]:
        sequences = [list(p) for p in batch]
        logits = [self.run(slot, [p], [len(p)])[0] for slot, p in enumerate(batch)]
        answers: Answers = [[] for _ in batch]
        for step in range(NEW_TOKENS):
            for row, sequence in enumerate(sequences):
                sequence.append(int(np.argmax(logits[row])))
                answers[row].append(sequence[-1])
            if step == NEW_TOKENS - 1:
                break
            logits = []
            for first in range(0, len(batch), OWN_ROWS_PER_RUN):
                rows = sequences[first:first + OWN_ROWS_PER_RUN]
                ids, lengths = [[s[-1]] for s in rows], [len(s) for s in rows]
                if len(rows) == 1:  # the slot after a lone row's is free: its dummy partner's
                    ids, lengths = ids + [[0]], lengths + [1]
                logits.extend(self.run(first, ids, lengths)[:len(rows)])
        return answers, sequences, logits


WAYS: dict[str, Callable[[og.Model, list[list[int]]], Answers]] = {
    "round-robin": round_robin, "engine": engine, "static batch": static_batch, "pairs": pairs}


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
    ways["own batch"] = OwnBatch(args.model_dir, args.threads, max(COUNTS), len(all_prompts[0]) + NEW_TOKENS)
    for way in ways.values():
        way(model, all_prompts[:1])  # the first run allocates arenas
    # Each way's answer to each prompt alone: what load must not change.
    alone = {name: [way(model, [q])[0] for q in all_prompts] for name, way in ways.items() if name != "pairs"}
    alone["pairs"] = alone["round-robin"]  # pairs runs alone only: compared with a plain decode's answer
    rows: dict[tuple[int, str], list[tuple[float, int, float]]] = {}
    for r in range(args.rounds):
        for n in COUNTS:
            names = [w for w in ways if w != "pairs" or n == 1]
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
    own = ways["own batch"]
    assert isinstance(own, OwnBatch)
    exact = {n: own.decoded_kv_is_a_prefills(all_prompts[:n]) for n in COUNTS}
    print("\nown batch: a decoded answer's KV is bit for bit a prefill's, by requests: "
          + ", ".join(f"{n}: {'yes' if ok else 'no'}" for n, ok in exact.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

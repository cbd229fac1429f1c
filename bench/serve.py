"""What the serving layer costs: onnxruntime-genai's own loop in this process
(baseline) against the same greedy generation through the model-worker pipe
(WorkerClient, no HTTP) and through the HTTP API with streaming (candidate,
`edge-agent serve` as a real subprocess, read with plain HTTP + SSE), once
with the default stream interval (tokens made within it share one SSE chunk)
and once with a chunk per token. Then aggregate tokens/s through the API
with 1, 2 and 4 concurrent clients.

Runs alternate raw / worker / API so the load of a shared machine hits all
variants alike.

    python bench/serve.py MODEL_DIR [-n 5] [--max-tokens 128] [--threads 2] [--stream-interval-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime_genai as og  # noqa: E402
import psutil  # noqa: E402
import requests  # noqa: E402
import starlette  # noqa: E402
import uvicorn  # noqa: E402

from agent.serving.worker.client import WorkerClient  # noqa: E402
from agent.wire.worker import ChatMessage, GenerateCommand, SamplingOptions, TokenEvent  # noqa: E402  # noqa: E402
from builder.demo.ports import free_port  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


class Raw:
    """The baseline: ORT-GenAI's own loop, model in this process."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        config = og.Config(str(model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)

    def run(self, max_tokens: int) -> tuple[float, float, int]:
        started = time.perf_counter()
        text = self.tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": PROMPT}]),
                                                  add_generation_prompt=True)
        ids = self.tokenizer.encode(text)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        stream = self.tokenizer.create_stream()
        generator.append_tokens(ids)
        first = last = 0.0
        n = 0
        while not generator.is_done():
            generator.generate_next_token()
            stream.decode(int(generator.get_next_tokens()[0]))
            last = time.perf_counter()
            first = first or last
            n += 1
        return first - started, (n - 1) / (last - first), n


async def _worker_run(worker: WorkerClient, max_tokens: int, interval_s: float) -> tuple[float, float, int]:
    command = GenerateCommand(id=os.urandom(8).hex(), messages=[ChatMessage(role="user", content=PROMPT)],
                              options=SamplingOptions(temperature=0.0, max_tokens=max_tokens),
                              stream_interval_s=interval_s)
    started = time.perf_counter()
    first = last = 0.0
    n = 0
    async for event in worker.generate(command):
        if isinstance(event, TokenEvent):
            last = time.perf_counter()
            first = first or last
            n += len(event.token_ids)
    return first - started, (n - 1) / (last - first), n


def api_run(url: str, max_tokens: int, prompt: str = PROMPT,
            fields: dict[str, Any] | None = None) -> tuple[float, float, int]:
    """(TTFT s, decode tok/s after the first token, tokens) of one streamed greedy chat request
    (plus `fields`)."""
    body = {"model": "default", "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}], "stream_options": {"include_usage": True},
            **(fields or {})}
    started = time.perf_counter()
    first = last = 0.0
    n = 0
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    # tokens/s over the tokens after the first (a chunk can carry an empty text for a partial character)
    return first - started, (n - 1) / (last - first) if last > first else 0.0, n


def start_server(model_dir: Path, threads: int, interval_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--threads", str(threads), "--parallel", "4",
                             "--stream-interval-ms", str(interval_ms)], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become healthy within 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("-n", type=int, default=5, help="runs per variant")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--stream-interval-ms", type=float, default=50.0,
                        help="the serve default; the per-token variant always uses 0")
    args = parser.parse_args()
    interval_s = args.stream_interval_ms / 1000
    api_names = {"api": f"API, {args.stream_interval_ms:g} ms chunks", "api_per_token": "API, chunk per token"}

    raw = Raw(args.model_dir, args.threads)
    servers = {"api": start_server(args.model_dir, args.threads, args.stream_interval_ms),
               "api_per_token": start_server(args.model_dir, args.threads, 0)}
    loop = asyncio.new_event_loop()
    worker = loop.run_until_complete(WorkerClient.start(args.model_dir, threads=args.threads))
    results: dict[str, list[tuple[float, float, int]]] = {"raw": [], "worker": [], **{k: [] for k in servers}}
    api_cpu_s = dict.fromkeys(servers, 0.0)
    try:
        # one warm-up each: first runs allocate the KV cache and page the weights in
        raw.run(16)
        loop.run_until_complete(_worker_run(worker, 16, interval_s))
        for _, url in servers.values():
            api_run(url, 16)
        api_processes = {name: psutil.Process(proc.pid) for name, (proc, _) in servers.items()}
        for _ in range(args.n):
            results["raw"].append(raw.run(args.max_tokens))
            results["worker"].append(loop.run_until_complete(_worker_run(worker, args.max_tokens, interval_s)))
            for name, (_, url) in servers.items():
                before = api_processes[name].cpu_times()
                results[name].append(api_run(url, args.max_tokens))
                after = api_processes[name].cpu_times()
                api_cpu_s[name] += (after.user + after.system) - (before.user + before.system)
        loop.run_until_complete(worker.stop())
        del raw  # only the server's worker uses the CPUs from here on

        url = servers["api"][1]
        concurrency: dict[int, tuple[float, int]] = {}
        for clients in (1, 2, 4):
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                runs = list(pool.map(lambda _: api_run(url, args.max_tokens), range(clients * 2)))
            wall_s = time.perf_counter() - started
            concurrency[clients] = (sum(r[2] for r in runs) / wall_s, sum(r[2] for r in runs))
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in servers.values():
            proc.wait(30)

    print(f"# bench/serve.py  model={args.model_dir.name} threads={args.threads} max_tokens={args.max_tokens} "
          f"n={args.n} cpus={os.cpu_count()} python={platform.python_version()} "
          f"onnxruntime-genai={og.__version__} starlette={starlette.__version__} uvicorn={uvicorn.__version__} "
          f"stream_interval_ms={args.stream_interval_ms:g}")
    tokens = {k: {r[2] for r in v} for k, v in results.items()}
    print(f"# tokens per run: {tokens} (greedy, same output in all variants)")
    print()
    variants = ("raw", "worker", *servers)
    headers = ["raw ORT-GenAI loop", "worker pipe", *api_names.values()]
    print(f"| metric | {' | '.join(headers)} | worker/raw | {' | '.join(f'{api_names[k]} / raw' for k in servers)} |")
    print("|" + " --- |" * (1 + len(variants) + len(variants) - 1))
    medians: dict[str, dict[str, float]] = {}
    for label, index, scale in (("decode tok/s", 1, 1.0), ("TTFT ms", 0, 1000.0)):
        cells = []
        medians[label] = {}
        for name in variants:
            values = [r[index] * scale for r in results[name]]
            medians[label][name] = statistics.median(values)
            cells.append(f"median {medians[label][name]:.1f}, p90 {_p90(values):.1f}")
        ratios = [f"{medians[label][name] / medians[label]['raw']:.3f}" for name in variants[1:]]
        print(f"| {label} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    ttft = medians["TTFT ms"]
    added = [f"{ttft[name] - ttft['raw']:+.2f}" for name in variants[1:]]
    print(f"| added TTFT ms (median) | 0 | {' | '.join(added)} |" + " |" * (len(variants) - 1))
    cpu = [f"{api_cpu_s[name] / sum(r[2] for r in results[name]) * 1e6:.0f} us" for name in servers]
    print(f"| API process CPU per token | | | {' | '.join(cpu)} |" + " |" * (len(variants) - 1))
    print()
    raw_tps = medians["decode tok/s"]["raw"]
    print(f"concurrency, {api_names['api']}:\n")
    print("| concurrent API clients | aggregate tok/s | total tokens | aggregate / raw single-stream decode |")
    print("| --- | --- | --- | --- |")
    for clients, (tps, total) in concurrency.items():
        print(f"| {clients} | {tps:.1f} | {total} | {tps / raw_tps:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

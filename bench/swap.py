"""What a model switch costs: time from "verified" to "new model serving", and how long
client requests wait while it happens, for the two activation modes of the agent:

- both in RAM: the new model loads (and runs its canary) in its own worker while the old
  one keeps serving; then new requests go to the new worker (`ModelHost.switch`);
- drain and switch: in-flight requests finish, new ones wait, the old worker stops, then
  the new one loads and runs its canary (`ModelHost.switch(drain_first=True)`).

Baseline: the same client load with no switch at all. Two clients send short chat
requests back to back through `ModelHost` (the API's path minus HTTP) the whole time.

Also measured (issue 6): whether `og.Model()` holds the GIL while it loads. A thread
ticks every 1 ms while the main thread loads the model; the longest gap between ticks is
compared with the same ticker during `time.sleep` (GIL free) and during a pure-Python busy
loop (GIL contended, switched every 5 ms).

    python bench/swap.py [MODEL_DIR] [-n 5] [--threads 2]

MODEL_DIR defaults to the SmolLM2 INT4 artifact of the test cache (`$EDGEFLEET_TEST_CACHE/smollm2-artifact`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime_genai as og  # noqa: E402

from agent.serving.host import ModelHost  # noqa: E402
from agent.wire.manifest import MANIFEST_FILENAME, Manifest  # noqa: E402
from agent.wire.worker import ChatMessage, DoneEvent, ErrorEvent, SamplingOptions  # noqa: E402  # noqa: E402
from testkit.store import hardlinked_twin  # noqa: E402

CLIENTS = 2
MAX_TOKENS = 8


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


class Load:
    """CLIENTS coroutines sending short chat requests back to back; records (start, latency, ok)."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self.records: list[tuple[float, float, bool]] = []
        self._stop = False

    async def _client(self) -> None:
        options = SamplingOptions(temperature=0.0, max_tokens=MAX_TOKENS)
        while not self._stop:
            started = time.perf_counter()
            ok = False
            try:
                async for _, event in self.host.generate(messages=[ChatMessage(role="user", content="Hi there")],
                                                         options=options):
                    if isinstance(event, DoneEvent):
                        ok = True
                    elif isinstance(event, ErrorEvent):
                        break
            except Exception:  # a failed request is the thing we count
                ok = False
            self.records.append((started, time.perf_counter() - started, ok))

    async def run_while(self, work: asyncio.Future[object] | None, duration_s: float | None = None) -> None:
        tasks = [asyncio.create_task(self._client()) for _ in range(CLIENTS)]
        if work is not None:
            await work
        if duration_s is not None:
            await asyncio.sleep(duration_s)
        self._stop = True
        await asyncio.gather(*tasks)


async def _one_switch(host: ModelHost, target: Path, canary: object, drain_first: bool) -> dict[str, float]:
    old = host.current_worker
    load = Load(host)
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    serving_at: list[float] = []
    done_at: list[float] = []

    async def switch_and_watch() -> None:
        task = asyncio.create_task(host.switch(target, canary=canary, drain_first=drain_first))  # type: ignore[arg-type]
        while not task.done():
            w = host.current_worker
            if not serving_at and w is not None and w is not old and w.is_alive:
                serving_at.append(time.perf_counter())
            await asyncio.sleep(0.002)
        await task
        done_at.append(time.perf_counter())
        if not serving_at:
            serving_at.append(done_at[0])

    await load.run_while(asyncio.ensure_future(switch_and_watch()), duration_s=0.5)
    t_done = time.perf_counter()
    window = [r for r in load.records if r[0] <= t_done]
    return {"to_serving_s": serving_at[0] - t0, "switch_call_s": done_at[0] - t0,
            "max_wait_s": max(r[1] for r in window), "p90_wait_s": _p90([r[1] for r in window]),
            "failed": float(sum(1 for r in load.records if not r[2])), "requests": float(len(load.records))}


async def _steady(host: ModelHost, duration_s: float) -> dict[str, float]:
    load = Load(host)
    await load.run_while(None, duration_s=duration_s)
    lat = [r[1] for r in load.records]
    return {"max_wait_s": max(lat), "p90_wait_s": _p90(lat), "failed": float(sum(1 for r in load.records if not r[2])),
            "requests": float(len(lat))}


async def bench_switch(model_dir: Path, n: int, threads: int) -> None:
    manifest = Manifest.model_validate_json((model_dir / MANIFEST_FILENAME).read_bytes())
    canary = manifest.evaluation.canary
    with tempfile.TemporaryDirectory() as tmp:
        twin = hardlinked_twin(model_dir, Path(tmp) / "twin")
        host = ModelHost(threads=threads)
        await host.switch(model_dir, canary=canary)
        results: dict[str, list[dict[str, float]]] = {"none": [], "both": [], "drain": []}
        dirs = [twin, model_dir]
        for i in range(n):
            for mode in ("none", "both", "drain"):  # interleaved: the machine's load hits all alike
                if mode == "none":
                    results[mode].append(await _steady(host, 3.0))
                else:
                    results[mode].append(await _one_switch(host, dirs[i % 2], canary, drain_first=mode == "drain"))
                    dirs.reverse()
        await host.close()

    def med(mode: str, key: str) -> float | None:
        vals = [r[key] for r in results[mode] if key in r]
        return statistics.median(vals) if vals else None

    def p90(mode: str, key: str) -> float | None:
        vals = [r[key] for r in results[mode] if key in r]
        return _p90(vals) if vals else None

    print(f"\n## Model switch: {manifest.name} v{manifest.version} ({manifest.build.precision}), "
          f"{CLIENTS} clients x {MAX_TOKENS}-token chat requests, n={n} per column, threads={threads}\n")
    print("| metric | no switch (baseline) | both in RAM | drain and switch | both/baseline | drain/baseline |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = [("verified -> new model serving, s (median)", "to_serving_s", med),
            ("verified -> new model serving, s (p90)", "to_serving_s", p90),
            ("switch() returns (old worker stopped), s (median)", "switch_call_s", med),
            ("longest request latency in the window, s (median of runs)", "max_wait_s", med),
            ("longest request latency in the window, s (p90 of runs)", "max_wait_s", p90),
            ("p90 request latency in the window, s (median of runs)", "p90_wait_s", med)]
    for label, key, agg in rows:
        base, both, drain = agg("none", key), agg("both", key), agg("drain", key)
        print(f"| {label} | {_fmt(base)} | {_fmt(both)} | {_fmt(drain)} | {_ratio(both, base)}"
              f" | {_ratio(drain, base)} |")
    failed = {m: int(sum(r["failed"] for r in results[m])) for m in results}
    total = {m: int(sum(r["requests"] for r in results[m])) for m in results}
    print(f"| failed requests / requests | {failed['none']}/{total['none']} | {failed['both']}/{total['both']} |"
          f" {failed['drain']}/{total['drain']} | | |")


def bench_gil(model_dir: Path) -> None:
    """Longest gap of a 1 ms ticker thread while the main thread does one of three things."""

    def run(what: str, action: object) -> tuple[float, float]:
        ticks: list[float] = []
        stop = threading.Event()

        def ticker() -> None:
            while not stop.is_set():
                ticks.append(time.perf_counter())
                time.sleep(0.001)
        t = threading.Thread(target=ticker)
        t.start()
        time.sleep(0.05)
        started = time.perf_counter()
        action()  # type: ignore[operator]
        duration = time.perf_counter() - started
        time.sleep(0.05)
        stop.set()
        t.join()
        inside = [x for x in ticks if started - 0.01 <= x <= started + duration + 0.01]
        gaps = [b - a for a, b in itertools.pairwise(inside)]
        return duration, max(gaps) if gaps else duration

    def load() -> None:
        og.Model(str(model_dir))

    load_s, load_gap = run("og.Model()", load)

    def sleep() -> None:
        time.sleep(load_s)

    def busy() -> None:
        end = time.perf_counter() + load_s
        while time.perf_counter() < end:
            pass

    sleep_s, sleep_gap = run("sleep", sleep)
    busy_s, busy_gap = run("busy", busy)
    print(f"\n## Does og.Model() hold the GIL while it loads? ({model_dir.name}, 1 ms ticker thread)\n")
    print("| main thread does | duration s | longest ticker gap ms | gap / duration |")
    print("| --- | --- | --- | --- |")
    for label, d, g in (("time.sleep (GIL released, baseline)", sleep_s, sleep_gap),
                        ("pure-Python busy loop (GIL contended)", busy_s, busy_gap),
                        ("og.Model(dir) (candidate)", load_s, load_gap)):
        print(f"| {label} | {d:.3f} | {g * 1000:.1f} | {g / d:.2f} |")
    verdict = "holds the GIL for the whole load" if load_gap > 0.5 * load_s else "releases the GIL while loading"
    print(f"\nog.Model() {verdict} (longest gap {load_gap * 1000:.0f} ms of a {load_s * 1000:.0f} ms load).")


def main() -> None:
    default = Path(os.environ.get("EDGEFLEET_TEST_CACHE", "/work/cache")) / "smollm2-artifact"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, nargs="?", default=default)
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime

    print(f"python {platform.python_version()}, onnxruntime-genai {og.__version__},"
          f" onnxruntime {onnxruntime.__version__},"
          f" {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    bench_gil(args.model_dir)
    asyncio.run(bench_switch(args.model_dir, args.n, args.threads))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

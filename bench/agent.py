"""What the agent daemon costs, against bare onnxruntime-genai:

1. Idle memory of `edge-agent run` (API process + its model worker, MQTT connected) with
   no model and with the SmolLM2 INT4 artifact loaded, against a bare Python process that
   holds the same model with onnxruntime-genai (loaded, canary generated once, idle).
   The goal is judged on resident memory with each physical page counted once
   (`bench/resident.py`, from /proc/PID/pagemap, needs root): what the box pays for the
   process tree. RSS sums count the pages our two processes share twice; PSS sums move
   with whatever else maps the same libraries at the time (this benchmark, the baseline).
   Both are printed beside it. Goal: the agent adds < 40 MB.
2. Time from ringing the MQTT doorbell to the new model serving (`/healthz` names the new
   version) over loopback: real Mosquitto, the real repository server, a delta update
   (only a small file changed), load + canary + switch. Baseline: `ModelHost.switch`
   alone (load + canary + switch, no doorbell, TUF, download or install), same model,
   same run.

    python bench/agent.py [ARTIFACT_DIR] [-n 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from agent.wire.broker import BrokerCredentials  # noqa: E402
from agent.wire.manifest import MANIFEST_FILENAME, Manifest  # noqa: E402
from agent.wire.mqtt import Doorbell  # noqa: E402
from bench.resident import resident_mib  # noqa: E402
from builder.fleet.session import ring_doorbell  # noqa: E402
from testkit.agents import Agent, release_repo  # noqa: E402
from testkit.brokers import Mosquitto  # noqa: E402
from testkit.store import hardlinked_twin  # noqa: E402

MiB = 1024 * 1024

_BARE = """
import sys, time
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
tok = og.Tokenizer(model)
ids = list(tok.encode(sys.argv[2]))
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(ids) + int(sys.argv[3]))
gen = og.Generator(model, params)
gen.append_tokens(ids)
while not gen.is_done():
    gen.generate_next_token()
del gen
print("ready", flush=True)
time.sleep(3600)
"""


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


Memory = tuple[float, float, float | None]  # RSS sum, PSS sum, resident (pages once), MiB


def _mem(procs: list[psutil.Process]) -> Memory:
    rss = pss = 0
    for p in procs:
        info = p.memory_full_info()
        rss += info.rss
        pss += info.pss
    return rss / MiB, pss / MiB, resident_mib(p.pid for p in procs)


def _row(label: str, m: Memory) -> None:
    resident = f"{m[2]:.1f}" if m[2] is not None else "n/a (not root)"
    print(f"| {label} | {resident} | {m[0]:.1f} | {m[1]:.1f} |")


def _tree(pid: int) -> list[psutil.Process]:
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def _settle() -> None:
    time.sleep(3.0)  # idle: let start-up garbage and arenas settle


def bare_memory(model_dir: Path, canary_prompt: str, n_tokens: int) -> Memory:
    proc = subprocess.Popen([sys.executable, "-c", _BARE, str(model_dir), canary_prompt, str(n_tokens)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        _settle()
        return _mem([psutil.Process(proc.pid)])
    finally:
        proc.kill()
        proc.wait()


def bare_python_memory() -> Memory:
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        return _mem([psutil.Process(proc.pid)])
    finally:
        proc.kill()
        proc.wait()


async def switch_baseline(model_dir: Path, n: int) -> list[float]:
    from agent.serving.host import ModelHost

    manifest = Manifest.model_validate_json((model_dir / MANIFEST_FILENAME).read_bytes())
    host = ModelHost(threads=2)
    await host.switch(model_dir, canary=manifest.evaluation.canary)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        twin = hardlinked_twin(model_dir, Path(tmp) / "twin")
        dirs = [twin, model_dir]
        for i in range(n):
            started = time.perf_counter()
            await host.switch(dirs[i % 2], canary=manifest.evaluation.canary)
            times.append(time.perf_counter() - started)
    await host.close()
    return times


def main() -> None:
    default = Path(os.environ.get("EDGEFLEET_TEST_CACHE", "/work/cache")) / "smollm2-artifact"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, nargs="?", default=default)
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    import onnxruntime_genai as og

    manifest = Manifest.model_validate_json((args.artifact / MANIFEST_FILENAME).read_bytes())
    canary = manifest.evaluation.canary
    print(f"python {platform.python_version()}, onnxruntime-genai {og.__version__}, {platform.machine()},"
          f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; model {manifest.name}"
          f" v{manifest.version} ({manifest.build.precision}, {manifest.total_file_bytes / MiB:.0f} MiB of files)")

    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    broker = Mosquitto(work / "broker")
    broker.start()
    try:
        with release_repo(work) as release:
            # -- memory --------------------------------------------------------------------
            empty = Agent(work / "empty", release, broker_url=broker.url, fleet="bench",
                          extra={"intra_op_num_threads": 2})
            empty.start()
            try:
                empty.wait(lambda: empty.health() is None and "event=ready" in empty.log(), 60, "ready, no model")
                _settle()
                assert empty.proc is not None
                empty_mem = _mem(_tree(empty.proc.pid))
            finally:
                empty.stop()

            release.repo.publish(args.artifact)
            release.set_channel(manifest.name, manifest.version)
            agent = Agent(work / "agent", release, broker_url=broker.url, fleet="bench",
                          extra={"intra_op_num_threads": 2, "probation_s": 1.0})
            agent.start()
            try:
                agent.wait_serving(manifest.name, manifest.version, timeout_s=300)
                _settle()
                assert agent.proc is not None
                procs = _tree(agent.proc.pid)
                assert len(procs) == 2, [p.cmdline() for p in procs]  # API + one model worker, no update job
                agent_mem, api_mem, worker_mem = _mem(procs), _mem(procs[:1]), _mem(procs[1:])
                bare_mem = bare_memory(args.artifact, canary.prompt, canary.max_new_tokens)
                py_mem = bare_python_memory()

                # -- doorbell -> serving ----------------------------------------------------------
                doorbell_s: list[float] = []
                for i in range(args.n):
                    version = manifest.version + 1 + i
                    passed = agent.log().count("event=probation_passed")
                    release.publish(args.artifact, manifest.name, version)
                    t0 = time.perf_counter()
                    ring_doorbell(broker.url, BrokerCredentials(), "bench", Doorbell(repo_timestamp_version=version))
                    agent.wait_serving(manifest.name, version, timeout_s=300)
                    doorbell_s.append(time.perf_counter() - t0)
                    agent.wait(lambda: agent.store.current() == agent.store.model_dir(manifest.name, version).resolve(),
                               60, "current moved")
                    # This version's probation over before the next round: checks wait for it to end.
                    agent.wait(lambda n=passed: agent.log().count("event=probation_passed") > n, 60, "probation")
                agent.kill(signal.SIGTERM)
            finally:
                agent.stop()
        baseline_s = asyncio.run(switch_baseline(args.artifact, args.n))
    finally:
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n## Idle memory, MiB (after {3:.0f} s idle; PSS = shared pages split between processes)\n")
    print("| process(es) | resident, pages once | RSS sum | PSS sum |")
    print("| --- | --- | --- | --- |")
    _row("bare python interpreter", py_mem)
    _row("bare onnxruntime-genai holding the model (baseline)", bare_mem)
    _row("edge-agent run, no model (API process, MQTT connected)", empty_mem)
    _row("edge-agent run with the model: API process", api_mem)
    _row("edge-agent run with the model: model worker", worker_mem)
    _row("edge-agent run with the model: API + worker (candidate)", agent_mem)
    adds = [a - b if a is not None and b is not None else None for a, b in zip(agent_mem, bare_mem, strict=True)]
    print("| agent adds over the baseline (candidate - baseline) |"
          + "|".join(f" {d:+.1f} " if d is not None else " n/a " for d in (adds[2], adds[0], adds[1])) + "|")
    if agent_mem[2] is not None and bare_mem[2] is not None:
        verdict = "met" if agent_mem[2] - bare_mem[2] < 40 else "NOT met"
        print(f"\nGoal (agent adds < 40 MB resident, pages counted once): {verdict}")

    print(f"\n## Doorbell -> new model serving over loopback, s (n={args.n}, delta update: one small file changed)\n")
    print("| metric | ModelHost.switch alone (baseline) | doorbell -> /healthz names the new version | ratio |")
    print("| --- | --- | --- | --- |")
    b_med, d_med = statistics.median(baseline_s), statistics.median(doorbell_s)
    b_p90, d_p90 = _p90(baseline_s), _p90(doorbell_s)
    print(f"| median | {b_med:.2f} | {d_med:.2f} | {d_med / b_med:.2f} |")
    print(f"| p90 | {b_p90:.2f} | {d_p90:.2f} | {d_p90 / b_p90:.2f} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

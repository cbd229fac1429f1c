"""What only a machine with an NVIDIA GPU shows: a `-e cuda` artifact on its target provider.

    python bench/cuda_device.py ART [ART ...] [--json OUT]

Run by hand on a CUDA machine with `onnxruntime-genai-cuda` installed (no test needs one). For
each artifact built here with `edge-builder build -e cuda`:

1. the hardware probe: cuda among the working providers (the bundled probe model ran on it);
2. the manifest's requirements against that report (what a device checks before downloading);
3. activation as the daemon does it: a worker process loads the model on its target provider
   and replays the canary (`ModelHost.switch` with the manifest's canary), then answers a chat;
4. the canary's leads on cuda against the build host's CPU leads (largest change, in logits);
5. greedy decode speed of the same graph on cuda and on this machine's CPU (`providers=[]`);
6. the device's whole path: the artifact signed into a TUF repository, served over HTTP,
   installed by `edge-agent update --once` (hardware check, download, verify, canary on cuda),
   then `edge-agent serve` on it answering a chat completion over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.serving.host import ModelHost  # noqa: E402
from agent.serving.runtime import ModelRuntime  # noqa: E402
from agent.system.hardware import probe, probe_onnxruntime_genai  # noqa: E402
from agent.update.compat import check_manifest  # noqa: E402
from agent.wire.canary import judge_leads  # noqa: E402
from agent.wire.manifest import MANIFEST_FILENAME, Manifest  # noqa: E402
from agent.wire.worker import ChatMessage, SamplingOptions, TokenEvent  # noqa: E402

DECODE_TOKENS = 128
PROMPT = "Write three sentences about the sea."


def decode_speed(runtime: ModelRuntime, prompt_ids: list[int]) -> tuple[float, list[int]]:
    """Greedy tokens per second over DECODE_TOKENS (after one warm-up run), and the tokens."""
    options = SamplingOptions(temperature=0.0, max_tokens=DECODE_TOKENS)
    best, ids = 0.0, list[int]()
    for _ in range(3):
        ids = []
        started = time.perf_counter()
        for step in runtime.generate(prompt_ids, options):
            ids.extend(step.token_ids)
        best = max(best, len(ids) / (time.perf_counter() - started))
    return best, ids


def gpu_memory_in_use() -> str:
    """What nvidia-smi says each process holds on the GPU (the worker's share is the model's)."""
    try:
        return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except OSError as e:
        return f"nvidia-smi: {e}"


async def activate_and_chat(artifact: Path, manifest: Manifest) -> dict[str, Any]:
    host = ModelHost(parallel=1, queue_size=1)
    try:
        started = time.perf_counter()
        await host.switch(artifact, canary=manifest.evaluation.canary)
        activated_s = time.perf_counter() - started
        parts = [event.text async for _, event in host.generate(
            messages=[ChatMessage(role="user", content=PROMPT)],
            options=SamplingOptions(temperature=0.0, max_tokens=64)) if isinstance(event, TokenEvent)]
        text = "".join(parts)
        return {"activated": True, "activation_s": round(activated_s, 2), "chat_answer": text,
                "worker_gpu_memory": gpu_memory_in_use()}
    except Exception as e:  # noqa: BLE001 - reported, the check goes on with the next artifact
        return {"activated": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        await host.close()


def update_once_then_serve(artifact: Path) -> dict[str, Any]:
    from builder.demo.ports import free_port
    from testkit.artifacts import release_to_new_device, serving
    from testkit.waits import wait_until

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo, state = release_to_new_device(root, artifact)
        with serving(repo.www_dir) as (url, _):
            (root / "agent.toml").write_text(f'device_id = "gpu-box"\nchannel = "stable"\nrepo_url = "{url}"\n'
                                             f'state_dir = "{state}"\n')
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "agent.cli", "update", "--once", "--config",
                                   str(root / "agent.toml"), "--json"], capture_output=True, text=True, timeout=300)
        out: dict[str, Any] = {"update_once_exit": done.returncode,
                               "update_once_s": round(time.perf_counter() - started, 1),
                               "update_once": done.stdout.strip()[-500:] or done.stderr.strip()[-1500:]}
        if done.returncode != 0:
            return out
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--model", str(state / "current"),
                                   "--port", str(port)], stderr=subprocess.PIPE, text=True)
        try:
            base = f"http://127.0.0.1:{port}"

            def healthy() -> bool:
                try:
                    return requests.get(f"{base}/healthz", timeout=2).status_code == 200
                except requests.ConnectionError:
                    return False

            wait_until(healthy, 120, "edge-agent serve to answer")
            reply = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 48, "temperature": 0})
            out["serve_status"] = reply.status_code
            out["serve_answer"] = reply.json()["choices"][0]["message"]["content"] if reply.ok else reply.text[:500]
        finally:
            server.terminate()
            out["serve_stderr_tail"] = server.communicate(timeout=60)[1][-800:]
        return out


def check(artifact: Path) -> dict[str, Any]:
    manifest = Manifest.model_validate_json((artifact / MANIFEST_FILENAME).read_bytes())
    with tempfile.TemporaryDirectory() as state:
        shortfalls = check_manifest(manifest, probe(Path(state)))
    out: dict[str, Any] = {"artifact": str(artifact), "target": manifest.requirements.execution_provider,
                           "precision": manifest.build.precision,
                           "compatible": not shortfalls, "shortfalls": [s.detail for s in shortfalls]}
    out.update(asyncio.run(activate_and_chat(artifact, manifest)))
    out.update(update_once_then_serve(artifact))
    canary = manifest.evaluation.canary
    speeds: dict[str, float] = {}
    greedy: dict[str, list[int]] = {}
    for where, providers in (("cuda", None), ("cpu", [])):
        try:
            runtime = ModelRuntime(artifact, providers=providers)
        except Exception as e:  # noqa: BLE001 - reported
            out[f"{where}_error"] = f"{type(e).__name__}: {e}"
            continue
        try:
            if where == "cuda" and canary.expected_leads is not None:
                leads = runtime.teacher_forced_leads(canary.prompt, canary.expected_token_ids)
                verdict = judge_leads(canary.expected_leads, leads)
                out["canary_on_cuda"] = {"passed": verdict.passed, "worst_change": round(verdict.worst_change, 4),
                                         "worst_position": verdict.worst_position}
            prompt_ids = runtime.encode(runtime.apply_chat_template([ChatMessage(role="user", content=PROMPT)]))
            speeds[where], greedy[where] = decode_speed(runtime, prompt_ids)
        finally:
            runtime.close()
    out["decode_tok_s"] = {k: round(v, 1) for k, v in speeds.items()}
    if len(speeds) == 2:
        out["cuda_over_cpu"] = round(speeds["cuda"] / speeds["cpu"], 2)
        pairs = zip(greedy["cuda"], greedy["cpu"], strict=False)
        # None: the two providers chose the same tokens throughout
        out["greedy_first_difference"] = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    runtime = probe_onnxruntime_genai()
    results: dict[str, Any] = {"runtime": runtime.model_dump(), "artifacts": []}
    print(json.dumps(results["runtime"]), flush=True)
    for artifact in args.artifacts:
        result = check(artifact)
        results["artifacts"].append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("activated") and r["compatible"] for r in results["artifacts"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

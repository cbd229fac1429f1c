"""The agent on aarch64: an x86-built INT4 SmolLM2 installs, passes its canary on ARM kernels,
answers through the OpenAI API, and a SIGKILL mid-update resumes; the mobile build too.

EMULATION, named as such: a Debian arm64 root under qemu-user (`testkit.arm64`). The ARM
kernels' numerics are real, so the canary meets the near-ties that flip on ARM; the timings
are not an ARM board's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.update.updater import TEST_STOP_AT_ENV
from agent.wire.canary import LEAD_TOLERANCE
from agent.wire.channel import ChannelFile
from agent.wire.errors import ExitCode
from agent.wire.manifest import MANIFEST_FILENAME, Manifest
from builder.build.sandbox import Arm64Sandbox
from builder.demo.ports import free_port
from testkit.arm64 import ArmDevice, CliBuild, switch_on_arm
from testkit.artifacts import new_repo, serving
from testkit.broken_models import damage_weights, swap_past_key_value_inputs, swap_tensors, truncate_tensor_file
from testkit.waits import wait_until


@pytest.fixture(scope="module")
def arm_builds(arm64: Arm64Sandbox, model_cache_dir: Path, builder_cache_dir: Path,
               smollm2_mobile_arm: CliBuild) -> tuple[Path, Path]:
    """SmolLM2 v1 (cpu, through the Python API) and v2 (mobile, through `edge-builder build`), each
    with its canary replayed on aarch64 at build time."""
    from builder.build.pipeline import BuildRequest, build_artifact

    v1 = model_cache_dir / "smollm2-arm-v1"
    if not (v1 / MANIFEST_FILENAME).is_file():
        build_artifact(BuildRequest(source="smollm2-135m", out_dir=v1, name="smollm2", version=1, context_length=2048,
                                    check_arches=["aarch64"], cache_dir=builder_cache_dir))
    v2 = smollm2_mobile_arm.out
    assert Manifest.model_validate_json((v2 / MANIFEST_FILENAME).read_bytes()).build.profile == "mobile"
    return v1, v2


def _is_healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def _canary_change(stderr: str) -> float:
    found = re.findall(r"event=canary_passed .*worst_change=(-?[0-9.]+)", stderr)
    assert found, f"no canary verdict in the agent's log:\n{stderr[-3000:]}"
    return float(found[-1])


def test_mobile_profile_build_caps_context_and_needs_less_ram(smollm2_artifact: Path,
                                                              smollm2_mobile_arm: CliBuild) -> None:
    """The mobile build (`edge-builder build --profile mobile`) is the one the ARM device installs."""
    out = smollm2_mobile_arm.out
    if smollm2_mobile_arm.stderr:  # built in this run: stage-by-stage progress, then a one-line summary
        assert "[1/11] check options and output: done" in smollm2_mobile_arm.stderr
        assert "built smollm2 v2" in smollm2_mobile_arm.stderr
    mobile = Manifest.model_validate_json((out / MANIFEST_FILENAME).read_bytes())
    cpu = Manifest.model_validate_json((smollm2_artifact / MANIFEST_FILENAME).read_bytes())
    assert (mobile.build.profile, mobile.build.builder_options) == ("mobile", {"block_size": "32",
                                                                              "accuracy_level": "4"})
    assert mobile.model_info.context_length == 2048
    assert json.loads((out / "genai_config.json").read_text())["search"]["max_length"] == 2048
    assert mobile.requirements.min_ram_bytes < cpu.requirements.min_ram_bytes


def test_builds_checked_on_aarch64_say_so_and_an_x86_only_build_is_refused(
        arm64: Arm64Sandbox, arm_builds: tuple[Path, Path], smollm2_artifact: Path, tmp_path: Path) -> None:
    for build in arm_builds:
        assert {"x86_64", "aarch64"} <= set(Manifest.model_validate_json(
            (build / MANIFEST_FILENAME).read_bytes()).requirements.arch)
    x86_only = Manifest.model_validate_json((smollm2_artifact / MANIFEST_FILENAME).read_bytes())
    assert x86_only.requirements.arch == ["x86_64", "AMD64"]  # built and checked on this x86 host only
    repo = new_repo(tmp_path / "repo")
    repo.publish(smollm2_artifact)
    repo.set_channel(ChannelFile(channel="stable", model=x86_only.name, version=x86_only.version))
    with serving(repo.www_dir) as (url, faults):
        device = ArmDevice(arm64, "arm-refuses", url)
        device.provision(repo.metadata_dir / "root.json")
        done, _ = device.update_once()
    assert done.returncode == ExitCode.INCOMPATIBLE, done.stderr[-2000:]
    assert "is built for x86_64, AMD64, this device is aarch64" in done.stderr
    assert not any("model.onnx" in path for path, _ in faults.requests)  # refused before any download
    assert device.current() is None


def test_an_arm_device_installs_resumes_after_sigkill_and_answers(arm64: Arm64Sandbox,
                                                                  arm_builds: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    v1, v2_mobile = arm_builds
    repo = new_repo(tmp_path / "repo")
    repo.publish(v1)
    repo.set_channel(ChannelFile(channel="stable", model="smollm2", version=1))
    with serving(repo.www_dir) as (url, _):
        device = ArmDevice(arm64, "arm-1", url)
        device.provision(repo.metadata_dir / "root.json")
        done, outcome = device.update_once()
        assert done.returncode == 0 and outcome["status"] == "installed" and outcome["version"] == 1, done.stderr
        # ARM kernels do not compute what x86's do (the greedy decode diverges, see the README),
        # yet every lead stays within the tolerance.
        change = _canary_change(done.stderr)
        assert 0.01 < abs(change) <= LEAD_TOLERANCE
        current = device.current()
        assert current is not None and current.name == "1"

        # v2 (mobile profile): the agent SIGKILLs itself right after journaling DOWNLOADING.
        repo.publish(v2_mobile)
        repo.set_channel(ChannelFile(channel="stable", model="smollm2", version=2))
        killed, _ = device.update_once(env={TEST_STOP_AT_ENV: "DOWNLOADING"})
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert device.current() == current  # v1 still serves
        done, outcome = device.update_once()
        assert done.returncode == 0 and outcome["status"] == "installed" and outcome["version"] == 2, done.stderr
        assert abs(_canary_change(done.stderr)) <= LEAD_TOLERANCE
        current = device.current()
        assert current is not None and current.name == "2"

        # The mobile build answers through the OpenAI API on ARM.
        port = free_port()
        log_path = tmp_path / "serve.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen(arm64.python(["-m", "agent.cli", "serve", "--model", str(current), "--port",
                                                    str(port), "--threads", "1"]),
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: server.poll() is not None or _is_healthy(port), 300, "the ARM server to answer",
                       detail=lambda: log_path.read_text(errors="replace")[-2000:])
            assert server.poll() is None, log_path.read_text(errors="replace")[-3000:]
            r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300, json={
                "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"].strip()
        finally:
            os.killpg(server.pid, signal.SIGKILL)  # the server and its model worker
            server.wait(30)


def test_doctor_on_arm_reports_arm_features(arm64: Arm64Sandbox, arm_builds: tuple[Path, Path]) -> None:
    arm64.path("/tmp/manifest.json").write_bytes((arm_builds[1] / MANIFEST_FILENAME).read_bytes())
    done = arm64.run(["-m", "agent.cli", "doctor", "--json", "--manifest", "/tmp/manifest.json"])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    hardware = report["hardware"]
    assert hardware["arch"] == "aarch64" and report["is_compatible"] is True
    assert {"asimd", "neon"} <= set(hardware["cpu_features"])  # the kernel's hwcaps, not the x86 host's cpuinfo
    assert not any(f.startswith("avx") for f in hardware["cpu_features"])


@pytest.mark.parametrize(("breakage", "reason"), [
    (damage_weights, "failed its canary: the lead of canary token"),
    (swap_tensors, "failed its canary: the lead of canary token"),
    (truncate_tensor_file, "failed to load"),
    (swap_past_key_value_inputs, "failed its canary: the lead of canary token"),
], ids=["damaged-weights", "swapped-tensor", "truncated-tensor-file", "wrong-genai-config"])
def test_an_arm_device_refuses_each_broken_model(arm64: Arm64Sandbox, arm_builds: tuple[Path, Path], tmp_path: Path,
                                                 breakage: Callable[[Path], None], reason: str) -> None:
    """The same broken copies as on x86 (tests/integration/test_canary.py), judged by ARM's numerics."""
    good = arm_builds[0]
    canary = Manifest.model_validate_json((good / MANIFEST_FILENAME).read_bytes()).evaluation.canary
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    breakage(broken)
    refused = switch_on_arm(arm64, broken, canary.model_dump_json())
    assert refused is not None and reason in refused, refused


def test_an_arm_device_refuses_another_models_manifest(arm64: Arm64Sandbox, arm_builds: tuple[Path, Path],
                                                       tiny_raw: Path) -> None:
    canary = Manifest.model_validate_json((arm_builds[0] / MANIFEST_FILENAME).read_bytes()).evaluation.canary
    refused = switch_on_arm(arm64, tiny_raw, canary.model_dump_json())
    assert refused is not None and "failed its canary: the lead of canary token" in refused, refused


# Run inside the sandbox: the agent's own runtime and prefix cache on the ARM kernels.
_CELLS_ON_ARM = """
import json, sys
from pathlib import Path
from agent.serving import oga
from agent.serving.prefix_cache import PrefixCache
from agent.serving.runtime import ModelRuntime
from agent.wire.worker import ChatMessage, SamplingOptions

runtime = ModelRuntime(Path(sys.argv[1]), intra_op_num_threads=2)
ids = runtime.encode(runtime.apply_chat_template([ChatMessage(role="user", content="Count to five.")]))

def last_logits(*splits):
    generator = oga.Generator(runtime.model, {"max_length": len(ids) + 1, "do_sample": False})
    start = 0
    for end in (*splits, len(ids)):
        generator.append_tokens(ids[start:end])
        start = end
    logits = list(generator.logits())
    generator.close()
    return logits

def answer(cache):
    generation = runtime.start(ids, SamplingOptions(temperature=0.0, max_tokens=16), cache)
    tokens = []
    while not generation.is_done:
        tokens += generation.step().token_ids
    reused = generation.reused_tokens
    generation.release()
    return tokens, reused

cache = PrefixCache(64 << 20, runtime.kv_bytes_per_token)
fresh = answer(None)[0]
answer(cache)
again, reused = answer(cache)
print(json.dumps({"tokens": len(ids), "split_changes_logits": last_logits(len(ids) - 3) != last_logits(),
                  "fresh": fresh, "again": again, "reused": reused}))
"""


def _run_on_arm(arm64: Arm64Sandbox, script: str, model_dir: Path) -> dict[str, Any]:
    """`script` run by the sandbox's Python with a copy of `model_dir` as its argument; the JSON of
    its last line."""
    inside = "/tmp/edgefleet-model"
    shutil.rmtree(arm64.path(inside), ignore_errors=True)
    shutil.copytree(model_dir, arm64.path(inside))
    try:
        done = arm64.run(["-c", script, inside])
    finally:
        shutil.rmtree(arm64.path(inside), ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_reused_prompt_answers_as_fresh_on_the_arm_kernels(arm64: Arm64Sandbox, smollm2_int4_raw: Path) -> None:
    """On aarch64 even block 32 rounds a prompt otherwise by how it is split into batches (measured:
    its last 3 tokens prefilled alone change the logits of 4 in 10 chat prompts); the prefix cache's
    cells keep a reused prompt's answer the fresh one's (agent/serving/prefix_cache.py)."""
    result = _run_on_arm(arm64, _CELLS_ON_ARM, smollm2_int4_raw)
    assert result["split_changes_logits"]  # the hazard is real on these kernels, for this prompt
    assert result["reused"] == (result["tokens"] - 1) // 16 * 16  # whole cells, the last token left
    assert result["again"] == result["fresh"] and result["fresh"]


# Run inside the sandbox: the worker's batched decode on the ARM kernels, as the worker steps it.
_BATCH_ON_ARM = """
import json, sys
from pathlib import Path
from agent.serving.generation import decode_all
from agent.serving.runtime import ModelRuntime
from agent.wire.worker import ChatMessage, SamplingOptions

runtime = ModelRuntime(Path(sys.argv[1]), intra_op_num_threads=2, batch=True)
options = SamplingOptions(temperature=0.0, max_tokens=8)
prompts = [runtime.encode(runtime.apply_chat_template([ChatMessage(role="user", content=c)]))
           for c in ("Count to five.", "Name a color.", "What is two plus two?")]

def serve(batch, starts):
    generations, round_ = {}, 0
    while len(generations) < len(batch) or any(not g.is_done for g in generations.values()):
        for i, p in enumerate(batch):
            if starts[i] == round_:
                generations[i] = runtime.start_batched(p, options)
        decoding = [g for g in generations.values() if g.is_decoding]
        decode_all(decoding)
        for g in generations.values():
            if g not in decoding and not g.is_done:
                g.prefill_step()
        round_ += 1
    for g in generations.values():
        g.release()
    return [generations[i].completion_ids for i in range(len(batch))]

alone = [serve([p], [0])[0] for p in prompts]
together = serve(prompts, [0, 2, 3])
print(json.dumps({"row_multiple": runtime.decoder.row_multiple, "alone": alone, "together": together}))
"""


def test_batched_answers_on_the_arm_kernels_do_not_depend_on_load(arm64: Arm64Sandbox,
                                                                   smollm2_int4_raw: Path) -> None:
    """The batched decode probes the ARM kernels for how they group rows when it loads; requests
    joining a run beside others then answer as they do alone."""
    result = _run_on_arm(arm64, _BATCH_ON_ARM, smollm2_int4_raw)
    assert result["row_multiple"] in (1, 2, 4, 8)
    assert result["together"] == result["alone"] and all(result["alone"])

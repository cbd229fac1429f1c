"""A fleet of real agent processes for rollout tests and bench/fleet.py.

Models: tiny random-weight Llamas (testkit/models.py: hidden 64, 2 layers,
SmolLM2's tokenizer) built once with the real ORT-GenAI builder (INT4, CPU), one per seed, so two
versions really differ in their weight files (a rollout downloads them) while
the tokenizer files are shared blobs. Their canary is measured here with a real
greedy run, so a real agent's activation passes; a "broken" build is the same
files with a canary that cannot match, signed and published like any other
(a device downloads it, fails activation and rolls back).

Agents: each is `python -m agent.cli run --config agent.toml` with its own
state dir, device id and API port, killed in `Fleet.close()` (also on failure).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.wire.manifest import MANIFEST_FILENAME, Manifest
from builder.demo.ports import free_port
from builder.release.repository import TufRepo
from testkit.artifacts import manifest_dict
from testkit.cache import made_once
from testkit.env import subprocess_env
from testkit.models import make_tiny_model

CANARY_PROMPT = "The capital of France is"
CANARY_TOKENS = 4


def greedy_ids(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    ids = list(tokenizer.encode(prompt))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(ids):]


def tiny_int4_build(cache: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A raw ORT-GenAI INT4 build of a tiny random Llama (cached under `cache`)."""
    from builder.build.ortbuild import run_ort_builder

    hf = made_once(cache / f"fleet-tiny-llama-s{seed}-hf", "config.json",
                   lambda tmp: make_tiny_model("llama", tmp, tokenizer_dir=tokenizer_dir, seed=seed))
    return made_once(cache / f"fleet-tiny-llama-s{seed}-int4", "genai_config.json", lambda tmp: run_ort_builder(
        hf, tmp, precision="int4", execution_provider="cpu", cache_dir=cache / "ort-cache",
        extra_options={"block_size": "32"}))


def make_fleet_artifact(raw: Path, out: Path, name: str, version: int, *, is_broken: bool = False) -> Path:
    """An artifact dir (files + manifest) of `raw` as `name` v`version`, canary measured for real.

    `is_broken`: the canary expects tokens the model never produces, so activation fails on every device.
    """
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(raw, out)
    entries: dict[str, tuple[int, str]] = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            entries[p.relative_to(out).as_posix()] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    data = manifest_dict(name, version, entries)
    expected = greedy_ids(raw, CANARY_PROMPT, CANARY_TOKENS)
    if is_broken:
        expected = [(t + 1) % 49152 for t in expected]
    data["evaluation"]["canary"] = {"prompt": CANARY_PROMPT, "max_new_tokens": CANARY_TOKENS,
                                    "expected_token_ids": expected}
    data["requirements"]["min_ram_bytes"] = 64 << 20
    data["requirements"]["min_free_disk_bytes"] = 64 << 20
    data["model_info"].update({"parameter_count": 6_400_000, "context_length": 512})
    (out / MANIFEST_FILENAME).write_text(Manifest.model_validate(data).model_dump_json(indent=2))
    return out


@dataclass
class Agent:
    device_id: str
    state_dir: Path
    config_path: Path
    api_port: int
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Fleet:
    """Real `edge-agent run` processes, one per device."""

    agents: list[Agent] = field(default_factory=list)

    def start(self) -> None:
        env = subprocess_env()
        for a in self.agents:
            log = open(a.state_dir.parent / f"{a.device_id}.log", "ab")
            a.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(a.config_path)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()

    def dead(self) -> list[str]:
        return [a.device_id for a in self.agents if a.proc is not None and a.proc.poll() is not None]

    def log_tail(self, device_id: str, n: int = 30) -> str:
        a = next(a for a in self.agents if a.device_id == device_id)
        try:
            return "\n".join((a.state_dir.parent / f"{a.device_id}.log").read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def close(self) -> None:
        for a in self.agents:
            if a.proc is not None and a.proc.poll() is None:
                a.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for a in self.agents:
            if a.proc is None:
                continue
            try:
                a.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait(10)


def make_fleet(root: Path, repo: TufRepo, repo_url: str, broker_url: str, fleet: str, n: int,
               channel: str = "stable", prefix: str = "dev", poll_interval_s: int = 3600,
               probation_s: float | None = None) -> Fleet:
    """Provision `n` devices (root.json + agent.toml) under `root`; not started yet.

    The poll interval is long on purpose: updates then come from the doorbell, as in production.
    `probation_s`: None keeps the agent's default (checks wait until a switch's window ends).
    """
    agents: list[Agent] = []
    ports: set[int] = set()
    for i in range(n):
        device_id = f"{prefix}-{i:03d}"
        state_dir = root / device_id / "state"
        (state_dir / "trust").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo.metadata_dir / "root.json", state_dir / "trust" / "root.json")
        port = free_port()
        while port in ports:  # the kernel may hand the same free port out twice in a row
            port = free_port()
        ports.add(port)
        config_path = root / device_id / "agent.toml"
        config_path.write_text(
            f'device_id = "{device_id}"\nfleet = "{fleet}"\nchannel = "{channel}"\nrepo_url = "{repo_url}"\n'
            f'state_dir = "{state_dir}"\napi_bind = "127.0.0.1:{port}"\nbroker_url = "{broker_url}"\n'
            f"poll_interval_s = {poll_interval_s}\ntelemetry_interval_s = 60\nintra_op_num_threads = 1\n"
            + (f"probation_s = {probation_s}\n" if probation_s is not None else ""))
        agents.append(Agent(device_id, state_dir, config_path, port))
    return Fleet(agents)


def status_summary(statuses: dict[str, dict[str, object]]) -> dict[tuple[object, object, object], int]:
    """(state, model, version) -> count, for assertion messages."""
    out: dict[tuple[object, object, object], int] = {}
    for s in statuses.values():
        key = (s.get("state"), s.get("model"), s.get("version"))
        out[key] = out.get(key, 0) + 1
    return out


def retained_statuses(messages: list[object]) -> dict[str, dict[str, object]]:
    """The last status payload per device from a Recorder's messages."""
    out: dict[str, dict[str, object]] = {}
    for m in messages:
        topic = getattr(m, "topic", "")
        payload = getattr(m, "payload", b"")
        if topic.endswith("/status") and payload:
            data = json.loads(payload)
            out[str(data["device_id"])] = data
    return out

"""`make demo` (`python -m builder.demo`): the whole story on one machine, with real parts.

1. an MQTT broker on a free port (Mosquitto when installed, else embedded amqtt);
2. `edge-builder build smollm2-135m`: SmolLM2-135M -> INT4 CPU artifact, quality gate figures;
3. `edge-builder repo init`, `publish`, `channel set stable`, `serve`;
4. two `edge-agent run` daemons (own state dir, device id, API port), provisioned with root.json only;
5. both report ACTIVE over MQTT (retained status); `edge-builder fleet status`;
6. one streamed question to each device's OpenAI-compatible API;
7. v2 (another quantization recipe) rolled out in two waves (`edge-builder rollout --waves 50,100`)
   while a client keeps prompting both devices: every request must succeed;
8. where everything lives and how to point a real device at it.

Every process runs in its own process group and is stopped (SIGTERM, then SIGKILL)
on exit, on an error, on Ctrl-C and on SIGTERM/SIGHUP (see builder.demo.procs).
The work dir is reused: builds (and the builder cache) stay, the rest (`run/`) is
made afresh, so a second run skips the minutes of building.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import paho.mqtt.client as mqtt
import requests
from paho.mqtt.enums import CallbackAPIVersion

from agent.wire.channel import cohort_bucket
from agent.wire.errors import DemoError, EdgefleetError, ExitCode, require
from agent.wire.manifest import Manifest
from builder import IMPORT_ROOT
from builder.build import package
from builder.demo.broker import BROKER_CHOICES, broker_command, choose_broker
from builder.demo.client import FleetWatcher, PromptLoop, StatusChange, stream_chat
from builder.demo.display import Display
from builder.demo.ports import free_port
from builder.demo.procs import ManagedProcess, ProcessSet, kill_leftovers
from builder.demo.summary import (
    ArtifactFigures,
    BrokerInfo,
    DemoSummary,
    DeviceInfo,
    ProcessInfo,
    RepoInfo,
    RolloutInfo,
    StatusChangeInfo,
)
from builder.fleet.view import FleetReport

log = logging.getLogger(__name__)

STEPS = 8
FLEET = "demo"
CHANNEL = "stable"
MODEL = "smollm2"
DEVICE_IDS = ("demo-box-1", "demo-box-2")
WAVES = (50, 100)
V2_RECIPE = ["--algo", "k_quant_mixed"]  # README builder table: 1.145x fp32 ppl, passes the 1.5 gate
QUESTIONS = ("What is the capital of France?", "Name three colours of the rainbow.")
QUICK_CONTEXT_LENGTH = 2048
_READY_TIMEOUT_S = 30.0
_ACTIVE_TIMEOUT_S = 300.0


class _Stop(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C, through every `finally`."""


@dataclass
class _Settings:
    workdir: Path
    cache_dir: Path
    artifacts_dir: Path
    summary_path: Path
    broker: str
    listen_host: str
    quick: bool
    keep_running: bool
    as_json: bool

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def answer_tokens(self) -> int:
        return 32 if self.quick else 96

    @property
    def loop_tokens(self) -> int:
        return 12 if self.quick else 40

    @property
    def context_args(self) -> list[str]:
        return ["--context-length", str(QUICK_CONTEXT_LENGTH)] if self.quick else []


@dataclass
class _Device:
    device_id: str
    api_port: int
    home: Path
    proc: ManagedProcess | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    @property
    def config_file(self) -> Path:
        return self.home / "agent.toml"

    @property
    def log_file(self) -> Path:
        return self.home / "agent.log"


@dataclass
class _Run:
    settings: _Settings
    display: Display
    procs: ProcessSet
    summary: DemoSummary
    broker_url: str = ""
    repo_url: str = ""
    repo_dir: Path = Path()
    devices: list[_Device] = field(default_factory=list)
    watcher: FleetWatcher | None = None


# -- helpers -------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    """This checkout first on sys.path, unbuffered output, and no EDGE_AGENT_* of the caller:
    the demo's agents are configured by their agent.toml alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    root = str(IMPORT_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(tool: str, *args: str) -> list[str]:
    module = {"edge-builder": "builder.cli", "edge-agent": "agent.cli"}[tool]
    return [sys.executable, "-m", module, *args]


def _shown(argv: list[str]) -> str:
    """The command as an operator would type it (`edge-builder ...`, not `python -m builder.cli ...`)."""
    if argv[:2] == [sys.executable, "-m"] and argv[2] in ("builder.cli", "agent.cli"):
        tool = "edge-builder" if argv[2] == "builder.cli" else "edge-agent"
        return shlex.join([tool, *argv[3:]])
    return shlex.join(argv)


def _run_command(run: _Run, name: str, argv: list[str], *, show_output: bool = True) -> tuple[int, str]:
    """Run a command to completion in its own process group, its output shown indented as it comes.

    Raises:
        DemoError: it could not start.
    """
    run.display.info(f"$ {_shown(argv)}")
    proc = run.procs.start(name, argv, env=_child_env(), pipe_output=True)
    lines: list[str] = []
    stdout = require(proc.popen.stdout, f"the output pipe of {name}")
    run.display.live(f"{argv[3] if len(argv) > 3 else name} running")  # TTY: elapsed time between its lines
    try:
        for raw in stdout:
            line = raw.decode(errors="replace").rstrip("\n").split("\r")[-1]
            lines.append(line)
            if show_output and line.strip():
                run.display.info("  " + line)
        rc = proc.popen.wait()
    finally:
        run.display.live("")
    run.procs.forget(proc)
    return rc, "\n".join(lines)


def _check(rc: int, what: str, output: str) -> None:
    if rc != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise DemoError(f"{what} failed with exit code {rc}:\n{tail}")


def _wait_http_ok(url: str, timeout_s: float, what: str, alive: ManagedProcess) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if not alive.is_running():
            raise DemoError(f"{what} exited with {alive.popen.returncode}:\n{alive.log_tail()}")
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not answer {url} within {timeout_s:.0f}s:\n{alive.log_tail()}")
        time.sleep(0.1)


def _wait_broker(port: int, proc: ManagedProcess, timeout_s: float) -> None:
    """Ready means an MQTT CONNACK, not only an open port."""
    deadline = time.monotonic() + timeout_s
    while True:
        connacked = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-probe-{uuid.uuid4().hex[:8]}")
        client.on_connect = lambda c, u, f, rc, p, done=connacked: done.set() if not rc.is_failure else None
        try:
            client.connect("127.0.0.1", port, keepalive=10)
            client.loop_start()
            if connacked.wait(2):
                return
        except OSError:
            pass
        finally:
            client.disconnect()
            client.loop_stop()
        if not proc.is_running():
            raise DemoError(f"the broker exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise DemoError(f"the broker did not accept MQTT connections on port {port} within {timeout_s:.0f}s")
        time.sleep(0.2)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _host_address(listen_host: str) -> str:
    """The address a real device would use: this host's outward IP when listening on all interfaces."""
    if listen_host not in ("0.0.0.0", "::"):
        return listen_host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outward interface
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


# -- the steps -------------------------------------------------------------------
def step_broker(run: _Run) -> None:
    s = run.settings
    kind = choose_broker(s.broker)
    port = free_port()
    workdir = s.run_dir / "broker"
    argv = broker_command(kind, port, workdir, host=s.listen_host)
    proc = run.procs.start("broker", argv, env=_child_env(), log_path=workdir / "broker.log")
    _wait_broker(port, proc, _READY_TIMEOUT_S)
    run.broker_url = f"mqtt://127.0.0.1:{port}"
    run.summary.broker = BrokerInfo(kind=kind, url=run.broker_url, pid=proc.pid)
    why = ("installed" if kind == "mosquitto" else
           "embedded Python broker, " + ("--broker amqtt" if s.broker == "amqtt" else "Mosquitto is not installed"))
    run.display.info(f"{kind} ({why}) on {run.broker_url}, pid {proc.pid}, log {workdir / 'broker.log'}")


def _build(run: _Run, version: int, recipe: list[str], dirname: str, label: str) -> ArtifactFigures:
    s = run.settings
    out = s.artifacts_dir / dirname
    argv = _cli("edge-builder", "build", "smollm2-135m", "-o", str(out), "--name", MODEL, "--version", str(version),
                "--label", label, "--cache-dir", str(s.cache_dir), *recipe, *s.context_args)
    t0 = time.monotonic()
    rc, output = _run_command(run, f"build-v{version}", argv)
    _check(rc, f"edge-builder build (v{version})", output)
    m: Manifest = package.read_manifest(out)
    ev = m.evaluation
    figures = ArtifactFigures(
        name=m.name, version=m.version, out_dir=str(out), is_reused="already built" in output,
        recipe=" ".join(recipe) or "default (int4 RTN, block 32, accuracy level 4)",
        build_s=round(time.monotonic() - t0, 1), perplexity=ev.perplexity,
        reference_perplexity=ev.reference_perplexity, perplexity_ratio=ev.perplexity_ratio,
        max_perplexity_ratio=ev.max_perplexity_ratio, decode_tokens_per_s=ev.decode_tokens_per_s,
        prefill_tokens_per_s=ev.prefill_tokens_per_s, total_file_bytes=m.total_file_bytes,
        peak_rss_bytes=ev.peak_rss_bytes, min_ram_bytes=m.requirements.min_ram_bytes,
        context_length=m.model_info.context_length)
    run.summary.artifacts.append(figures)
    run.display.info(
        f"quality gate passed: perplexity {ev.perplexity:.2f} vs fp32 reference {ev.reference_perplexity:.2f} "
        f"= {ev.perplexity_ratio:.3f}x (gate {ev.max_perplexity_ratio}x)")
    run.display.info(
        f"speed on this host: {ev.decode_tokens_per_s:.0f} tok/s decode, {ev.prefill_tokens_per_s:.0f} tok/s "
        f"prefill; footprint: {_mib(m.total_file_bytes)} on disk, peak RSS {_mib(ev.peak_rss_bytes)} at "
        f"{m.model_info.context_length} tokens of context, min RAM {_mib(m.requirements.min_ram_bytes)}")
    if figures.is_reused:
        run.display.info(f"(reused the identical build in {out}; delete it to build afresh)")
    return figures


def step_build_v1(run: _Run) -> None:
    _build(run, 1, [], "smollm2-v1" + ("-quick" if run.settings.quick else ""), "demo v1: int4 rtn block 32")


def step_repository(run: _Run) -> None:
    s = run.settings
    run.repo_dir = s.run_dir / "repo"
    v1 = run.summary.artifacts[0]
    for name, argv in (
        ("repo-init", _cli("edge-builder", "repo", "init", str(run.repo_dir))),
        ("publish-v1", _cli("edge-builder", "publish", v1.out_dir, "--repo", str(run.repo_dir))),
        ("channel-set", _cli("edge-builder", "channel", "set", CHANNEL, MODEL, "1", "--repo", str(run.repo_dir))),
    ):
        rc, output = _run_command(run, name, argv)
        _check(rc, name, output)
    port = free_port()
    www = run.repo_dir / "www"
    argv = _cli("edge-builder", "serve", str(www), "--port", str(port), "--host", s.listen_host)
    run.display.info(f"$ {_shown(argv)} &")
    proc = run.procs.start("repo-server", argv, env=_child_env(), log_path=s.run_dir / "logs" / "serve.log")
    run.repo_url = f"http://127.0.0.1:{port}"
    _wait_http_ok(f"{run.repo_url}/metadata/root.json", _READY_TIMEOUT_S, "edge-builder serve", proc)
    run.summary.repo = RepoInfo(repo_dir=str(run.repo_dir), url=run.repo_url,
                                root_json=str(www / "metadata" / "root.json"), channel=CHANNEL,
                                published_versions=[1])
    run.display.info(f"serving {www} on {run.repo_url}, pid {proc.pid}; private keys stay in {run.repo_dir / 'keys'}")


def _agent_toml(run: _Run, dev: _Device) -> str:
    lines = {
        "device_id": dev.device_id, "fleet": FLEET, "channel": CHANNEL, "repo_url": run.repo_url,
        "state_dir": str(dev.state_dir), "api_bind": f"127.0.0.1:{dev.api_port}", "broker_url": run.broker_url,
    }
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in lines.items())
    # Two devices, a build and a client share this host's cores: one ORT thread each. A new model
    # is on probation (its crash rolls it back, checks wait) for 10 s instead of 60: the demo moves on fast.
    return text + ("telemetry_interval_s = 5.0\npoll_interval_s = 60.0\nintra_op_num_threads = 1\n"
                   "probation_s = 10.0\n")


def step_agents(run: _Run) -> None:
    # Subscribed before the agents start, so every state they go through is shown.
    run.watcher = FleetWatcher(run.broker_url, FLEET)
    run.watcher.listener = lambda change: _print_change(run, change)
    root_json = run.repo_dir / "www" / "metadata" / "root.json"
    for device_id in DEVICE_IDS:
        dev = _Device(device_id, free_port(), run.settings.run_dir / "devices" / device_id)
        (dev.state_dir / "trust").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root_json, dev.state_dir / "trust" / "root.json")  # the only provisioning
        dev.config_file.write_text(_agent_toml(run, dev))
        argv = _cli("edge-agent", "run", "--config", str(dev.config_file))
        run.display.info(f"$ {_shown(argv)} &    # {dev.device_id}, API {dev.api_url}")
        dev.proc = run.procs.start(f"agent-{device_id}", argv, env=_child_env(), log_path=dev.log_file)
        run.devices.append(dev)
        run.summary.devices.append(DeviceInfo(
            device_id=device_id, api_url=dev.api_url, state_dir=str(dev.state_dir),
            config_file=str(dev.config_file), log_file=str(dev.log_file), pid=dev.proc.pid))
    run.display.info(f"each state dir holds only trust/root.json (copied from {root_json}) and agent.toml beside it")


def _print_change(run: _Run, change: StatusChange) -> None:
    serving = f"serving v{change.version}" if change.version is not None else "no model yet"
    run.display.info(f"{change.device_id}: {change.state:<12} {serving}{'' if change.online else ', offline'}"
                     f"  [+{change.t_s:.1f}s]")


# A device serves its active version in both: UP_TO_DATE is ACTIVE after a check found nothing new.
_SERVING_STATES = frozenset({"ACTIVE", "UP_TO_DATE"})


def _all_on(report: FleetReport, version: int) -> bool:
    rows = {r.device_id: r for r in report.devices}
    return all(d in rows and rows[d].online and rows[d].state in _SERVING_STATES and rows[d].version == version
               for d in DEVICE_IDS)


def _live_states(run: _Run, report: FleetReport) -> None:
    run.display.live("  ".join(f"{r.device_id}={r.state}" for r in report.devices) or "waiting for a first status")


def step_wait_active(run: _Run) -> None:
    watcher = require(run.watcher, "the demo's fleet watcher")
    agent_names = [f"agent-{d}" for d in DEVICE_IDS]
    watcher.wait_for(lambda r: _all_on(r, 1), _ACTIVE_TIMEOUT_S, "both devices ACTIVE on v1",
                         on_change=lambda r: _live_states(run, r),
                         check=lambda: run.procs.check_alive(*agent_names))
    run.display.live("")
    watcher.listener = None
    report = watcher.report()
    for row in report.devices:
        for info in run.summary.devices:
            if info.device_id == row.device_id:
                info.first_active_version = row.version
    _show_fleet_status(run)


def _show_fleet_status(run: _Run) -> None:
    argv = _cli("edge-builder", "fleet", "status", "--broker", run.broker_url, "--fleet", FLEET)
    rc, output = _run_command(run, "fleet-status", argv, show_output=False)
    _check(rc, "edge-builder fleet status", output)
    run.display.info(output)
    run.summary.fleet_status_table = output


def step_ask(run: _Run) -> None:
    for dev, question in zip(run.devices, QUESTIONS, strict=True):
        run.display.info(f"POST {dev.api_url}/v1/chat/completions (stream) to {dev.device_id}: {question!r}")
        answer = stream_chat(dev.api_url, question, max_tokens=run.settings.answer_tokens, on_text=run.display.text)
        run.display.info("")
        run.display.info(f"({answer.model}, first token after {answer.ttft_ms:.0f} ms, "
                         f"{answer.duration_s:.1f}s in all, finish: {answer.finish_reason})")
        if not answer.text.strip():
            raise DemoError(f"{dev.device_id} answered {question!r} with nothing")
        for info in run.summary.devices:
            if info.device_id == dev.device_id:
                info.question, info.answer, info.answer_ttft_ms = question, answer.text, round(answer.ttft_ms, 1)


def choose_salt(device_ids: tuple[str, ...], first_wave_percent: int) -> str:
    """A cohort salt that puts exactly the first device in the first wave, so the demo shows two waves."""
    for i in range(10_000):
        salt = f"demo-{i}"
        buckets = [cohort_bucket(salt, d) for d in device_ids]
        if buckets[0] < first_wave_percent and all(b >= first_wave_percent for b in buckets[1:]):
            return salt
    raise DemoError("no salt splits the demo devices into two waves")  # never, for two devices


def step_rollout(run: _Run) -> None:
    s = run.settings
    watcher = require(run.watcher, "the demo's fleet watcher")
    _build(run, 2, V2_RECIPE, "smollm2-v2-kquant" + ("-quick" if s.quick else ""), "demo v2: int4 k_quant_mixed")
    v2 = run.summary.artifacts[-1]
    rc, output = _run_command(run, "publish-v2", _cli("edge-builder", "publish", v2.out_dir, "--repo",
                                                      str(run.repo_dir)))
    _check(rc, "edge-builder publish (v2)", output)
    require(run.summary.repo, "the demo's repository summary").published_versions.append(2)

    salt = choose_salt(DEVICE_IDS, WAVES[0])
    loop = PromptLoop({d.device_id: d.api_url for d in run.devices}, max_tokens=s.loop_tokens)
    loop.start()
    run.display.info(f"a client now prompts both devices back to back ({s.loop_tokens} tokens per answer)")
    rollout_t0 = len(watcher.timeline)
    watcher.listener = lambda change: _print_change(run, change)
    try:
        loop.wait_for_requests(1, 120)
        argv = _cli("edge-builder", "rollout", CHANNEL, MODEL, "2", "--repo", str(run.repo_dir),
                    "--broker", run.broker_url, "--fleet", FLEET, "--waves", ",".join(map(str, WAVES)),
                    "--wait", "5m", "--salt", salt)
        rc, output = _run_command(run, "rollout", argv)
        _check(rc, "edge-builder rollout", output)
        watcher.wait_for(lambda r: _all_on(r, 2), _ACTIVE_TIMEOUT_S, "both devices ACTIVE on v2",
                             check=lambda: run.procs.check_alive(*[f"agent-{d}" for d in DEVICE_IDS]))
        # Two more per device: the second of them surely started after the switch to v2.
        loop.wait_for_requests(2, 120)
    finally:
        loop.stop()
        watcher.listener = None
    ok, failed = loop.counts()
    failures = [f"{d}: {e}" for d, x in loop.load.items() for e in x.errors]
    phase = _rollout_phase(run.repo_dir)
    run.summary.rollout = RolloutInfo(
        version=2, waves=list(WAVES), salt=salt,
        first_wave_devices=[d for d in DEVICE_IDS if cohort_bucket(salt, d) < WAVES[0]], phase=phase,
        requests_ok=ok, requests_failed=failed, failures=failures[:20],
        requests_by_device={d: x.ok + x.failed for d, x in loop.load.items()},
        timeline=[StatusChangeInfo(**c.model_dump()) for c in watcher.timeline[rollout_t0:]])
    per_device = ", ".join(f"{d} {x.ok + x.failed}" for d, x in loop.load.items())
    run.display.info(f"requests during the rollout: {ok + failed} ({per_device}), failed: {failed}")
    # A device may be checking again by now (the second wave's release reaches the first wave's device
    # too): the states the summary reports are read with the fleet at rest.
    watcher.wait_for(lambda r: _all_on(r, 2), _ACTIVE_TIMEOUT_S, "both devices at rest on v2")
    for dev in run.devices:
        health = requests.get(f"{dev.api_url}/healthz", timeout=5).json()
        run.display.info(f"{dev.device_id} /healthz: {health}")
        for info in run.summary.devices:
            if info.device_id == dev.device_id:
                info.final_version = health.get("version")
                info.final_state = next((r.state for r in watcher.report().devices
                                         if r.device_id == dev.device_id), None)
    _show_fleet_status(run)
    if failed:
        raise DemoError(f"{failed} request(s) failed during the rollout: {failures[:3]}")


def _rollout_phase(repo_dir: Path) -> str:
    path = repo_dir / "rollouts" / f"{CHANNEL}.json"
    try:
        return str(json.loads(path.read_text()).get("phase", "UNKNOWN"))
    except (OSError, ValueError):
        return "UNKNOWN"


def step_where(run: _Run) -> None:
    s = run.settings
    host = _host_address(s.listen_host)
    broker_port = run.broker_url.rsplit(":", 1)[1]
    repo_port = run.repo_url.rsplit(":", 1)[1]
    lines = [
        f"work dir          {s.workdir}   (summary: {s.summary_path})",
        f"builds            {s.artifacts_dir}   (builder cache: {s.cache_dir})",
        f"TUF repository    {run.repo_dir}   (keys/ private, www/ served on {run.repo_url})",
        f"MQTT broker       {run.broker_url}   (log {s.run_dir / 'broker'})",
    ]
    for dev in run.devices:
        lines.append(f"{dev.device_id:<17} API {dev.api_url}, state {dev.state_dir}, log {dev.log_file}")
    lines += [
        "",
        "point a real device at this host:",
        *( ["  (this run listens on 127.0.0.1 only: rerun with --listen-host 0.0.0.0 to let other machines in)"]
           if s.listen_host in ("127.0.0.1", "localhost") else []),
        f"  1. on the device: pip install {IMPORT_ROOT}   (a copy of this checkout; "
        "the agent side needs no torch)",
        f"  2. copy {run.repo_dir / 'www' / 'metadata' / 'root.json'} to /var/lib/edge-agent/trust/root.json",
        "  3. /etc/edge-agent/agent.toml:",
        '       device_id = "lab-pi-1"',
        f'       fleet = "{FLEET}"',
        f'       repo_url = "http://{host}:{repo_port}"',
        f'       broker_url = "mqtt://{host}:{broker_port}"',
        "  4. edge-agent run --config /etc/edge-agent/agent.toml   (or systemd/edge-agent.service)",
        f"  then: edge-builder fleet watch --broker {run.broker_url} --fleet {FLEET}",
    ]
    run.display.info("\n".join(lines))


# -- main ------------------------------------------------------------------------
def _write_summary(summary: DemoSummary, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(summary.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)


def _settings(args: argparse.Namespace) -> _Settings:
    workdir = Path(args.workdir).expanduser().absolute()
    return _Settings(
        workdir=workdir,
        cache_dir=Path(args.cache_dir).expanduser().absolute() if args.cache_dir else workdir / "cache",
        artifacts_dir=Path(args.artifacts_dir).expanduser().absolute() if args.artifacts_dir else workdir / "artifacts",
        summary_path=Path(args.summary).expanduser().absolute() if args.summary else workdir / "summary.json",
        broker=args.broker, listen_host=args.listen_host, quick=args.quick, keep_running=args.keep_running,
        as_json=args.json)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m builder.demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The edgefleet demo: build, sign, serve, run two devices, ask them, roll out v2.",
        epilog="examples:\n  make demo\n  python -m builder.demo --quick\n"
               "  python -m builder.demo --keep-running --listen-host 0.0.0.0   # then point a real device at it\n\n"
               + ExitCode.help_text())
    p.add_argument("--workdir", default="demo-out",
                   help="where everything goes; reused, so builds are not repeated (default: ./demo-out)")
    p.add_argument("--cache-dir", default=None, help="builder cache (default: WORKDIR/cache)")
    p.add_argument("--artifacts-dir", default=None, help="where the builds go (default: WORKDIR/artifacts)")
    p.add_argument("--summary", default=None, help="the JSON summary file (default: WORKDIR/summary.json)")
    p.add_argument("--broker", choices=BROKER_CHOICES, default="auto",
                   help="auto: mosquitto when installed, else the embedded amqtt broker (default: auto)")
    p.add_argument("--listen-host", default="127.0.0.1",
                   help="address the broker and repository server bind (default: 127.0.0.1; 0.0.0.0 lets "
                        "real devices in)")
    p.add_argument("--quick", action="store_true",
                   help=f"short run for tests: context capped at {QUICK_CONTEXT_LENGTH} tokens, short answers")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the broker, repository server and both devices up until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout at the end")
    return p


def _install_signal_handlers() -> None:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    # Ctrl-C (SIGINT) stops the demo however it was started: Python leaves SIGINT ignored when it
    # inherits it so, as every command started with `&` by a shell without job control (CI runners).
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_demo(settings: _Settings) -> DemoSummary:
    display = Display(STEPS)
    record = settings.workdir / "processes.json"
    killed = kill_leftovers(record, str(settings.run_dir))
    if killed:
        display.info(f"stopped {len(killed)} process(es) left running by an earlier demo that was killed: {killed}")
    settings.workdir.mkdir(parents=True, exist_ok=True)
    procs = ProcessSet(record)
    summary = DemoSummary(quick=settings.quick, workdir=str(settings.workdir))
    run = _Run(settings, display, procs, summary)
    atexit.register(procs.stop_all)
    t0 = time.monotonic()
    steps = [
        ("start the MQTT broker", step_broker),
        ("build SmolLM2-135M v1 (INT4, CPU) and run the quality gate", step_build_v1),
        ("sign v1 into a TUF repository, set channel stable, serve it", step_repository),
        ("start two devices (edge-agent run), provisioned with root.json only", step_agents),
        ("wait until both devices report ACTIVE over MQTT", step_wait_active),
        ("ask each device through its OpenAI-compatible API", step_ask),
        ("roll out v2 (k_quant_mixed) in waves of 50% and 100% while a client keeps prompting", step_rollout),
        ("where everything lives", step_where),
    ]
    try:
        if settings.run_dir.exists():
            shutil.rmtree(settings.run_dir)  # last run's repo and devices: every run starts its fleet afresh
        settings.run_dir.mkdir(parents=True)
        display.info(f"work dir {settings.workdir} (builds are reused from {settings.artifacts_dir})")
        for title, fn in steps:
            with display.step(title):
                fn(run)
            summary.steps_done.append(fn.__name__)
        summary.ok = True
        summary.step_durations_s = dict(display.durations_s)
        summary.duration_s = round(time.monotonic() - t0, 1)
        summary.processes = [ProcessInfo(name=p.name, pid=p.pid, pgid=p.pgid) for p in procs.processes]
        if settings.keep_running:
            summary.is_fleet_up = True
            _write_summary(summary, settings.summary_path)
            display.info("")
            display.info("the fleet stays up: try")
            for dev in run.devices:
                display.info(f'  edge-agent prompt "Tell me a joke." --url {dev.api_url}')
            display.info(f"  edge-builder fleet watch --broker {run.broker_url} --fleet {FLEET}")
            display.info("press Ctrl-C to stop everything")
            while True:
                procs.check_alive()
                time.sleep(1.0)  # waiting for Ctrl-C; check_alive notices a crashed part
    except (KeyboardInterrupt, _Stop) as e:
        if not (settings.keep_running and summary.ok):
            summary.ok = False
            summary.is_interrupted = True
            summary.error = f"interrupted ({type(e).__name__} {e})".strip()
        display.info("")
        display.info("stopping")
    except EdgefleetError as e:
        summary.ok = False
        summary.error = str(e)
        display.info(f"error: {e}")
    except Exception as e:  # a bug: still stop everything, and keep the traceback
        summary.ok = False
        summary.error = f"unexpected {type(e).__name__}: {e}"
        log.exception("event=demo_crashed")
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave parts running.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if run.watcher is not None:
            run.watcher.close()
        summary.processes = [ProcessInfo(name=p.name, pid=p.pid, pgid=p.pgid) for p in procs.processes]
        procs.stop_all(on_stop=lambda p: display.info(f"stopping {p.name} (pid {p.pid})"))
        summary.leftover_pids = procs.leftovers()
        if not summary.leftover_pids:
            record.unlink(missing_ok=True)
        summary.step_durations_s = dict(display.durations_s)
        summary.duration_s = round(time.monotonic() - t0, 1)
        summary.is_fleet_up = False
        _write_summary(summary, settings.summary_path)
        display.info(f"{'done' if summary.ok else 'FAILED'} in {summary.duration_s:.0f}s; "
                     f"nothing left running: {not summary.leftover_pids}; summary {settings.summary_path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _install_signal_handlers()
    summary = run_demo(_settings(args))
    if args.json:
        sys.stdout.write(summary.model_dump_json() + "\n")
    if summary.ok:
        return int(ExitCode.OK)
    return int(ExitCode.INTERRUPTED if summary.is_interrupted else ExitCode.FAILED)


"""Helpers for the daemon tests: real tiny ORT-GenAI models published into a real TUF
repository, served by the real `builder.release.server` server, and real `edge-agent run` processes.

Artifacts here are real, loadable models whose manifest canary is measured with
onnxruntime-genai (greedy ids of the canary prompt), so the daemon's load + canary runs
for real. Versions of one model differ by a small `edition.txt` file (or an edited
`genai_config.json`), so only that file is downloaded again, as in a real delta update.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.store.store import Store
from agent.update.journal import Journal
from agent.update.statemachine import Phase
from agent.wire.channel import ChannelFile
from agent.wire.manifest import MANIFEST_FILENAME, Manifest
from builder.demo.ports import free_port
from builder.release.repository import TufRepo
from testkit.artifacts import manifest_dict, new_repo
from testkit.cache import made_once
from testkit.env import subprocess_env
from testkit.waits import wait_until

CANARY_PROMPT = "The lighthouse keeper opened her ledger and wrote"
CANARY_TOKENS = 6


@functools.lru_cache(maxsize=8)
def measured_canary(raw_dir: str, prompt: str = CANARY_PROMPT, n: int = CANARY_TOKENS) -> tuple[int, ...]:
    """Greedy ids of `prompt` from the model in `raw_dir` (what a builder puts in the manifest)."""
    from agent.serving.runtime import ModelRuntime

    return tuple(ModelRuntime(Path(raw_dir), intra_op_num_threads=1).greedy_token_ids(prompt, n))


@functools.lru_cache(maxsize=8)
def measured_leads(raw_dir: str, ids: tuple[int, ...], prompt: str = CANARY_PROMPT) -> tuple[float, ...]:
    """The teacher-forced leads of `ids` after `prompt` (what a builder records beside the ids)."""
    from agent.serving.runtime import ModelRuntime

    return tuple(ModelRuntime(Path(raw_dir), intra_op_num_threads=1).teacher_forced_leads(prompt, list(ids)))


def make_real_artifact(raw: Path, out: Path, name: str, version: int, *, canary_ids: list[int] | None = None,
                       requirements: dict[str, Any] | None = None, config_edit: dict[str, Any] | None = None,
                       extra_files: dict[str, bytes] | None = None, min_ram_bytes: int | None = None,
                       created_at: dt.datetime | None = None) -> Path:
    """An artifact of the real model files in `raw` plus a manifest with a measured canary.

    `canary_ids` replaces the measured ids (a signed but broken build); such a canary has no
    leads, so a device judges it by its exact tokens (a random-weight model's logits are too
    flat for the lead rule to tell one token from another). `config_edit` updates
    `genai_config.json`'s decoder section (e.g. a file that is not there).
    """
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(raw, out)
    (out / "edition.txt").write_text(f"{name} v{version}\n")
    for rel, content in (extra_files or {}).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(content)
    if config_edit is not None:
        config = json.loads((out / "genai_config.json").read_text())
        config["model"]["decoder"].update(config_edit)
        (out / "genai_config.json").write_text(json.dumps(config, indent=4))
    (out / MANIFEST_FILENAME).unlink(missing_ok=True)
    entries: dict[str, tuple[int, str]] = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            entries[p.relative_to(out).as_posix()] = (p.stat().st_size, h.hexdigest())
    data = manifest_dict(name, version, entries)
    if created_at is not None:
        data["created_at"] = created_at.isoformat()
    ids = list(canary_ids) if canary_ids is not None else list(measured_canary(str(raw)))
    data["evaluation"]["canary"] = {"prompt": CANARY_PROMPT, "max_new_tokens": CANARY_TOKENS,
                                    "expected_token_ids": ids}
    if canary_ids is None:
        data["evaluation"]["canary"]["expected_leads"] = list(measured_leads(str(raw), tuple(ids)))
    import platform
    data["requirements"]["arch"] = [platform.machine()]
    if min_ram_bytes is not None:
        data["requirements"]["min_ram_bytes"] = min_ram_bytes
    data["requirements"].update(requirements or {})
    manifest = Manifest.model_validate(data)
    (out / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=2))
    return out


class Release:
    """A TUF repository on disk, served by the real server in a thread."""

    def __init__(self, root: Path, url: str, repo: TufRepo, faults: Any) -> None:
        self.root, self.url, self.repo, self.faults = root, url, repo, faults
        self._n = 0

    def publish(self, raw: Path, name: str, version: int, *, channel: str = "stable", percent: int = 100,
                set_channel: bool = True, **kwargs: Any) -> Manifest:
        self._n += 1
        art = make_real_artifact(raw, self.root / f"art-{name}-{version}-{self._n}", name, version, **kwargs)
        self.repo.publish(art)
        if set_channel:
            self.set_channel(name, version, channel=channel, percent=percent)
        return Manifest.model_validate_json((art / MANIFEST_FILENAME).read_bytes())

    def set_channel(self, name: str, version: int, *, channel: str = "stable", percent: int = 100,
                    allow_downgrade: bool = False) -> None:
        from agent.wire.channel import Rollout

        self.repo.set_channel(ChannelFile(channel=channel, model=name, version=version, allow_downgrade=allow_downgrade,
                                          rollout=Rollout(percent=percent, salt="s")))

    def artifact_gets(self, name: str, version: int) -> list[str]:
        """GETs of the model's files (its signed manifest is read at check time and not counted)."""
        with self.faults.lock:
            return [p for p, _ in self.faults.requests
                    if f"/targets/models/{name}/{version}/" in p and not p.endswith(".manifest.json")]


@contextmanager
def release_repo(root: Path) -> Iterator[Release]:
    from testkit.artifacts import serving

    repo = new_repo(root / "repo")
    with serving(repo.www_dir) as (url, faults):
        yield Release(root, url, repo, faults)


class Agent:
    """One real `edge-agent run` process on its own state dir and API port."""

    def __init__(self, workdir: Path, release: Release, *, device_id: str = "box-1", broker_url: str | None = None,
                 fleet: str = "test", poll_interval_s: float = 3600.0, telemetry_interval_s: float = 3600.0,
                 extra: dict[str, Any] | None = None, state_from: Path | None = None) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        workdir.mkdir(parents=True, exist_ok=True)
        if state_from is not None:
            # cp -a keeps the hard links between blobs and model dirs (and the symlinks).
            subprocess.run(["cp", "-a", str(state_from), str(self.state_dir)], check=True)
        self.store = Store(self.state_dir)
        self.store.ensure_layout()
        root_json = release.repo.metadata_dir / "root.json"
        if not (self.store.trust_dir / "root.json").exists():
            shutil.copyfile(root_json, self.store.trust_dir / "root.json")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.device_id = device_id
        self.log_path = workdir / "agent.log"
        lines = {"device_id": device_id, "fleet": fleet, "channel": "stable", "repo_url": release.url,
                 "state_dir": str(self.state_dir), "api_bind": f"127.0.0.1:{self.port}",
                 "poll_interval_s": poll_interval_s, "telemetry_interval_s": telemetry_interval_s,
                 "intra_op_num_threads": 1, "probation_s": 1.0, **(extra or {})}
        if broker_url is not None:
            lines["broker_url"] = broker_url
        self.config_path = workdir / "agent.toml"
        self.write_config(lines)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, values: dict[str, Any]) -> None:
        self.config_values = dict(values)
        self.config_path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))

    def start(self, **env: str) -> Agent:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")
        log.write(b"---- start ----\n")
        log.flush()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
                                     env=subprocess_env(**env), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal the agent; with SIGKILL also its model workers (they exit when stdin closes anyway)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        if sig == signal.SIGKILL:
            with_pg_kill(self.proc.pid)
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.proc is not None:
            with_pg_kill(self.proc.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def phase(self) -> Phase | None:
        try:
            return Journal(self.store.journal_path).load().phase
        except Exception:
            return None

    def health(self) -> dict[str, Any] | None:
        try:
            r = requests.get(f"{self.url}/healthz", timeout=2)
        except requests.RequestException:
            return None
        return r.json() if r.status_code == 200 else None

    def wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        def check() -> bool:
            if self.proc is not None and self.proc.poll() is not None and self.proc.returncode != 0:
                raise AssertionError(f"agent exited with {self.proc.returncode} while waiting for {what}:\n"
                                     f"{self.log_tail()}")
            return predicate()
        try:
            wait_until(check, timeout_s, what, interval_s=0.05)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- agent log ---\n{self.log_tail()}") from None

    def wait_serving(self, name: str, version: int, timeout_s: float = 120) -> None:
        self.wait(lambda: (h := self.health()) is not None and (h["model"], h["version"]) == (name, version),
                  timeout_s, f"{name} v{version} serving on {self.url}")

    def wait_phase(self, phase: Phase, timeout_s: float = 120) -> None:
        self.wait(lambda: self.phase() is phase, timeout_s, f"journal phase {phase.value}")

    def chat(self, text: str = "Hi", max_tokens: int = 4, timeout_s: float = 60) -> requests.Response:
        return requests.post(f"{self.url}/v1/chat/completions", timeout=timeout_s,
                             json={"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                                   "temperature": 0})


@contextmanager
def installed_agent(release: Release, raw: Path, root: Path, name: str = "tiny",
                    **publish: Any) -> Iterator[Agent]:
    """A running agent that has installed `name` v1 of `raw` (published with `publish`) and serves it."""
    release.publish(raw, name, 1, **publish)
    agent = Agent(root, release)
    agent.start()
    try:
        agent.wait_serving(name, 1)
        agent.wait(lambda: agent.phase() is Phase.ACTIVE and agent.store.current() is not None, 30, "v1 installed")
        yield agent
    finally:
        agent.stop()


def with_pg_kill(pgid: int) -> None:
    """Kill what is left of the agent's process group (its model workers)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def release(tmp_path: Path) -> Iterator[Release]:
    """A fresh signed repository, served over HTTP, for one test."""
    with release_repo(tmp_path) as r:
        yield r


@pytest.fixture(scope="session")
def tiny_hf(model_cache_dir: Path, smollm2_hf_dir: Path) -> Path:
    """The HF folder of `tiny_raw`: a tiny random-weight llama of its own seed (7). The seed-0 tiny
    llama of `tiny_model_dir` has the very weights of the seed-0 tiny mistral (the same layers under
    another class name), so builder tests that must tell sources apart by their perplexity use this."""
    from testkit.models import make_tiny_model

    return made_once(model_cache_dir / "daemon-tiny-llama-hf", "config.json",
                     lambda tmp: make_tiny_model("llama", tmp, tokenizer_dir=smollm2_hf_dir, seed=7))


@pytest.fixture(scope="session")
def tiny_raw(model_cache_dir: Path, tiny_hf: Path) -> Path:
    """A tiny random-weight llama (hidden 64, 2 layers) built to INT4 with onnxruntime-genai:
    loads in well under a second, so most daemon tests run real models cheaply."""
    from builder.build.ortbuild import run_ort_builder

    return made_once(model_cache_dir / "daemon-tiny-llama-int4", "genai_config.json", lambda tmp: run_ort_builder(
        tiny_hf, tmp, precision="int4", execution_provider="cpu", cache_dir=model_cache_dir / "ort-cache",
        extra_options={"block_size": "32", "accuracy_level": "4"}))


class Poller:
    """A client that keeps asking for completions and records every outcome."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.results: list[tuple[int, str]] = []  # (status, model that answered) ; status 0: exception
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.agent.chat("Say something", max_tokens=4)
                self.results.append((r.status_code, r.json().get("model", "") if r.status_code == 200 else r.text))
            except requests.RequestException as e:
                self.results.append((0, repr(e)))

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def failures(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200]

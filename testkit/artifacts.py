"""Test helpers: small artifact dirs with a valid manifest, a real repository
served by the real `builder.release.server` server (with optional fault injection), and
a provisioned device.

The evaluation numbers in these manifests are made up (they are not measured):
the trust layer never looks at them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.store.store import Store
from agent.wire.hashing import sha256_file
from agent.wire.manifest import MANIFEST_FILENAME, Manifest
from builder.release.repository import RepoSettings, TufRepo
from builder.release.server import RangeRequestHandler, RepoHTTPServer, make_server, serve_in_thread

_ZERO_SHA = "0" * 64


def manifest_dict(name: str, version: int, files: dict[str, bytes] | dict[str, tuple[int, str]]) -> dict[str, Any]:
    """A valid manifest as a dict (so attack tests can break it before signing)."""
    entries: list[dict[str, Any]] = []
    for path, content in files.items():
        if isinstance(content, bytes):
            entries.append({"path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()})
        else:
            entries.append({"path": path, "size": content[0], "sha256": content[1]})
    total = sum(e["size"] for e in entries)
    return {
        "schema_version": 1, "name": name, "version": version, "label": f"test build {version}",
        "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC).isoformat(),
        "source": {"kind": "hf_dir", "reference": "tests", "sha256": _ZERO_SHA},
        "build": {"precision": "int4", "execution_provider": "cpu", "profile": "cpu",
                  "onnxruntime_genai_version": "0.18.0", "onnxruntime_version": "1.22.0",
                  "transformers_version": "4.57.0", "builder_options": {}},
        "files": entries,
        "requirements": {"min_ram_bytes": 1 << 20, "ram_margin_bytes": 0, "min_free_disk_bytes": total,
                         "arch": ["x86_64", "aarch64"], "cpu_features": [],
                         "min_onnxruntime_genai_version": "0.18.0", "execution_provider": "cpu"},
        # Made-up numbers: tests of the trust layer do not evaluate models.
        "evaluation": {"perplexity": 12.5, "reference_perplexity": 12.0, "perplexity_ratio": 1.04,
                       "max_perplexity_ratio": 1.2, "eval_text_sha256": _ZERO_SHA, "eval_tokens": 256,
                       "decode_tokens_per_s": 100.0, "prefill_tokens_per_s": 1000.0, "peak_rss_bytes": 1 << 20,
                       "canary": {"prompt": "hi", "max_new_tokens": 4, "expected_token_ids": [1, 2, 3, 4]}},
        "model_info": {"architecture": "LlamaForCausalLM", "parameter_count": 135_000_000,
                       "context_length": 2048, "vocab_size": 49152},
    }


def make_artifact(out: Path, name: str = "tiny", version: int = 1,
                  files: dict[str, bytes] | None = None) -> Path:
    """Write `files` and a valid manifest.json into `out`; return `out`."""
    files = files if files is not None else {
        "model.onnx": f"weights of {name} v{version}".encode() * 100,
        "genai_config.json": b'{"model": {"type": "llama"}}',
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    }
    out.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(data)
    manifest = Manifest.model_validate(manifest_dict(name, version, files))
    (out / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=2))
    return out


def make_artifact_from_dir(src: Path, out: Path, name: str, version: int) -> Path:
    """An artifact of the real files in `src` (e.g. the SmolLM2 ORT build) plus a manifest."""
    shutil.copytree(src, out, dirs_exist_ok=True)
    files = {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*")) if p.is_file()
             and p.name != MANIFEST_FILENAME}
    entries: dict[str, tuple[int, str]] = {}
    for rel, p in files.items():
        entries[rel] = (p.stat().st_size, sha256_file(p))
    manifest = Manifest.model_validate(manifest_dict(name, version, entries))
    (out / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=2))
    return out


# -- server with fault injection ---------------------------------------------------
@dataclass
class Faults:
    """What the test server does wrong. Matching is by substring of the request path."""

    drop_after_bytes: int | None = None  # send this many body bytes of a full file, then close
    drop_times: int = 0  # how many requests to drop
    drop_path: str = ""
    endless_path: str | None = None  # answer with endless data, no Content-Length
    drip_path: str | None = None  # answer these one byte at a time, `drip_interval_s` apart
    drip_interval_s: float = 0.5
    drip_after_bytes: int = 0  # send this many bytes at full speed first
    basic_auth: str | None = None  # "user:password": every request without it gets 401, as nginx's auth_basic does
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    authorizations: list[str | None] = field(default_factory=list)  # the Authorization header of each request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def range_requests(self, substring: str = "") -> int:
        with self.lock:
            return sum(1 for p, r in self.requests if r and substring in p)


class FaultyHandler(RangeRequestHandler):
    """The real server's handler with injectable faults (for the fault suite only)."""

    @property
    def faults(self) -> Faults:
        return self.server.faults  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        faults = self.faults
        with faults.lock:
            faults.requests.append((self.path, self.headers.get("Range")))
            faults.authorizations.append(self.headers.get("Authorization"))
        if faults.basic_auth is not None and self.headers.get("Authorization") != \
                "Basic " + base64.b64encode(faults.basic_auth.encode()).decode():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="models"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if faults.endless_path and faults.endless_path in self.path:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for _ in range(10_000):  # 640 MB at most, far past any signed length here
                    self.wfile.write(b"A" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        super().do_GET()

    def send_body(self, f: Any, offset: int, count: int) -> None:
        faults = self.faults
        if faults.drip_path and faults.drip_path in self.path:
            f.seek(offset)
            data = f.read(count)
            try:
                self.wfile.write(data[: faults.drip_after_bytes])
                for i in range(faults.drip_after_bytes, len(data)):
                    self.wfile.flush()
                    time.sleep(faults.drip_interval_s)
                    self.wfile.write(data[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should
            return
        drop = False
        with faults.lock:
            if faults.drop_times > 0 and faults.drop_after_bytes is not None and faults.drop_path in self.path:
                faults.drop_times -= 1
                drop = True
        if not drop:
            super().send_body(f, offset, count)
            return
        f.seek(offset)
        self.wfile.write(f.read(min(count, faults.drop_after_bytes or 0)))
        self.wfile.flush()
        self.close_connection = True
        import socket
        self.connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def serving(www: Path, port: int = 0, faults: Faults | None = None) -> Iterator[tuple[str, Faults]]:
    """Serve `www` with the real server (threaded) on 127.0.0.1; yield (base URL, faults)."""
    server: RepoHTTPServer = make_server(www, "127.0.0.1", port, FaultyHandler)
    server.faults = faults or Faults()  # type: ignore[attr-defined]
    thread = serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.faults  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def release_to_new_device(root: Path, artifact: Path) -> tuple[TufRepo, Path]:
    """`artifact` signed into a new repository (root/repo) as the stable channel's model, and a
    device state dir (root/device) provisioned with that repository's root.json only."""
    from agent.wire.channel import ChannelFile

    manifest = Manifest.model_validate_json((artifact / MANIFEST_FILENAME).read_bytes())
    repo = new_repo(root / "repo")
    repo.publish(artifact)
    repo.set_channel(ChannelFile(channel="stable", model=manifest.name, version=manifest.version))
    state = root / "device"
    (state / "trust").mkdir(parents=True)
    (state / "trust" / "root.json").write_bytes((repo.metadata_dir / "root.json").read_bytes())
    return repo, state


def new_repo(path: Path, **expiry_s: int) -> TufRepo:
    settings = RepoSettings()
    for role, seconds in expiry_s.items():
        settings.expiry_s[role] = seconds  # type: ignore[index]
    return TufRepo.init(path, settings)


def provision_device(state_dir: Path, repo: TufRepo, url: str, device_id: str = "dev-1",
                     channel: str = "stable", **extra: Any) -> tuple[AgentConfig, Store]:
    """A device with only the repository's root.json."""
    store = Store(state_dir)
    store.ensure_layout()
    shutil.copyfile(repo.metadata_dir / "root.json", store.trust_dir / "root.json")
    config = AgentConfig(device_id=device_id, channel=channel, repo_url=url, state_dir=state_dir, **extra)
    return config, store


def write_agent_toml(path: Path, config: AgentConfig) -> Path:
    path.write_text(
        f'device_id = "{config.device_id}"\nchannel = "{config.channel}"\nrepo_url = "{config.repo_url}"\n'
        f'state_dir = "{config.state_dir}"\n'
    )
    return path


class NoLoadActivator:
    """TEST DOUBLE for activation, for the trust-layer tests only: their artifacts are made-up
    bytes, not loadable models, and what they test is what gets downloaded, verified and
    installed. Real load + canary activation is tested with real models in tests/test_daemon_*.py."""

    def activate(self, model_dir: Path, manifest: Manifest) -> None:
        assert (model_dir / MANIFEST_FILENAME).is_file()

    def serve(self, model_dir: Path | None) -> None:
        pass


def run_update_once_unloaded(config: AgentConfig, store: Store, **kwargs: Any) -> Any:
    """`agent.cli.update.run_update_once` with the `NoLoadActivator` test double."""
    from agent.cli.update import run_update_once

    return run_update_once(config, store, activator=NoLoadActivator(), **kwargs)

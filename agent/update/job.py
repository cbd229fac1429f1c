"""The network half of an update, run in a child process: one per update pass.

Why a process: TUF, its crypto and the HTTP client cost the long-lived API
process 16 MB RSS it would keep for the whole uptime (measured: 64.5 -> 48.5
MB with them out), although it needs them a few seconds per poll. `UpdateJobSource`
is the Checker + Downloader the daemon's updater uses:
it starts `python -m agent.update.job` on the first call of a pass, which runs
`TufUpdateSource` there, and the daemon closes it when the pass is over.

Wire: JSON lines, one pydantic model per line. The first line on the job's
stdin is a `JobStart` (config, the hardware probe already measured), then one
`JobRequest` per call, each answered by one `JobReply` on a private copy of
the job's stdout (fd 1 points at stderr, so its log joins the daemon's).

Failure: an error in the job comes back as the same typed error (its class
name and message), so the updater journals the same reason as in-process.
The job exits when its stdin closes and is SIGKILLed by the kernel when the
daemon dies (`die_with_parent`), leaving its partial download to resume.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from typing import IO, TYPE_CHECKING, Literal

from pydantic import ValidationError

from agent.config import AgentConfig
from agent.store.store import Store
from agent.system.childproc import die_with_parent, python_child_env
from agent.update.compat import RuntimeProbe
from agent.update.decision import CheckResult
from agent.update.statemachine import ModelRef
from agent.wire.base import StrictModel
from agent.wire.channel import ChannelFile
from agent.wire.errors import CROSS_PROCESS_ERRORS, EdgefleetError, UpdateJobError, require

if TYPE_CHECKING:
    from agent.update.source import TufUpdateSource

log = logging.getLogger(__name__)

Op = Literal["check", "download", "verify"]


class _Wire(StrictModel):
    schema_version: Literal[1] = 1


class JobStart(_Wire):
    config: AgentConfig
    runtime: RuntimeProbe | None = None  # measured once by the daemon
    log_level: int = logging.INFO


class JobRequest(_Wire):
    op: Op
    active: ModelRef | None = None  # check
    target: ModelRef | None = None  # download, verify


class JobReply(_Wire):
    op: Op
    check: CheckResult | None = None
    channel: ChannelFile | None = None
    manifest_b64: str | None = None  # verify: the exact signed bytes
    bytes_downloaded: int = 0
    files_downloaded: int = 0
    blobs_reused: int = 0
    error_type: str | None = None
    error_message: str | None = None


def _error_from_reply(reply: JobReply) -> Exception:
    """The job's error as the same class, where that class takes just a message."""
    message = reply.error_message or "no message"
    cls = CROSS_PROCESS_ERRORS.get(reply.error_type or "")
    if cls is not None:
        return cls(message)
    if reply.error_type == "OSError":
        return OSError(message)
    return UpdateJobError(f"update job failed ({reply.error_type}): {message}")


class UpdateJobSource:
    """Checker + Downloader for `agent.update.updater.Updater`, in a child process. One thread uses it.

    `config` may be replaced between passes (SIGHUP reload): the next job gets the new one.
    """

    def __init__(self, config: AgentConfig, store: Store, *,
                 runtime: RuntimeProbe | None = None) -> None:
        self.config = config
        self.store = store
        self.runtime = runtime
        self.last_channel: ChannelFile | None = None
        self.bytes_downloaded = 0
        self.files_downloaded = 0
        self.blobs_reused = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- Checker + Downloader ----------------------------------------------------------
    def check(self, active: ModelRef | None) -> CheckResult:
        reply = self._call(JobRequest(op="check", active=active))
        self.last_channel = reply.channel
        return require(reply.check, "the update job's check result")

    def download(self, target: ModelRef) -> None:
        reply = self._call(JobRequest(op="download", target=target))
        self.bytes_downloaded += reply.bytes_downloaded
        self.files_downloaded += reply.files_downloaded
        self.blobs_reused += reply.blobs_reused

    def verify(self, target: ModelRef) -> bytes:
        reply = self._call(JobRequest(op="verify", target=target))
        return base64.b64decode(require(reply.manifest_b64, "the update job's verified manifest"))

    def discard(self, target: ModelRef) -> None:
        """Local only (no job): it runs in rollbacks, when the network may be what failed."""
        manifest = self.store.local_manifest(target.name, target.version)
        if manifest is not None:
            self.store.discard_partials(manifest)

    # -- the child ---------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The running job's pid, None between passes."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def close(self, timeout_s: float = 10.0) -> None:
        """End the job (the pass is over): it exits on EOF; killed after `timeout_s`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stdin, stdout = require(proc.stdin, "the update job's stdin"), require(proc.stdout, "the update job's stdout")
        try:
            stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stdout.close()

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "agent.update.job"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=None, env=python_child_env())
        stdin = require(proc.stdin, "the update job's stdin")
        start = JobStart(config=self.config, runtime=self.runtime, log_level=logging.getLogger().level)
        stdin.write(start.model_dump_json().encode() + b"\n")
        log.info("event=update_job_started pid=%d", proc.pid)
        return proc

    def _call(self, request: JobRequest) -> JobReply:
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._proc = self._start()
        proc = self._proc
        stdin, stdout = require(proc.stdin, "the update job's stdin"), require(proc.stdout, "the update job's stdout")
        try:
            stdin.write(request.model_dump_json().encode() + b"\n")
            stdin.flush()
            line = stdout.readline()
        except OSError:
            line = b""
        if not line:
            code = proc.wait()
            self.close()
            raise UpdateJobError(f"the update job exited with code {code} during {request.op}: see its log above; "
                                 "the next check starts a new one (a partial download resumes)")
        try:
            reply = JobReply.model_validate_json(line)
        except ValidationError as e:
            self.close()
            raise UpdateJobError(f"the update job sent a bad reply to {request.op}: {e}") from None
        if reply.error_type is not None:
            raise _error_from_reply(reply)
        return reply


# ---- the job process ----

def _serve(source: TufUpdateSource, request: JobRequest) -> JobReply:
    if request.op == "check":
        result = source.check(request.active)
        return JobReply(op="check", check=result, channel=source.last_channel)
    target = require(request.target, f"the target of {request.op}")
    if request.op == "download":
        before = (source.bytes_downloaded, source.files_downloaded, source.blobs_reused)
        source.download(target)
        return JobReply(op="download", bytes_downloaded=source.bytes_downloaded - before[0],
                        files_downloaded=source.files_downloaded - before[1],
                        blobs_reused=source.blobs_reused - before[2])
    return JobReply(op="verify", manifest_b64=base64.b64encode(source.verify(target)).decode())


def job_main(stdin: IO[bytes] | None = None) -> int:
    die_with_parent()
    stdin = stdin or sys.stdin.buffer
    # Replies get a private fd; fd 1 goes to stderr so that no print can corrupt them.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    first = stdin.readline()
    if not first:
        return 0  # the parent went away before it asked for anything
    start = JobStart.model_validate_json(first)
    logging.basicConfig(level=start.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s update-job[%(process)d] %(name)s %(message)s")
    from agent.system.hardware import probe
    from agent.update.source import TufUpdateSource

    store = Store(start.config.state_dir)
    source = TufUpdateSource(start.config, store, hardware=lambda d: probe(d, start.runtime))
    for line in stdin:
        request = JobRequest.model_validate_json(line)
        try:
            reply = _serve(source, request)
        except (EdgefleetError, OSError) as e:
            reply = JobReply(op=request.op, error_type="OSError" if isinstance(e, OSError) else type(e).__name__,
                             error_message=str(e))
        except Exception as e:  # noqa: BLE001 - the parent journals it as a failed step and retries later
            log.exception("event=update_job_error op=%s", request.op)
            reply = JobReply(op=request.op, error_type=type(e).__name__, error_message=str(e))
        out.write(reply.model_dump_json().encode() + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(job_main())

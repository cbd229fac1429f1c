"""The network half of an update, run in a child process: one per update pass.

Why a process: TUF, its crypto and the HTTP client cost the long-lived API
process 16 MB RSS it would keep for the whole uptime (measured: 64.5 -> 48.5
MB with them out), although it needs them a few seconds per poll. `UpdateJobSource` is the Checker + Downloader the daemon's updater uses:
it starts `python -m agent.update_job` on the first call of a pass, which runs
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

from pydantic import BaseModel, ConfigDict, ValidationError

from agent import errors
from agent.channel import ChannelFile
from agent.childproc import die_with_parent, python_child_env
from agent.config import AgentConfig
from agent.errors import EdgefleetError
from agent.statemachine import ModelRef
from agent.store import Store
from agent.update_check import CheckResult, local_manifest

if TYPE_CHECKING:
    from agent.tuf_source import TufUpdateSource

log = logging.getLogger(__name__)

Op = Literal["check", "download", "verify"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = 1


class JobStart(_Wire):
    config: AgentConfig
    ort_genai: tuple[str | None, list[str]] | None = None  # measured once by the daemon
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


class UpdateJobError(EdgefleetError):
    """The update job failed in a way no typed error describes, or it died."""


def _error_from_reply(reply: JobReply) -> Exception:
    """The job's error as the same class, where that class takes just a message."""
    message = reply.error_message or "no message"
    cls = getattr(errors, reply.error_type or "", None)
    if isinstance(cls, type) and issubclass(cls, EdgefleetError) and cls.__init__ is Exception.__init__:
        return cls(message)
    if reply.error_type == "OSError":
        return OSError(message)
    return UpdateJobError(f"update job failed ({reply.error_type}): {message}")


class UpdateJobSource:
    """Checker + Downloader for `agent.updater.Updater`, in a child process. One thread uses it.

    `config` may be replaced between passes (SIGHUP reload): the next job gets the new one.
    """

    def __init__(self, config: AgentConfig, store: Store, *,
                 ort_genai: tuple[str | None, list[str]] | None = None) -> None:
        self.config = config
        self.store = store
        self.ort_genai = ort_genai
        self.last_channel: ChannelFile | None = None
        self.bytes_downloaded = 0
        self.files_downloaded = 0
        self.blobs_reused = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- Checker + Downloader ----------------------------------------------------------
    def check(self, active: ModelRef | None) -> CheckResult:
        reply = self._call(JobRequest(op="check", active=active))
        self.last_channel = reply.channel
        assert reply.check is not None
        return reply.check

    def download(self, target: ModelRef) -> None:
        reply = self._call(JobRequest(op="download", target=target))
        self.bytes_downloaded += reply.bytes_downloaded
        self.files_downloaded += reply.files_downloaded
        self.blobs_reused += reply.blobs_reused

    def verify(self, target: ModelRef) -> bytes:
        reply = self._call(JobRequest(op="verify", target=target))
        assert reply.manifest_b64 is not None
        return base64.b64decode(reply.manifest_b64)

    def discard(self, target: ModelRef) -> None:
        """Local only (no job): it runs in rollbacks, when the network may be what failed."""
        manifest = local_manifest(self.store, target)
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
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "agent.update_job"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=None, env=python_child_env())
        assert proc.stdin is not None
        start = JobStart(config=self.config, ort_genai=self.ort_genai, log_level=logging.getLogger().level)
        proc.stdin.write(start.model_dump_json().encode() + b"\n")
        log.info("event=update_job_started pid=%d", proc.pid)
        return proc

    def _call(self, request: JobRequest) -> JobReply:
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._proc = self._start()
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(request.model_dump_json().encode() + b"\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
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
    assert request.target is not None, f"{request.op} needs a target"
    if request.op == "download":
        before = (source.bytes_downloaded, source.files_downloaded, source.blobs_reused)
        source.download(request.target)
        return JobReply(op="download", bytes_downloaded=source.bytes_downloaded - before[0],
                        files_downloaded=source.files_downloaded - before[1],
                        blobs_reused=source.blobs_reused - before[2])
    return JobReply(op="verify", manifest_b64=base64.b64encode(source.verify(request.target)).decode())


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
    from agent.hardware import probe
    from agent.tuf_source import TufUpdateSource

    store = Store(start.config.state_dir)
    source = TufUpdateSource(start.config, store, hardware=lambda d: probe(d, start.ort_genai))
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

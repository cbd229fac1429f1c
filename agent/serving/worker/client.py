"""The model worker seen from the API process: start it, send commands, route its events.

One `WorkerClient` per worker process (`agent.serving.worker`), used from one asyncio
loop. Events arrive as JSON lines and are routed by request id to one
`_EventBox` per open request; a request whose consumer goes away cancels its
generation in the worker. When the worker dies, every open request fails with
a `worker_died` error and the client reports itself dead.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError

from agent.serving.identity import ModelIdentity, read_identity
from agent.system.childproc import python_child_env
from agent.wire.errors import ActivationError, RuntimeModelError, WorkerDiedError, require
from agent.wire.worker import (
    CanaryCommand,
    CanaryEvent,
    CancelCommand,
    Command,
    DoneEvent,
    ErrorEvent,
    ErrorKind,
    Event,
    GenerateCommand,
    LoadFailedEvent,
    ReadyEvent,
    RequestEvent,
    SamplingOptions,
    ShutdownCommand,
    TokenEvent,
)

log = logging.getLogger(__name__)

# One line of the worker's event stream, validated by pydantic (the worker itself has no pydantic).
EVENT_LINE: TypeAdapter[Event] = TypeAdapter(Annotated[Event, Field(discriminator="type")])


class _EventBox:
    """One request's unread events. Token events that pile up while the consumer is
    busy merge into one, so a slow client or a busy API process costs one write
    per wake-up instead of one per token, and no token waits for a timer. The first token
    event is never merged into: the first chunk is the first token alone, however busy the
    consumer was (time to first token is never traded, as in the worker)."""

    def __init__(self) -> None:
        self._events: collections.deque[RequestEvent | CanaryEvent] = collections.deque()
        self._ready = asyncio.Event()
        self._first_token: TokenEvent | None = None

    def put(self, event: RequestEvent | CanaryEvent) -> None:
        tail = self._events[-1] if self._events else None
        if isinstance(event, TokenEvent) and isinstance(tail, TokenEvent) and tail is not self._first_token:
            self._events[-1] = tail.merged(event)
        else:
            self._events.append(event)
            if isinstance(event, TokenEvent) and self._first_token is None:
                self._first_token = event
        self._ready.set()

    async def get(self) -> RequestEvent | CanaryEvent:
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()


class WorkerClient:
    """One model-worker subprocess seen from asyncio: send commands, route events by request id."""

    def __init__(self, proc: asyncio.subprocess.Process, ready: ReadyEvent, identity: ModelIdentity) -> None:
        self.proc = proc
        self.identity = identity
        self.threads = ready.threads
        self.load_s = ready.load_s
        self._queues: dict[str, _EventBox] = {}
        self.is_alive = True
        self.ready_at = time.monotonic()  # when it began to serve
        # Generations the worker confirmed it dropped after their client went away.
        self.cancels_confirmed = 0
        self._reader = asyncio.get_running_loop().create_task(self._read_events())

    @classmethod
    async def start(cls, model_dir: Path, *, threads: int | None = None, allow_custom_ops: bool = False,
                    prefix_cache_bytes: int = 0, default_max_tokens: int | None = None,
                    load_timeout_s: float = 300.0,
                    env: dict[str, str] | None = None) -> WorkerClient:
        """Spawn a worker for `model_dir` and wait until it has loaded the model.

        Raises:
            ActivationError: the model does not load (the worker's typed error is in the message),
                or loading took longer than `load_timeout_s`.
        """
        identity = read_identity(model_dir)  # raises ActivationError for a dir that is not a model
        cmd = [sys.executable, "-m", "agent.serving.worker", str(model_dir)]
        if env is None:
            env = python_child_env()
        if threads:
            cmd += ["--threads", str(threads)]
        if allow_custom_ops:
            cmd.append("--allow-custom-ops")
        if prefix_cache_bytes:
            cmd += ["--prefix-cache-bytes", str(prefix_cache_bytes)]
        if default_max_tokens is not None:
            cmd += ["--default-max-tokens", str(default_max_tokens)]
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
            limit=64 * 1024 * 1024, env=env)
        stdout = require(proc.stdout, "the model worker's stdout pipe")
        try:
            line = await asyncio.wait_for(stdout.readline(), timeout=load_timeout_s)
        except TimeoutError as e:
            proc.kill()
            await proc.wait()
            raise ActivationError(f"model worker for {model_dir} did not load within {load_timeout_s:.0f} s: "
                                  "check the model dir and the device's memory") from e
        event = EVENT_LINE.validate_json(line) if line else None
        if isinstance(event, ReadyEvent):
            log.info("event=worker_ready model=%s version=%s pid=%d threads=%d load_s=%.2f", identity.name,
                     identity.version, event.pid, event.threads, event.load_s)
            return cls(proc, event, identity)
        await proc.wait()
        if isinstance(event, LoadFailedEvent):
            raise ActivationError(f"model {model_dir} failed to load ({event.error_type}): {event.message}")
        raise ActivationError(f"model worker for {model_dir} exited with code {proc.returncode} before it was "
                              "ready: see its log on stderr")

    async def wait_exited(self) -> None:
        """Return once the worker process has exited (for any reason) and its events are routed."""
        await asyncio.shield(self._reader)

    @property
    def inflight(self) -> int:
        return len(self._queues)

    async def _read_events(self) -> None:
        stdout = require(self.proc.stdout, "the model worker's stdout pipe")
        while True:
            line = await stdout.readline()
            if not line:
                break
            try:
                event = EVENT_LINE.validate_json(line)
            except ValidationError as e:
                log.error("event=bad_worker_event error=%s", str(e).splitlines()[0])
                continue
            box = self._queues.get(getattr(event, "id", ""))
            if box is not None:
                box.put(event)  # type: ignore[arg-type]
            elif isinstance(event, DoneEvent) and event.finish_reason == "cancelled":
                self.cancels_confirmed += 1
                log.info("event=generation_cancelled id=%s completion_tokens=%d", event.id, event.completion_tokens)
        self.is_alive = False
        code = await self.proc.wait()
        if self._queues:
            log.error("event=worker_died pid=%d code=%s open_requests=%d", self.proc.pid, code, len(self._queues))
        for request_id, box in self._queues.items():
            box.put(ErrorEvent(id=request_id, kind="worker_died",
                                    message=f"the model worker exited with code {code}: retry the request"))

    def _send(self, command: Command) -> None:
        stdin = require(self.proc.stdin, "the model worker's stdin pipe")
        if self.is_alive and not stdin.is_closing():
            stdin.write(command.to_line())

    async def generate(self, command: GenerateCommand) -> AsyncGenerator[RequestEvent, None]:
        """Events of one request up to and including its `done` or `error`.

        Closing the iterator early (a client went away, a task was cancelled)
        cancels the generation in the worker.
        """
        box = _EventBox()
        self._queues[command.id] = box
        is_finished = False
        try:
            if not self.is_alive:
                raise WorkerDiedError("the model worker is not running: retry the request")
            self._send(command)
            while True:
                event = await box.get()
                if isinstance(event, CanaryEvent):
                    continue  # not an answer to a generate command
                yield event
                if isinstance(event, (DoneEvent, ErrorEvent)):
                    is_finished = True
                    return
        finally:
            # No await here: this runs inside cancelled tasks (a client went away), where any
            # await would be cancelled again. The worker drops the generation at its next round.
            self._queues.pop(command.id, None)
            if not is_finished:
                self._send(CancelCommand(id=command.id))

    async def greedy_token_ids(self, prompt_text: str, max_new_tokens: int) -> list[int]:
        """`ModelRuntime.greedy_token_ids` run in this worker.

        Raises:
            RuntimeModelError: the generation failed or the worker died.
        """
        command = GenerateCommand(id=f"greedy-{os.urandom(6).hex()}", prompt=prompt_text,
                                  options=SamplingOptions(temperature=0.0, max_tokens=max_new_tokens))
        ids: list[int] = []
        async for event in self.generate(command):
            if isinstance(event, TokenEvent):
                ids.extend(event.token_ids)
            elif isinstance(event, ErrorEvent):
                raise RuntimeModelError(f"greedy generation failed ({event.kind}): {event.message}")
        return ids

    async def canary_leads(self, prompt_text: str, token_ids: list[int],
                           images: list[str] | None = None) -> list[float]:
        """`ModelRuntime.teacher_forced_leads` run in this worker (the canary before a switch);
        `images`: base64 PNGs written by `agent.serving.images` (the image canary).

        Raises:
            RuntimeModelError: the worker could not run the canary, or it died.
        """
        command = CanaryCommand(id=f"canary-{os.urandom(6).hex()}", prompt=prompt_text, token_ids=token_ids,
                                images=images)
        box = _EventBox()
        self._queues[command.id] = box
        try:
            if not self.is_alive:
                raise WorkerDiedError("the model worker is not running")
            self._send(command)
            event = await box.get()
        finally:
            self._queues.pop(command.id, None)
        if isinstance(event, CanaryEvent):
            return event.leads
        if isinstance(event, ErrorEvent):
            raise RuntimeModelError(f"the canary could not run ({event.kind}): {event.message}")
        raise RuntimeModelError(f"the model worker answered a canary with a {event.type} event")

    def end_open_requests(self, kind: ErrorKind, message: str) -> None:
        """End every open request with a `kind` error (before a planned stop, so that its client
        reads why rather than `worker_died`)."""
        for request_id, box in list(self._queues.items()):
            box.put(ErrorEvent(id=request_id, kind=kind, message=message))
        self._queues.clear()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to exit; kill it if it does not within `timeout_s`."""
        if self.proc.returncode is None:
            self._send(ShutdownCommand())
            try:
                require(self.proc.stdin, "the model worker's stdin pipe").close()
                await asyncio.wait_for(self.proc.wait(), timeout=timeout_s)
            except TimeoutError:
                log.warning("event=worker_kill pid=%d reason=shutdown_timeout", self.proc.pid)
                self.proc.kill()
                await self.proc.wait()
        await self._reader
        log.info("event=worker_stopped model=%s pid=%d code=%s", self.identity.name, self.proc.pid,
                 self.proc.returncode)

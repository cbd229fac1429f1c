"""ModelHost: the slots, the bounded queue and the hot switch between model workers.

A slot is the right to generate: at most `parallel` requests generate at once
(the worker gives each a token per round) and at most `queue_size` more wait in
FIFO order; the next one gets 429. The queue lives here, not in the worker,
so that a switch can route waiting requests to the new model: a request is
bound to a worker only when it gets a slot, and it stays on that worker to
its end. `switch()` therefore never fails a request: in-flight ones finish on
the old worker, queued and new ones go to the new one, then the old worker
is stopped.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Coroutine
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

import anyio

from agent.serving.identity import ModelIdentity
from agent.serving.images import read_file_inside, to_png
from agent.serving.metrics import ServingMetrics
from agent.serving.prefix_cache import DEFAULT_BUDGET_BYTES
from agent.serving.worker.client import WorkerClient
from agent.wire.canary import judge_leads, judge_without_leads
from agent.wire.contract import CHECK_MAX_TOKENS, answer_problem, example_request
from agent.wire.errors import (
    ActivationError,
    ImageError,
    ModelNotReadyError,
    QueueFullError,
    RuntimeModelError,
    require,
)
from agent.wire.manifest import Canary
from agent.wire.worker import (
    DEFAULT_MAX_NEW_TOKENS,
    ChatMessage,
    DoneEvent,
    ErrorEvent,
    GenerateCommand,
    RequestEvent,
    SamplingOptions,
    TokenEvent,
)

log = logging.getLogger(__name__)

HostState = Literal["empty", "loading", "ready", "failed"]
# A restarted worker that serves this long without dying ends a crash loop's backoff.
STABLE_WORKER_S = 60.0
# The image canary's picture is a small file the builder ships (builder/data/canary.png).
MAX_CANARY_IMAGE_BYTES = 4 << 20


class ModelHost:
    """Owns the worker processes of one device; the API and the update path share it."""

    def __init__(self, *, threads: int | None = None, parallel: int = 4, queue_size: int = 16,
                 load_timeout_s: float = 300.0, drain_timeout_s: float = 600.0,
                 stream_interval_s: float = 0.05, allow_custom_ops: bool = False,
                 prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES,
                 default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        """`stream_interval_s`: see `GenerateCommand.stream_interval_s` (the API's streaming granularity);
        `allow_custom_ops`: models may load custom operator libraries (`agent.wire.loadcheck`);
        `prefix_cache_bytes`: the KV each worker may keep of finished generations
        (`agent.serving.prefix_cache`), and `default_max_tokens`, the most a request without max_tokens
        gets: both applied to workers started after they change."""
        self.threads = threads
        self.prefix_cache_bytes = prefix_cache_bytes
        self.default_max_tokens = default_max_tokens
        self.allow_custom_ops = allow_custom_ops
        self.stream_interval_s = stream_interval_s
        self.parallel = parallel
        self.queue_size = queue_size
        self.load_timeout_s = load_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = ServingMetrics()
        self.state: HostState = "empty"
        self.last_error: str | None = None
        self._current: WorkerClient | None = None
        self._active = 0
        self._waiting = 0
        self._slot_freed = asyncio.Condition()
        self._switch_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._consecutive_restarts = 0
        self._paused = False  # a drain-and-switch is under way: requests wait for the new model
        self._stopped: str | None = None  # why the agent stopped serving (`stop_serving`)

    @property
    def is_serving(self) -> bool:
        return self._current is not None and self._current.is_alive

    @property
    def identity(self) -> ModelIdentity | None:
        return self._current.identity if self._current is not None else None

    def accepts_model(self, requested: str | None) -> bool:
        """A request names the active model by its name, or 'default', or not at all."""
        identity = self.identity
        return requested in (None, "", "default") or (identity is not None and requested == identity.name)

    async def switch(self, model_dir: Path, *, canary: Canary | None = None, drain_first: bool = False,
                     _is_restart: bool = False) -> ModelIdentity:
        """Load `model_dir` in a new worker and make it serve every request not yet started.

        With `canary`, the new worker must first replay the manifest's canary
        (its tokens teacher forced after the prompt, raw text, no chat template)
        with every token's lead matching the build host's (`agent.wire.canary`),
        before any request reaches it.

        Returns once the new model serves and the old worker is stopped
        (in-flight requests on it finish first, up to `drain_timeout_s`).

        With `drain_first` (the device has no RAM for two models), in-flight
        requests finish on the old worker first, new ones wait in the queue
        (they do not fail), the old worker stops, then the new one loads; if it
        fails, the old model is loaded again and serves the waiting requests.

        Raises:
            ActivationError: the new model failed to load or its canary; the old one keeps serving.
        """
        if drain_first and self._current is not None and not _is_restart:
            async with self._switch_lock:
                return await self._drain_then_switch(Path(model_dir), canary)
        async with self._switch_lock:
            if self._current is None:
                self.state = "loading"
            started = time.perf_counter()
            try:
                new = await self._start_worker(Path(model_dir))
            except ActivationError as e:
                self.last_error = str(e)
                if self._current is None:
                    self.state = "failed"
                log.error("event=model_switch_failed model_dir=%s error=%s", model_dir, e)
                raise
            if canary is not None:
                await self._check_canary(new, canary)
            old, self._current = self._current, new
            self.state = "ready"
            self.last_error = None
            self._spawn(self._restart_when_dead(new))
            if old is not None and not _is_restart:
                self.metrics.model_switches_total += 1
            async with self._slot_freed:
                self._slot_freed.notify_all()  # requests waiting for a slot may go to the new worker
            log.info("event=model_switch model=%s version=%s load_s=%.2f previous=%s", new.identity.name,
                     new.identity.version, time.perf_counter() - started, old.identity.name if old else None)
            if old is not None:
                await self._drain_and_stop(old)
            return new.identity

    async def _start_worker(self, model_dir: Path) -> WorkerClient:
        return await WorkerClient.start(model_dir, threads=self.threads, allow_custom_ops=self.allow_custom_ops,
                                        prefix_cache_bytes=self.prefix_cache_bytes,
                                        default_max_tokens=self.default_max_tokens,
                                        load_timeout_s=self.load_timeout_s)

    async def _drain_then_switch(self, model_dir: Path, canary: Canary | None) -> ModelIdentity:
        old = require(self._current, "the model being replaced")
        started = time.perf_counter()
        self._paused = True  # new and queued requests wait for a slot instead of failing
        try:
            async with self._slot_freed:
                await self._slot_freed.wait_for(lambda: self._active == 0)
            self._current = None  # a planned stop: the restart watcher leaves it alone
            self.state = "loading"
            await old.stop()
            log.info("event=drained model=%s drain_s=%.2f", old.identity.name, time.perf_counter() - started)
            try:
                new = await self._start_worker(model_dir)
                if canary is not None:
                    await self._check_canary(new, canary)
            except ActivationError as e:
                self.last_error = str(e)
                log.error("event=model_switch_failed model_dir=%s mode=drain error=%s: reloading %s", model_dir, e,
                          old.identity.model_dir)
                restored = await self._start_worker(Path(old.identity.model_dir))
                self._install(restored)
                raise
            self._install(new)
            self.metrics.model_switches_total += 1
            log.info("event=model_switch model=%s version=%s mode=drain switch_s=%.2f previous=%s",
                     new.identity.name, new.identity.version, time.perf_counter() - started, old.identity.name)
            return new.identity
        finally:
            self._paused = False
            if self._current is None:
                self.state = "failed"
            async with self._slot_freed:
                self._slot_freed.notify_all()

    def _install(self, worker: WorkerClient) -> None:
        self._current = worker
        self.state = "ready"
        self._spawn(self._restart_when_dead(worker))

    @property
    def current_worker(self) -> WorkerClient | None:
        """The worker new requests go to (the daemon watches it during probation)."""
        return self._current

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _restart_when_dead(self, worker: WorkerClient) -> None:
        """A worker that dies while it is the current one is restarted from the same dir.

        Its open requests have already failed with `worker_died` (503); queued
        ones wait and then go to the restarted worker. Restarts back off
        (1, 2, 4 ... 60 s) while each restarted worker dies within `STABLE_WORKER_S`,
        so that a model that crashes soon after every load cannot spin the CPU. A
        restart that fails leaves the host `failed`: queued requests get a 503.
        """
        await worker.wait_exited()
        if self._current is not worker:
            return  # switched away or closed: a planned stop
        self.metrics.worker_restarts_total += 1
        if time.monotonic() - worker.ready_at >= STABLE_WORKER_S:
            self._consecutive_restarts = 0  # it served a good while: a new incident, not a loop
        delay_s = min(60.0, 2.0 ** (self._consecutive_restarts))
        self._consecutive_restarts += 1
        self.state = "loading"
        log.error("event=worker_died model=%s pid=%d code=%s restart_in_s=%.0f", worker.identity.name,
                  worker.proc.pid, worker.proc.returncode, delay_s)
        await asyncio.sleep(delay_s)
        if self._current is not worker:
            return
        try:
            await self.switch(Path(worker.identity.model_dir), _is_restart=True)
        except ActivationError:
            self.state = "failed"
            async with self._slot_freed:
                self._slot_freed.notify_all()  # queued requests get 503 instead of waiting forever
            return

    async def _check_canary(self, worker: WorkerClient, canary: Canary) -> None:
        """The new worker replays the manifest's canary; the leads of its tokens must match the
        build host's within a CPU difference (`agent.wire.canary`); then each output contract it
        carries answers its first example validly. Otherwise the switch is refused."""
        failed = "its canary"
        reason = await self._canary_failure(worker, canary)
        if reason is None:
            failed = "its contract check"
            reason = await self._contract_failure(worker)
            if reason is None:
                return
        await worker.stop()
        message = (f"model {worker.identity.name} v{worker.identity.version} failed {failed}: {reason}:"
                   " the previous model keeps serving; rebuild or roll back the release")
        self.last_error = message
        if self._current is None:
            self.state = "failed"
        log.error("event=canary_failed model=%s error=%s", worker.identity.name, message)
        raise ActivationError(message)

    async def _canary_failure(self, worker: WorkerClient, canary: Canary) -> str | None:
        """Why the text canary, then the image canary (a model that takes images), failed; None: passed."""
        try:
            leads = await worker.canary_leads(canary.prompt, canary.expected_token_ids)
        except RuntimeModelError as e:
            return str(e)
        verdict = (judge_leads(canary.expected_leads, leads) if canary.expected_leads is not None
                   else judge_without_leads(leads))
        if not verdict.passed:
            return f"{verdict.reason}: the weights, tokenizer or config are not the ones that were built"
        log.info("event=canary_passed model=%s tokens=%d worst_position=%d worst_change=%.3f",
                 worker.identity.name, len(leads), verdict.worst_position, verdict.worst_change)
        if canary.image is None:
            return None
        image = canary.image
        try:
            picture = await anyio.to_thread.run_sync(_canary_picture, Path(worker.identity.model_dir), image.image_file)
            leads = await worker.canary_leads(image.prompt, image.expected_token_ids, [picture])
        except ImageError as e:
            return f"the image canary's picture cannot be used: {e}"
        except RuntimeModelError as e:
            return f"the image canary: {e}"
        verdict = judge_leads(image.expected_leads, leads)
        if not verdict.passed:
            return (f"the image canary: {verdict.reason}: the vision model, processor or weights are not the ones "
                    "that were built")
        log.info("event=image_canary_passed model=%s tokens=%d worst_position=%d worst_change=%.3f",
                 worker.identity.name, len(leads), verdict.worst_position, verdict.worst_change)
        return None

    async def _contract_failure(self, worker: WorkerClient) -> str | None:
        """Each contract's first example, answered as a request to `<model>/<contract>` would be:
        it must end by itself, and parse where the format is JSON (the build checked them all)."""
        for name, contract in worker.identity.contracts.items():
            request = example_request(contract, contract.examples[0])
            options = request.sampling_options()
            if options.max_tokens is None:
                options = dataclasses.replace(options, max_tokens=CHECK_MAX_TOKENS)
            command = GenerateCommand(id=f"contract-{os.urandom(6).hex()}", options=options,
                                      messages=[m.to_chat_message() for m in request.messages],
                                      tools=request.tools_json)
            parts: list[str] = []
            finish: str | None = None
            async for event in worker.generate(command):
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                elif isinstance(event, DoneEvent):
                    finish = event.finish_reason
                elif isinstance(event, ErrorEvent):
                    return f"contract {name!r} could not run ({event.kind}): {event.message}"
            problem = answer_problem(contract, "".join(parts), ended=finish == "stop")
            if problem is not None:
                return f"contract {name!r}, its first example: {problem}"
            log.info("event=contract_checked model=%s contract=%s", worker.identity.name, name)
        return None

    async def _drain_and_stop(self, old: WorkerClient) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        async with self._slot_freed:
            while old.inflight and old.is_alive and time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(self._slot_freed.wait(), timeout=max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
        if old.inflight:
            log.warning("event=drain_timeout model=%s open_requests=%d", old.identity.name, old.inflight)
            old.end_open_requests("model_replaced", f"the model was replaced and this request ran past the drain"
                                                    f" timeout (drain_timeout_s = {self.drain_timeout_s:g} s): retry"
                                                    f" it on the new model")
        await old.stop()

    async def close(self) -> None:
        current, self._current = self._current, None
        self.state = "empty"
        if current is not None:
            await current.stop()

    async def set_limits(self, parallel: int, queue_size: int) -> None:
        """New slot and queue sizes, at once: requests already admitted run on; waiters recheck."""
        self.parallel, self.queue_size = parallel, queue_size
        log.info("event=serving_limits parallel=%d queue_size=%d", parallel, queue_size)
        await self._notify_slot_freed()

    async def stop_serving(self, message: str) -> None:
        """The agent is stopping and its drain ran out: open and queued requests end with a 503
        `agent_stopping` that carries `message`, new ones are refused with it."""
        self._stopped = message
        if self._current is not None:
            self._current.end_open_requests("agent_stopping", message)
        await self._notify_slot_freed()

    async def _acquire_slot(self) -> WorkerClient:
        if self._stopped is not None:
            raise ModelNotReadyError(self._stopped)
        if self._current is None and not self._paused:
            raise ModelNotReadyError("loading model" if self.state == "loading" else
                                     f"no model is loaded ({self.last_error or 'none configured'})")
        if self._current is not None and not self._current.is_alive and not self._paused:
            raise ModelNotReadyError("the model worker died and is restarting: retry in a few seconds")
        if self._active + self._waiting >= self.parallel + self.queue_size:
            # A slot frees about every (tokens per request / tokens per s); a second is a fair hint.
            raise QueueFullError(f"all {self.parallel} slots are busy and {self._waiting} requests are queued "
                                 f"(queue size {self.queue_size}): retry later", retry_after_s=1)
        self._waiting += 1
        self.metrics.queue_depth = self._waiting
        try:
            async with self._slot_freed:
                await self._slot_freed.wait_for(lambda: self._stopped is not None or (
                    self.state == "failed" and not self._paused) or (
                    not self._paused and self._active < self.parallel and self._current is not None
                    and self._current.is_alive))
                if self._stopped is not None:
                    raise ModelNotReadyError(self._stopped)
                if self.state == "failed":
                    raise ModelNotReadyError(f"the model failed to restart: {self.last_error}")
                self._active += 1
        finally:
            self._waiting -= 1
            self.metrics.queue_depth = self._waiting
        self.metrics.active_requests = self._active
        return require(self._current, "the serving model")

    def _release_slot(self) -> None:
        # Synchronous on purpose: it runs in the finally of cancelled tasks, where an await
        # would be cancelled again; the waiters are woken from a task of their own.
        self._active -= 1
        self.metrics.active_requests = self._active
        self._spawn(self._notify_slot_freed())

    async def _notify_slot_freed(self) -> None:
        async with self._slot_freed:
            self._slot_freed.notify_all()

    async def generate(self, *, prompt: str | None = None, messages: list[ChatMessage] | None = None,
                       tools: str | None = None, options: SamplingOptions,
                       images: list[str] | None = None) -> AsyncGenerator[tuple[WorkerClient, RequestEvent], None]:
        """Wait for a slot, then yield the request's events (with the worker that runs it).
        `images`: base64 PNGs written by `agent.serving.images`, one per image tag of the prompt.

        Raises (before the first event):
            ModelNotReadyError: no model is loaded.
            QueueFullError: all slots are busy and the queue is full.
        """
        worker = await self._acquire_slot()
        command = GenerateCommand(id=uuid.uuid4().hex, prompt=prompt, messages=messages, tools=tools,
                                  options=options, stream_interval_s=self.stream_interval_s, images=images)
        admitted = time.perf_counter()
        first_token_at: float | None = None
        try:
            # aclosing: a consumer that stops early cancels the worker's generation now, not at GC.
            async with aclosing(worker.generate(command)) as events:
                async for event in events:
                    if isinstance(event, TokenEvent) and first_token_at is None:
                        first_token_at = time.perf_counter()
                        self.metrics.observe_ttft(first_token_at - admitted)
                    elif isinstance(event, DoneEvent):
                        decode_s = time.perf_counter() - first_token_at if first_token_at else 0.0
                        self.metrics.observe_generation(event.prompt_tokens, event.completion_tokens, decode_s,
                                                        event.cached_tokens)
                    yield worker, event
        finally:
            self._release_slot()

    async def wait_idle(self, timeout_s: float) -> None:
        """Wait until no request is active or queued (tests and shutdown)."""
        async with asyncio.timeout(timeout_s):
            async with self._slot_freed:
                await self._slot_freed.wait_for(lambda: self._active == 0 and self._waiting == 0)


def _canary_picture(model_dir: Path, image_file: str) -> str:
    """The image canary's picture from the model dir, re-encoded as PNG (what the worker may be
    given: `agent.serving.images`), base64."""
    data = read_file_inside(model_dir, image_file, MAX_CANARY_IMAGE_BYTES, "the image canary's picture")
    return base64.b64encode(to_png(data)).decode("ascii")


__all__ = ["ModelHost"]

"""The model-worker process (its client in the API process: `agent.serving.worker.client`,
its wire: `agent.wire.worker`).

Why a process: the model's memory and its native code stay apart from the API
process. A crash or a hang in onnxruntime-genai kills a worker, not the agent;
a model switch loads the new model in a new worker and drops the old one
whole; and the API's event loop never waits on a step. One worker process per
loaded model owns the model and gives every active request one token per round
(fair sharing, like a slot scheduler): the text requests in one run of the
batched decode (`agent.serving.batch`), the others (beam search, constraints,
images) by stepping their onnxruntime-genai generators; the API process only
routes and streams.

Lean on purpose: the worker never imports pydantic, and runs onnxruntime-genai and
onnxruntime through their C APIs (`agent.serving.oga`, `agent.serving.ort`), since its
memory is counted against a bare onnxruntime-genai process holding the same model.

Events go to a private copy of stdout. The worker points fd 1 at stderr before
loading, so anything native code prints cannot corrupt the stream.

Crash behaviour: the worker exits when its stdin closes (the API process died,
even by `kill -9`); when the worker dies, its client fails every open request
with a `worker_died` error and reports itself dead (`agent.serving.worker.client`).
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from agent.serving import oga
from agent.serving.batch import StoredKv
from agent.serving.generation import BatchedGeneration, Generation, OgaGeneration, StepResult, decode_all
from agent.serving.prefix_cache import PrefixCache
from agent.serving.runtime import ModelRuntime
from agent.wire.errors import ContextLengthError, EdgefleetError, GuidanceError, OgaError, RuntimeModelError
from agent.wire.worker import (
    DEFAULT_MAX_NEW_TOKENS,
    PREFILL_CHUNK_TOKENS,
    CanaryCommand,
    CanaryEvent,
    CancelCommand,
    Command,
    DoneEvent,
    ErrorEvent,
    Event,
    GenerateCommand,
    LoadFailedEvent,
    ReadyEvent,
    ShutdownCommand,
    StartedEvent,
    TokenEvent,
    TokenLogprob,
    parse_command,
)

log = logging.getLogger(__name__)

# Tokens of kept KV recomputed at a time while idle: a request arriving meanwhile waits for at
# most one such batch (tens of ms for SmolLM2 on 2 cores).
SETTLE_CHUNK_TOKENS = 32
# Prompt tokens prefilled per round while other generations decode (alone: PREFILL_CHUNK_TOKENS).
INTERLEAVED_PREFILL_TOKENS = 32


# ---- the worker process ----

@dataclass
class _Active:
    """One generation in the worker, with the tokens it holds back until its next event."""

    generation: Generation
    prompt_tokens: int
    stream_interval_s: float
    held_ids: list[int] = field(default_factory=list)
    held_text: str = ""
    held_logprobs: list[TokenLogprob] | None = None
    last_sent: float | None = None  # monotonic time of the last token event; None: none yet

    def hold(self, step: StepResult) -> None:
        self.held_ids.extend(step.token_ids)
        self.held_text += step.text
        if step.logprobs is not None:
            self.held_logprobs = [*(self.held_logprobs or []), *step.logprobs]

    def take_due(self, request_id: str, now: float) -> TokenEvent | None:
        """The held tokens as one event if they are due, else None.

        Due: the first token (time to first token is never traded), the end of
        the generation, or `stream_interval_s` passed since the last event.
        Every token event wakes the API process and costs a write to the client:
        at 200 tok/s on 2 cores that costs decode speed (measured: 0.92 of the
        raw loop token by token, 0.96 with 50 ms).
        """
        if not (self.held_ids or self.held_text):
            return None
        is_due = (self.last_sent is None or self.generation.finish_reason is not None
                  or now - self.last_sent >= self.stream_interval_s)
        if not is_due:
            return None
        event = TokenEvent(id=request_id, token_ids=self.held_ids, text=self.held_text, logprobs=self.held_logprobs)
        self.held_ids, self.held_text, self.held_logprobs, self.last_sent = [], "", None, now
        return event


class _Worker:
    """Gives every active generation a step per round; reads commands between rounds."""

    def __init__(self, runtime: ModelRuntime, out: IO[bytes], prefix_cache_bytes: int = 0) -> None:
        self.runtime = runtime
        self.out = out
        self.commands: queue.Queue[Command] = queue.Queue()
        self.active: dict[str, _Active] = {}
        # What the prefix cache keeps: the batched decode's KV where it runs the model, else
        # onnxruntime-genai's generators (the other's requests are then never kept).
        self.slot_cache: PrefixCache[StoredKv] | None = None
        self.generator_cache: PrefixCache[oga.Generator] | None = None
        self.cache: PrefixCache[StoredKv] | PrefixCache[oga.Generator]
        if runtime.decoder is not None:
            self.cache = self.slot_cache = PrefixCache(prefix_cache_bytes, runtime.kv_bytes_per_token)
        else:
            self.cache = self.generator_cache = PrefixCache(prefix_cache_bytes, runtime.kv_bytes_per_token)

    def send(self, event: Event) -> None:
        self.out.write(event.to_line())
        self.out.flush()

    def read_stdin(self) -> None:
        for line in sys.stdin.buffer:
            try:
                self.commands.put(parse_command(line))
            except ValueError as e:
                log.warning("event=bad_command error=%s", e)
        self.commands.put(ShutdownCommand())  # the API process is gone

    def handle(self, command: Command) -> bool:
        if isinstance(command, ShutdownCommand):
            return False
        if isinstance(command, CancelCommand):
            entry = self.active.pop(command.id, None)
            if entry is not None:  # held tokens are dropped: nobody is reading them
                entry.generation.cancel()
                self.send(DoneEvent(id=command.id, finish_reason="cancelled", prompt_tokens=entry.prompt_tokens,
                                    completion_tokens=len(entry.generation.completion_ids),
                                    cached_tokens=entry.generation.reused_tokens))
            return True
        if isinstance(command, CanaryCommand):
            self.run_canary(command)
            return True
        self.admit(command)
        return True

    def run_canary(self, command: CanaryCommand) -> None:
        """Teacher-force the canary now, between rounds: it runs before the model serves anyone."""
        try:
            images = [base64.b64decode(image) for image in command.images or []]
            leads = self.runtime.teacher_forced_leads(command.prompt, command.token_ids, images)
        except ContextLengthError as e:
            self.send(ErrorEvent(id=command.id, kind="context_length", message=str(e)))
        except ValueError as e:  # a token id outside this model's vocabulary
            self.send(ErrorEvent(id=command.id, kind="invalid_request", message=str(e)))
        except EdgefleetError as e:
            self.send(ErrorEvent(id=command.id, kind="runtime", message=str(e)))
        else:
            self.send(CanaryEvent(id=command.id, leads=leads))

    def admit(self, command: GenerateCommand) -> None:
        try:
            if command.messages is not None:
                text = self.runtime.apply_chat_template(command.messages, command.tools)
            elif command.prompt is not None:
                text = command.prompt
            else:
                raise ValueError("a generate command needs prompt or messages")
            generation: Generation
            if command.images:
                generation = self.runtime.start_with_images(
                    text, [base64.b64decode(image) for image in command.images], command.options)
                prompt_ids = generation.prompt_ids
            else:
                prompt_ids = self.runtime.encode(text)
                if not prompt_ids:
                    raise ValueError("the prompt is empty: send at least one token of text")
                if self.runtime.batches(command.options):
                    generation = self.runtime.start_batched(prompt_ids, command.options, self.slot_cache)
                else:
                    generation = self.runtime.start(prompt_ids, command.options, self.generator_cache)
        except ContextLengthError as e:
            self.send(ErrorEvent(id=command.id, kind="context_length", message=str(e)))
            return
        except (ValueError, GuidanceError) as e:
            self.send(ErrorEvent(id=command.id, kind="invalid_request", message=str(e)))
            return
        except EdgefleetError as e:
            self.send(ErrorEvent(id=command.id, kind="runtime", message=str(e)))
            return
        except Exception as e:  # a bug: this request fails, the model and the other requests stay
            log.exception("event=admit_failed id=%s", command.id)
            self.send(ErrorEvent(id=command.id, kind="runtime",
                                 message=f"internal error in the model worker ({type(e).__name__}): see its log"))
            return
        self.active[command.id] = _Active(generation, len(prompt_ids), command.stream_interval_s)
        self.send(StartedEvent(id=command.id, prompt_tokens=len(prompt_ids)))

    def settle(self) -> None:
        """Make a step of a kept completion's KV exact (`agent.serving.prefix_cache`) while idle."""
        try:
            self.cache.settle_step(SETTLE_CHUNK_TOKENS)
        except OgaError as e:
            log.warning("event=prefix_cache_settle_failed error=%s", e)

    def run(self) -> None:
        while True:
            # Idle: block for work, unless kept KV is to be settled. Busy: take what arrived since the last round.
            pending: list[Command] = []
            idle = not self.active and not self.cache.has_unsettled
            if idle and self.runtime.decoder is not None:
                self.runtime.decoder.trim()
            try:
                pending.append(self.commands.get(block=idle))
                while True:
                    pending.append(self.commands.get_nowait())
            except queue.Empty:
                pass
            for command in pending:
                if not self.handle(command):
                    return
            if not self.active and not pending:
                self.settle()
            # A prompt arriving while others decode is prefilled a small batch per round, so their
            # next tokens wait for that batch, not for the whole prompt.
            chunk = PREFILL_CHUNK_TOKENS if len(self.active) == 1 else INTERLEAVED_PREFILL_TOKENS
            self.step_round(chunk)

    def step_round(self, chunk: int) -> None:
        """One token of every decoding request (the batched ones in one run per group of slots), and
        a prefill batch of at most `chunk` tokens of every request still prefilling."""
        batched = {request_id: entry for request_id, entry in self.active.items()
                   if isinstance(entry.generation, BatchedGeneration)}
        decoding = [request_id for request_id in batched if self._batched(request_id).is_decoding]
        if decoding:
            try:
                results = decode_all([self._batched(request_id) for request_id in decoding])
            except RuntimeModelError as e:
                for request_id in decoding:
                    self.fail(request_id, e)
            else:
                for request_id, result in zip(decoding, results, strict=True):
                    self.deliver(request_id, result)
        for request_id, entry in list(self.active.items()):
            if request_id in decoding or request_id not in self.active:
                continue
            generation = entry.generation
            try:
                if isinstance(generation, BatchedGeneration):
                    result = generation.prefill_step(chunk)
                else:
                    assert isinstance(generation, OgaGeneration)  # noqa: S101 (the only other kind)
                    result = generation.step(chunk)
            except RuntimeModelError as e:
                self.fail(request_id, e)
                continue
            self.deliver(request_id, result)

    def _batched(self, request_id: str) -> BatchedGeneration:
        generation = self.active[request_id].generation
        assert isinstance(generation, BatchedGeneration)  # noqa: S101 (chosen so by the caller)
        return generation

    def fail(self, request_id: str, error: RuntimeModelError) -> None:
        entry = self.active.pop(request_id)
        entry.generation.release()
        self.send(ErrorEvent(id=request_id, kind="runtime", message=str(error)))

    def deliver(self, request_id: str, result: StepResult) -> None:
        """Send what is due of a step's result; end the request when its generation finished."""
        entry = self.active[request_id]
        generation = entry.generation
        entry.hold(result)
        tokens = entry.take_due(request_id, time.monotonic())
        if tokens is not None:
            self.send(tokens)
        if generation.finish_reason is not None:
            del self.active[request_id]
            generation.release()
            self.send(DoneEvent(id=request_id, finish_reason=generation.finish_reason,
                                prompt_tokens=entry.prompt_tokens,
                                completion_tokens=len(generation.completion_ids),
                                cached_tokens=generation.reused_tokens))


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.serving.worker",
                                     description="edgefleet model-worker process")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--allow-custom-ops", action="store_true")
    parser.add_argument("--prefix-cache-bytes", type=int, default=0)
    parser.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s worker[%(process)d] %(name)s %(message)s")
    # The event stream gets a private fd; fd 1 goes to stderr so native prints cannot corrupt it.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    started = time.perf_counter()
    try:
        runtime = ModelRuntime(args.model_dir, intra_op_num_threads=args.threads,
                               allow_custom_ops=args.allow_custom_ops, default_max_tokens=args.default_max_tokens,
                               batch=True)
    except EdgefleetError as e:
        out.write(LoadFailedEvent(error_type=type(e).__name__, message=str(e)).to_line())
        return 1
    worker = _Worker(runtime, out, args.prefix_cache_bytes)
    worker.send(ReadyEvent(threads=runtime.threads, pid=os.getpid(),
                           load_s=time.perf_counter() - started))
    threading.Thread(target=worker.read_stdin, name="commands", daemon=True).start()
    try:
        worker.run()
    except BrokenPipeError:
        pass  # the API process is gone
    for entry in worker.active.values():
        entry.generation.cancel()
    worker.cache.clear()
    runtime.close()
    oga.shutdown()
    return 0


def run_and_exit() -> None:
    """The process entry point (`python -m agent.serving.worker`)."""
    exit_code = worker_main()
    logging.shutdown()
    sys.stderr.flush()
    # Not sys.exit: the stdin reader thread is blocked in read(), and finalizing the
    # interpreter under it aborts ("could not acquire lock for <stdin>", SIGABRT).
    os._exit(exit_code)

"""The runtime around onnxruntime-genai: load a model dir, apply its chat
template, map OpenAI search options onto `GeneratorParams`, step generators.

This module holds the model in the calling process. `generate_next_token`
holds the GIL, so the API never calls it: the model-worker process
(`agent/worker.py`) does. Tools that run one generation at a time
(`edge-agent prompt --model`, the canary health check) use it directly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import ActivationError, RuntimeModelError
from agent.manifest import MANIFEST_FILENAME, Manifest

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]
# OpenAI caps a request at 4 stop sequences; ORT-GenAI's own turn API at 16.
MAX_STOP_SEQUENCES = 4
# A request without max_tokens gets at most this many: with past_present_share_buffer the
# KV cache is allocated for the whole max_length up front, and a full 8k context of
# SmolLM2 would take ~0.4 GB per request on a small box.
DEFAULT_MAX_NEW_TOKENS = 1024


class ContextLengthError(RuntimeModelError):
    """Prompt plus requested completion do not fit the model's context (an HTTP 400)."""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class SamplingOptions(BaseModel):
    """The search options of one request, already validated (wire format of the worker)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=50, ge=0)
    max_tokens: int | None = Field(default=None, gt=0,
                                   description="None: DEFAULT_MAX_NEW_TOKENS, within the context length")
    seed: int | None = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    num_beams: int = Field(default=1, ge=1, le=8)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.num_beams > 1


class ModelIdentity(BaseModel):
    """What `/v1/models` reports: the manifest's name and version, else the dir name."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    name: str
    version: int | None
    model_dir: str
    context_length: int


def default_threads() -> int:
    """The CPUs this process may run on (cgroup/affinity aware where Linux tells us)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def read_identity(model_dir: Path) -> ModelIdentity:
    """Name/version from `manifest.json` when present and valid, else the dir name.

    Raises:
        ActivationError: the dir has no readable `genai_config.json`.
    """
    config_path = model_dir / "genai_config.json"
    try:
        genai_config = json.loads(config_path.read_text())
        context_length = int(genai_config["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ActivationError(
            f"{config_path} is missing or not an onnxruntime-genai config ({e}): "
            "pass a model dir built by edge-builder"
        ) from e
    name, version = model_dir.resolve().name, None
    manifest_path = model_dir / MANIFEST_FILENAME
    if manifest_path.is_file():
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_bytes())
            name, version = manifest.name, manifest.version
        except (OSError, ValidationError) as e:
            log.warning("event=manifest_unreadable path=%s error=%s", manifest_path, str(e).splitlines()[0])
    return ModelIdentity(name=name, version=version, model_dir=str(model_dir), context_length=context_length)


def stop_split(text: str, stops: Sequence[str]) -> tuple[int, bool]:
    """How much of `text` (not yet emitted) may be emitted now, and whether a stop matched.

    Returns (n, stopped): emit `text[:n]`. When a stop sequence occurs, `n` is
    where it starts and `stopped` is True. Otherwise `n` holds back the longest
    tail that could still grow into a stop sequence, so no client ever sees
    part of one.
    """
    if not stops:
        return len(text), False
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if first >= 0:
        return first, True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold, False


@dataclass
class StepResult:
    """What one step produced: the new token ids and the text now safe to show."""

    token_ids: list[int]
    text: str


@dataclass
class Generation:
    """One request's generator with its text bookkeeping (stop sequences, deltas).

    Greedy and sampling stream token by token; beam search only knows its best
    sequence at the end, so it emits everything in its last step.
    """

    runtime: ModelRuntime
    prompt_ids: list[int]
    options: SamplingOptions
    _generator: Any = None
    _stream: Any = None
    completion_ids: list[int] = field(default_factory=list)
    _pending_text: str = ""
    finish_reason: FinishReason | None = None
    _is_prefilled: bool = False
    _budget: int = 0

    def __post_init__(self) -> None:
        og = self.runtime.og
        params = og.GeneratorParams(self.runtime.model)
        search = self.runtime.search_options(len(self.prompt_ids), self.options)
        self._budget = int(search["max_length"]) - len(self.prompt_ids)
        params.set_search_options(**search)
        self._generator = og.Generator(self.runtime.model, params)
        self._stream = self.runtime.tokenizer.create_stream()

    @property
    def is_done(self) -> bool:
        return self.finish_reason is not None

    def step(self) -> StepResult:
        """Prefill on the first call, then one decode step (all of them for beam search).

        Raises:
            RuntimeModelError: onnxruntime-genai failed.
        """
        try:
            return self._step()
        except RuntimeModelError:
            raise
        except Exception as e:  # onnxruntime-genai raises plain RuntimeError
            raise RuntimeModelError(f"generation failed in onnxruntime-genai: {e}") from e

    def _step(self) -> StepResult:
        g = self._generator
        if not self._is_prefilled:
            g.append_tokens(self.prompt_ids)
            self._is_prefilled = True
        if self.options.num_beams > 1:
            while not g.is_done():
                g.generate_next_token()
            new_ids = [int(t) for t in g.get_sequence(0)[len(self.prompt_ids):]]
            new_text = self.runtime.tokenizer.decode(new_ids) if new_ids else ""
        else:
            if g.is_done():
                new_ids, new_text = [], ""
            else:
                g.generate_next_token()
                new_ids = [int(g.get_next_tokens()[0])]
                new_text = self._stream.decode(new_ids[0])
        self.completion_ids.extend(new_ids)
        self._pending_text += new_text
        n, stopped = stop_split(self._pending_text, self.options.stop)
        emit, self._pending_text = self._pending_text[:n], self._pending_text[n:]
        if stopped:
            self.finish_reason = "stop"
        elif g.is_done() or self.options.num_beams > 1:
            emit += self._pending_text  # a held-back tail that never became a stop sequence
            self._pending_text = ""
            is_eos = bool(self.completion_ids) and self.completion_ids[-1] in self.runtime.eos_token_ids
            self.finish_reason = "length" if len(self.completion_ids) >= self._budget and not is_eos else "stop"
        return StepResult(token_ids=new_ids, text=emit)

    def cancel(self) -> None:
        self.finish_reason = "cancelled"
        self._generator = None  # frees the KV cache now, not at the next GC


class ModelRuntime:
    """A loaded ORT-GenAI model dir: tokenizer, chat template, generators.

    Raises (constructor):
        ActivationError: the dir is not a loadable model.
    """

    def __init__(self, model_dir: Path, *, intra_op_num_threads: int | None = None) -> None:
        import onnxruntime_genai as og  # imported here so --help works without the native library

        self.og = og
        self.model_dir = Path(model_dir)
        self.identity = read_identity(self.model_dir)
        self.threads = intra_op_num_threads or default_threads()
        try:
            config = og.Config(str(self.model_dir))
            # The decoder runs on one intra-op thread unless told: measured 1.5x decode
            # and 2x prefill with 2 threads on 2 cores.
            config.overlay(json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}}))
            self.model = og.Model(config)
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as e:  # onnxruntime-genai raises plain RuntimeError
            raise ActivationError(f"onnxruntime-genai cannot load {self.model_dir}: {e}") from e
        self.context_length = self.identity.context_length
        self.eos_token_ids = {int(t) for t in self.tokenizer.eos_token_ids}
        log.info("event=model_loaded dir=%s name=%s version=%s threads=%d context_length=%d",
                 self.model_dir, self.identity.name, self.identity.version, self.threads, self.context_length)

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> str:
        """The model's own chat template (chat_template.jinja / tokenizer_config.json)."""
        payload = json.dumps([{"role": m.role, "content": m.content} for m in messages])
        try:
            return str(self.tokenizer.apply_chat_template(payload, add_generation_prompt=True))
        except Exception as e:
            raise RuntimeModelError(f"chat template of {self.model_dir} failed: {e}") from e

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids))) if token_ids else ""

    def check_context(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The completion budget for this prompt.

        Raises:
            ContextLengthError: the prompt (plus max_tokens, when given) exceeds the context.
        """
        if prompt_tokens >= self.context_length:
            raise ContextLengthError(
                f"this model's maximum context length is {self.context_length} tokens, the prompt has "
                f"{prompt_tokens} tokens: shorten the prompt")
        if max_tokens is not None and prompt_tokens + max_tokens > self.context_length:
            raise ContextLengthError(
                f"this model's maximum context length is {self.context_length} tokens, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in "
                "max_tokens): reduce the prompt or max_tokens")
        if max_tokens is not None:
            return max_tokens
        return min(DEFAULT_MAX_NEW_TOKENS, self.context_length - prompt_tokens)

    def search_options(self, prompt_tokens: int, options: SamplingOptions) -> dict[str, Any]:
        """Map OpenAI-style options onto ORT-GenAI search options (greedy when temperature is 0)."""
        budget = self.check_context(prompt_tokens, options.max_tokens)
        search: dict[str, Any] = {
            "max_length": prompt_tokens + budget,
            "repetition_penalty": options.repetition_penalty,
            "num_beams": options.num_beams,
        }
        if options.num_beams > 1:
            search.update(do_sample=False, num_return_sequences=1, early_stopping=True)
        elif options.temperature == 0.0:
            search.update(do_sample=False)
        else:
            search.update(do_sample=True, temperature=options.temperature, top_p=options.top_p,
                          top_k=options.top_k)
        if options.seed is not None:
            search["random_seed"] = options.seed
        return search

    def start(self, prompt_ids: list[int], options: SamplingOptions) -> Generation:
        """A new generation; raises ContextLengthError before allocating anything."""
        self.check_context(len(prompt_ids), options.max_tokens)
        return Generation(self, prompt_ids, options)

    def generate(self, prompt_ids: list[int], options: SamplingOptions) -> Iterator[StepResult]:
        """Run one generation to its end in this process."""
        generation = self.start(prompt_ids, options)
        while not generation.is_done:
            yield generation.step()

    def greedy_token_ids(self, prompt_text: str, max_new_tokens: int) -> list[int]:
        """Greedy completion token ids of `prompt_text` as is (no chat template).

        The canary health check compares these with the manifest's
        `evaluation.canary.expected_token_ids`; generation stops at EOS or
        after `max_new_tokens`.
        """
        options = SamplingOptions(temperature=0.0, max_tokens=max_new_tokens)
        ids: list[int] = []
        for step in self.generate(self.encode(prompt_text), options):
            ids.extend(step.token_ids)
        return ids

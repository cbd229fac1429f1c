"""The runtime of a model dir: its tokenizer and chat template, and each request's
generation, in the batched decode (`agent.serving.batch`) or in an onnxruntime-genai
generator (OpenAI search options mapped onto `GeneratorParams`).

This module holds the model in the calling process, through the C APIs of
onnxruntime-genai (`agent.serving.oga`) and onnxruntime (`agent.serving.ort`). The API process never loads a model: the
model-worker process (`agent/serving/worker/process.py`) does. Tools that run one generation
at a time (`edge-agent prompt --model`, the canary health check) use it directly.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.serving import oga
from agent.serving.batch import BatchDecoder, Slot, StoredKv, read_decoder_graph
from agent.serving.prefix_cache import PrefixCache, batch_end
from agent.serving.sampling import Sampler, log_softmax_at
from agent.wire import toolcalls
from agent.wire.canary import token_lead
from agent.wire.errors import ActivationError, ContextLengthError, GuidanceError, OgaError, RuntimeModelError
from agent.wire.genai_config import image_tag
from agent.wire.loadcheck import check_model_dir
from agent.wire.worker import (
    DEFAULT_MAX_NEW_TOKENS,
    PREFILL_CHUNK_TOKENS,
    ChatMessage,
    FinishReason,
    SamplingOptions,
    TokenLogprob,
    TopLogprob,
)

log = logging.getLogger(__name__)


# A generator kept by the prefix cache serves a later turn only if that turn's prompt and
# completion fit the KV allocated for it: new cacheable generators get this much room beyond
# their own request.
PREFIX_HEADROOM_TOKENS = 1024

_GUIDANCE_LABELS = {"json_schema": "JSON schema", "regex": "regex", "lark_grammar": "lark grammar"}


def default_threads() -> int:
    """The CPUs this process may run on (cgroup/affinity aware where Linux tells us)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def read_context_length(model_dir: Path) -> int:
    """The model's context length from its `genai_config.json`.

    Raises:
        ActivationError: the dir has no readable `genai_config.json`.
    """
    config_path = model_dir / "genai_config.json"
    try:
        genai_config = json.loads(config_path.read_text())
        return int(genai_config["model"]["context_length"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ActivationError(
            f"{config_path} is missing or not an onnxruntime-genai config ({e}): "
            "pass a model dir built by edge-builder"
        ) from e


def _read_vocab_size(model_dir: Path) -> int:
    """The vocabulary size `genai_config.json` declares; 0 when it declares none (nothing is checked)."""
    try:
        return int(json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def read_kv_bytes_per_token(model_dir: Path) -> int:
    """The bytes of KV cache one token takes, by `genai_config.json`: keys and values of every layer,
    fp16 in a GPU build's graph, fp32 in a CPU build's (what the 0.18 builder writes); 0 when the
    config does not say (nothing can then be kept within a budget)."""
    try:
        genai_config = json.loads((model_dir / "genai_config.json").read_text())["model"]
        decoder = genai_config["decoder"]
        per_layer = int(decoder["num_key_value_heads"]) * int(decoder["head_size"])
        is_gpu_graph = any(decoder.get("session_options", {}).get("provider_options") or [])
        return 2 * int(decoder["num_hidden_layers"]) * per_layer * (2 if is_gpu_graph else 4)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


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


def prefix_cache_key(options: SamplingOptions, search: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a kept generator must have been created with to serve this request (onnxruntime-genai
    fixes search options at creation); None when this request's generator must not be shared:
    beam search, a constraint (its grammar state is the generator's), a seed (its sampler's
    state would continue another request's)."""
    if options.num_beams > 1 or options.guidance is not None or options.seed is not None:
        return None
    return tuple(sorted((k, v) for k, v in search.items() if k != "max_length"))


@dataclass
class StepResult:
    """What one step produced: the new token ids, the text now safe to show and, when the
    request asked, each new token's log-probability."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None


class Generation:
    """One request's output as it is generated: its token budget, stop sequences, text deltas.

    Its tokens come from an onnxruntime-genai generator (`OgaGeneration`: beam search,
    constraints, images, a model the batched decode cannot run) or from the worker's batched
    decode (`BatchedGeneration`).

    Raises (constructor):
        ContextLengthError: the prompt and max_tokens do not fit.
    """

    def __init__(self, runtime: ModelRuntime, prompt_ids: list[int], options: SamplingOptions) -> None:
        self.runtime = runtime
        self.prompt_ids = prompt_ids
        self.options = options
        self.search = runtime.search_options(len(prompt_ids), options)
        self.needed_length = int(self.search.pop("max_length"))
        self.budget = self.needed_length - len(prompt_ids)
        self.completion_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.reused_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self._prefilled = 0  # prompt tokens whose KV the generation holds
        self._pending_text = ""
        self._stream: oga.TokenizerStream | None = None

    @property
    def is_done(self) -> bool:
        return self.finish_reason is not None

    @property
    def is_prefilled(self) -> bool:
        return self._prefilled >= len(self.prompt_ids)

    def _advance(self, new_ids: list[int], new_text: str, logprobs: list[TokenLogprob] | None, *,
                 exhausted: bool) -> StepResult:
        """Take the step's tokens and text; the text now safe to show. `exhausted`: no token follows
        (an end-of-sequence token, the generator's end)."""
        self.completion_ids.extend(new_ids)
        self._pending_text += new_text
        n, stopped = stop_split(self._pending_text, self.options.stop)
        emit, self._pending_text = self._pending_text[:n], self._pending_text[n:]
        if stopped:
            self.finish_reason = "stop"
        elif exhausted or len(self.completion_ids) >= self.budget:
            emit += self._pending_text  # a held-back tail that never became a stop sequence
            self._pending_text = ""
            is_eos = bool(self.completion_ids) and self.completion_ids[-1] in self.runtime.eos_token_ids
            self.finish_reason = "length" if len(self.completion_ids) >= self.budget and not is_eos else "stop"
        return StepResult(token_ids=new_ids, text=emit, logprobs=logprobs)

    def _token_logprob(self, logits: np.ndarray | Sequence[float], token: int) -> TokenLogprob:
        logprob, top = log_softmax_at(logits, token, self.options.logprobs or 0)
        decode = self.runtime.decode
        return TokenLogprob(token=decode([token]), logprob=logprob,
                            top=[TopLogprob(token=decode([i]), logprob=lp) for i, lp in top])

    def cancel(self) -> None:
        self.finish_reason = "cancelled"
        self.release()

    def release(self) -> None:
        """Done with this generation: its KV goes to the prefix cache or is freed now."""
        raise NotImplementedError


class OgaGeneration(Generation):
    """A generation stepped by its own onnxruntime-genai generator.

    Greedy and sampling stream token by token; beam search only knows its best
    sequence at the end, so it emits everything in its last step.

    Raises (constructor):
        ContextLengthError: the prompt and max_tokens do not fit.
        GuidanceError: the constraint does not compile.
        RuntimeModelError: onnxruntime-genai cannot start a generation.
    """

    def __init__(self, runtime: ModelRuntime, prompt_ids: list[int], options: SamplingOptions,
                 cache: PrefixCache[oga.Generator] | None = None, inputs: oga.NamedTensors | None = None) -> None:
        """`cache`: finished generators kept for their KV (this one may start from one and goes back
        there); `inputs`: a multimodal prompt as the model's processor made it (`prompt_ids` are its
        input ids): the generator takes it whole at creation, and is never kept (its KV holds the images)."""
        super().__init__(runtime, prompt_ids, options)
        self.cache = cache
        self._generator: oga.Generator | None = None
        self._max_length = 0  # what the generator's KV is allocated for
        self._cache_key: tuple[Any, ...] | None = None  # None: this generation's generator is not kept
        self._counts: collections.Counter[int] = collections.Counter()  # for the penalties
        guidance = options.guidance
        if cache is not None and cache.enabled and inputs is None:
            self._cache_key = prefix_cache_key(options, self.search)
        try:
            reuse = None
            if self._cache_key is not None and cache is not None:
                reuse = cache.take(prompt_ids, self._cache_key, self.needed_length)
            if reuse is not None:
                self._generator, self._max_length, self.reused_tokens = reuse.generator, reuse.max_length, reuse.keep
                self._prefilled = reuse.keep
            else:
                # A kept generator serves later turns only if their prompt and completion fit it.
                headroom = PREFIX_HEADROOM_TOKENS if self._cache_key is not None else 0
                self._max_length = min(runtime.context_length, self.needed_length + headroom)
                self._generator = oga.Generator(runtime.model, {**self.search, "max_length": self._max_length},
                                                None if guidance is None else (guidance.kind, guidance.data))
                if inputs is not None:
                    self._generator.set_inputs(inputs)  # the first step runs the whole prompt
                    self._prefilled = len(prompt_ids)
            self._stream = runtime.tokenizer.create_stream()
        except OgaError as e:
            # The C API reports every failure as text; llguidance's compile errors start so (0.18).
            if guidance is not None and str(e).startswith("Error creating grammar"):
                detail = str(e).removeprefix("Error creating grammar: ")
                raise GuidanceError(f"response_format: the {_GUIDANCE_LABELS[guidance.kind]} does not compile "
                                    f"({detail}): fix it, or send the request without it") from e
            raise RuntimeModelError(f"onnxruntime-genai cannot start a generation: {e}") from e

    def step(self, prefill_chunk: int = PREFILL_CHUNK_TOKENS) -> StepResult:
        """The next batch of the prompt's prefill (at most `prefill_chunk` tokens, on cell boundaries;
        no token comes of it until the last), then one decode step (all of them for beam search).
        However the prompt is split, by reuse or by rounds beside other requests, its KV is the
        same (`agent.serving.prefix_cache`).

        Raises:
            RuntimeModelError: onnxruntime-genai failed.
        """
        try:
            return self._step(prefill_chunk)
        except OgaError as e:  # before its parent RuntimeModelError: say where it failed
            raise RuntimeModelError(f"generation failed in onnxruntime-genai: {e}") from e

    def _step(self, prefill_chunk: int) -> StepResult:
        g, stream = self._generator, self._stream
        if g is None or stream is None:
            raise RuntimeModelError("this generation was cancelled")
        logprobs: list[TokenLogprob] | None = [] if self.options.logprobs is not None else None
        if not self.is_prefilled:
            total = len(self.prompt_ids)
            # Beam search takes its prompt whole: it expands the beams from it.
            end = total if self.options.num_beams > 1 else batch_end(self._prefilled, total, prefill_chunk)
            g.append_tokens(self.prompt_ids[self._prefilled:end])
            self._prefilled = end
            if not self.is_prefilled:
                return StepResult(token_ids=[], text="")
        if self.options.num_beams > 1:
            while not g.is_done():
                g.generate_next_token()
            new_ids = g.sequence(0)[len(self.prompt_ids):]
            new_text = self.runtime.tokenizer.decode(new_ids) if new_ids else ""
        else:
            if g.is_done():
                new_ids, new_text = [], ""
            else:
                # The logits first (they run the model); generate_next_token then only samples from them.
                adjust = self._logit_adjustments()
                logits = g.logits(adjust) if self.options.logprobs is not None or adjust else None
                g.generate_next_token()
                new_ids = [g.next_token()]
                self._counts[new_ids[0]] += 1
                new_text = stream.decode(new_ids[0])
                if logits is not None and logprobs is not None:  # asked for, not only read to adjust
                    logprobs = [self._token_logprob(logits, new_ids[0])]
        return self._advance(new_ids, new_text, logprobs, exhausted=g.is_done() or self.options.num_beams > 1)

    def _logit_adjustments(self) -> dict[int, float] | None:
        """What to add to this step's logits: the request's biases, less OpenAI's penalties for
        every token the completion holds so far (presence once, frequency per occurrence)."""
        options = self.options
        if not options.adjusts_logits:
            return None
        add: dict[int, float] = {}
        for bias in options.logit_bias:
            add[bias.token_id] = add.get(bias.token_id, 0.0) + bias.bias
        if options.presence_penalty or options.frequency_penalty:
            for token, count in self._counts.items():
                add[token] = add.get(token, 0.0) - options.presence_penalty - options.frequency_penalty * count
        return add

    def release(self) -> None:
        """Done with this generation: its generator goes to the prefix cache when it finished
        whole and may be continued, else it is freed now (its KV with it, not at the next GC)."""
        generator, self._generator = self._generator, None
        if generator is None:
            return
        if self.cache is not None and self._cache_key is not None and self.finish_reason in ("stop", "length"):
            self.cache.put(generator, generator.sequence(0), len(self.prompt_ids), self._max_length, self._cache_key)
        else:
            generator.close()


# The batched decode's KV does not depend on search options (sampling is ours, per request): every
# kept one may serve every later request.
_SLOT_CACHE_KEY = "slot"


class BatchedGeneration(Generation):
    """A generation whose KV is a slot of the worker's batched decode (`agent.serving.batch`): the
    worker prefills it a batch at a time (`prefill_step`) and decodes every such generation's next
    token in one run (`decode_all`).

    Raises (constructor):
        ContextLengthError: the prompt and max_tokens do not fit.
    """

    def __init__(self, runtime: ModelRuntime, prompt_ids: list[int], options: SamplingOptions,
                 decoder: BatchDecoder, cache: PrefixCache[StoredKv] | None = None) -> None:
        super().__init__(runtime, prompt_ids, options)
        self.cache = cache
        self.sampler = Sampler(options, prompt_ids)
        reuse = cache.take(prompt_ids, _SLOT_CACHE_KEY, self.needed_length) if cache is not None and cache.enabled \
            else None
        self.slot: Slot | None = decoder.free_slot() or decoder.add_slots()
        if reuse is not None:
            try:
                reuse.generator.restore(self.slot)
            finally:
                reuse.generator.close()
            self._prefilled = self.reused_tokens = reuse.keep
        self._stream = runtime.tokenizer.create_stream()

    @property
    def is_decoding(self) -> bool:
        """Prefilled, with a token to feed for the next."""
        return self.is_prefilled and self.finish_reason is None

    def prefill_step(self, prefill_chunk: int = PREFILL_CHUNK_TOKENS) -> StepResult:
        """The next batch of the prompt's prefill, on cell boundaries; its first token with the last.

        Raises:
            RuntimeModelError: onnxruntime failed.
        """
        slot = self._live_slot()
        end = batch_end(self._prefilled, len(self.prompt_ids), prefill_chunk)
        try:
            logits = slot.decoder.prefill(slot, self.prompt_ids[self._prefilled:end])
        except OgaError as e:
            raise RuntimeModelError(f"prefill failed in onnxruntime: {e}") from e
        self._prefilled = end
        if not self.is_prefilled:
            return StepResult(token_ids=[], text="")
        return self.accept(logits)

    def accept(self, logits: np.ndarray) -> StepResult:
        """The next token, chosen from the logits after the last one."""
        stream = self._stream
        if stream is None:
            raise RuntimeModelError("this generation was cancelled")
        adjusted = self.sampler.adjusted(logits)
        token = self.sampler.choose(adjusted)
        logprobs = [self._token_logprob(logits, token)] if self.options.logprobs is not None else None
        return self._advance([token], stream.decode(token), logprobs,
                             exhausted=token in self.runtime.eos_token_ids)

    def _live_slot(self) -> Slot:
        if self.slot is None:
            raise RuntimeModelError("this generation was cancelled")
        return self.slot

    def release(self) -> None:
        """Done: the slot's KV, when it finished whole, is copied to the prefix cache (its completion
        to be settled there), and the slot is free for the next request."""
        slot, self.slot = self.slot, None
        if slot is None:
            return
        try:
            if self.cache is not None and self.cache.enabled and self.finish_reason in ("stop", "length"):
                kept = StoredKv(slot.decoder, slot)
                self.cache.put(kept, self.prompt_ids + self.completion_ids, len(self.prompt_ids),
                               self.runtime.context_length, _SLOT_CACHE_KEY, held_tokens=kept.length)
        finally:
            slot.close()


def decode_all(generations: Sequence[BatchedGeneration]) -> list[StepResult]:
    """One decode step of every generation, in one run per group of slots.

    Raises:
        RuntimeModelError: onnxruntime failed (no generation advanced).
    """
    if not generations:
        return []
    rows = [(g._live_slot(), g.completion_ids[-1]) for g in generations]
    try:
        logits = rows[0][0].decoder.decode(rows)
    except OgaError as e:
        raise RuntimeModelError(f"decode failed in onnxruntime: {e}") from e
    return [g.accept(row) for g, row in zip(generations, logits, strict=True)]


class ModelRuntime:
    """A loaded ORT-GenAI model dir: tokenizer, chat template, generators.

    Raises (constructor):
        ActivationError: the dir is not a loadable model.
    """

    def __init__(self, model_dir: Path, *, intra_op_num_threads: int | None = None,
                 allow_custom_ops: bool = False, providers: Sequence[str] | None = None,
                 default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch: bool = False) -> None:
        """`providers`: instead of the model's own (`[]`: the CPU; a GPU build's graph runs there too);
        `default_max_tokens`: the most a request without max_tokens gets; `batch`: also load the
        batched decode (`self.decoder`, None where it cannot run this model: then every generation
        is onnxruntime-genai's).

        Raises:
            ActivationError: the dir is not a loadable model, or it would make onnxruntime open a file
                outside itself, a custom operator library (unless allowed) or a profile (`loadcheck`).
        """
        self.model_dir = Path(model_dir)
        self.default_max_tokens = default_max_tokens
        self.context_length = read_context_length(self.model_dir)
        self.vocab_size = _read_vocab_size(self.model_dir)
        self.kv_bytes_per_token = read_kv_bytes_per_token(self.model_dir)
        check_model_dir(self.model_dir, allow_custom_ops=allow_custom_ops)
        self.threads = intra_op_num_threads or default_threads()
        self._providers = providers
        self._model: oga.Model | None = None
        # With the batched decode the model's own generators serve only beam search and constraints:
        # onnxruntime-genai loads the model (a second copy of its weights) when one first comes.
        self.decoder = self._load_batch_decoder() if batch and providers is None else None
        try:
            self.tokenizer = oga.Tokenizer(self.model_dir) if self.decoder is not None else oga.Tokenizer(self.model)
            self.eos_token_ids = set(self.tokenizer.eos_token_ids)
        except OgaError as e:
            if self.decoder is not None:
                self.decoder.close()
            raise ActivationError(f"onnxruntime-genai cannot load {self.model_dir}: {e}") from e
        self.template_renders_tools = toolcalls.template_renders_tools(self.model_dir)
        self.image_tag = image_tag(self.model_dir)
        self._processor: oga.MultiModalProcessor | None = None
        log.info("event=model_loaded dir=%s threads=%d context_length=%d", self.model_dir, self.threads,
                 self.context_length)

    @property
    def model(self) -> oga.Model:
        """onnxruntime-genai's model, loaded on first use where the batched decode serves the rest.

        Raises:
            ActivationError: onnxruntime-genai cannot load the dir.
        """
        if self._model is None:
            try:
                # The decoder runs on one intra-op thread unless told: measured 1.5x decode
                # and 2x prefill with 2 threads on 2 cores.
                self._model = oga.Model(self.model_dir, overlay={
                    "model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}},
                    providers=self._providers)
            except OgaError as e:
                raise ActivationError(f"onnxruntime-genai cannot load {self.model_dir}: {e}") from e
            if self.decoder is not None:
                log.info("event=generator_model_loaded dir=%s", self.model_dir)
        return self._model

    def _load_batch_decoder(self) -> BatchDecoder | None:
        graph = read_decoder_graph(self.model_dir)
        if isinstance(graph, str):
            log.info("event=batch_decode_off dir=%s reason=%r", self.model_dir, graph)
            return None
        try:
            return BatchDecoder(graph, threads=self.threads)
        except OgaError as e:  # the generators still serve it, one request at a time
            log.warning("event=batch_decode_off dir=%s reason=%r", self.model_dir, str(e))
            return None

    def batches(self, options: SamplingOptions) -> bool:
        """Whether a text request with these options runs in the batched decode (beam search and
        constraints are onnxruntime-genai's alone)."""
        return self.decoder is not None and options.num_beams == 1 and options.guidance is None

    def close(self) -> None:
        """Free the tokenizer and the model now; close every `Generation` of this runtime first."""
        if self.decoder is not None:
            self.decoder.close()
        if self._processor is not None:
            self._processor.close()
        self.tokenizer.close()
        if self._model is not None:
            self._model.close()

    def apply_chat_template(self, messages: Sequence[ChatMessage], tools_json: str | None = None) -> str:
        """The model's own chat template (chat_template.jinja / tokenizer_config.json), with the
        request's tools: rendered by the template when it knows tools, else as plain turns
        (`agent.wire.toolcalls`)."""
        rendered, tools_json = toolcalls.render(list(messages), tools_json,
                                                template_renders_tools=self.template_renders_tools)
        payload = json.dumps(rendered)
        try:
            return self.tokenizer.apply_chat_template(payload, tools_json=tools_json, add_generation_prompt=True)
        except OgaError as e:
            raise RuntimeModelError(f"chat template of {self.model_dir} failed: {e}") from e

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids) if token_ids else ""

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
        return min(self.default_max_tokens, self.context_length - prompt_tokens)

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

    def start(self, prompt_ids: list[int], options: SamplingOptions,
              cache: PrefixCache[oga.Generator] | None = None) -> OgaGeneration:
        """A new generation, continuing a kept generator of `cache` where one shares its prefix.

        Raises (before allocating anything):
            ContextLengthError: the prompt and max_tokens do not fit.
            ValueError: logit_bias names a token outside the vocabulary.
        """
        self.check_context(len(prompt_ids), options.max_tokens)
        self._check_logit_bias(options)
        return OgaGeneration(self, prompt_ids, options, cache)

    def start_batched(self, prompt_ids: list[int], options: SamplingOptions,
                      cache: PrefixCache[StoredKv] | None = None) -> BatchedGeneration:
        """A new generation in the batched decode (`self.batches(options)` must hold), continuing a
        kept slot of `cache` where one shares its prefix.

        Raises (before allocating anything):
            ContextLengthError: the prompt and max_tokens do not fit.
            ValueError: logit_bias names a token outside the vocabulary.
        """
        if self.decoder is None or not self.batches(options):
            raise ValueError("this request cannot run in the batched decode")
        self.check_context(len(prompt_ids), options.max_tokens)
        self._check_logit_bias(options)
        return BatchedGeneration(self, prompt_ids, options, self.decoder, cache)

    def _check_logit_bias(self, options: SamplingOptions) -> None:
        outside = sorted({b.token_id for b in options.logit_bias if b.token_id >= self.vocab_size})
        if outside and self.vocab_size:
            raise ValueError(f"logit_bias names token {outside[0]}, outside this model's vocabulary of "
                             f"{self.vocab_size} tokens")

    def start_with_images(self, prompt_text: str, images: Sequence[bytes], options: SamplingOptions) -> OgaGeneration:
        """A new generation of `prompt_text`, whose image tags (`self.image_tag`) stand for `images`
        (encoded PNG or JPEG, whole: see `agent.serving.images`), in order.

        Raises:
            ValueError: the model takes no images, or the tags do not match the images.
            ContextLengthError: the prompt with its image tokens and max_tokens do not fit.
            RuntimeModelError: onnxruntime-genai failed.
        """
        self._check_logit_bias(options)
        inputs = self._process_images(prompt_text, images)
        try:
            prompt_ids = inputs.int_values("input_ids")
            self.check_context(len(prompt_ids), options.max_tokens)
            return OgaGeneration(self, prompt_ids, options, inputs=inputs)
        finally:
            inputs.close()  # the generator holds what it needs

    def _process_images(self, prompt_text: str, images: Sequence[bytes]) -> oga.NamedTensors:
        """The model's inputs for a prompt whose image tags stand for `images`.

        Raises:
            ValueError: the model takes no images, or the tags do not match the images.
        """
        if self.image_tag is None:
            raise ValueError(f"the model in {self.model_dir} reads text only: send the prompt without images")
        try:
            if self._processor is None:
                self._processor = oga.MultiModalProcessor(self.model)
            return self._processor.process(prompt_text, images)
        except OgaError as e:
            raise ValueError(f"the images do not fit the prompt: {e}") from e

    def generate(self, prompt_ids: list[int], options: SamplingOptions) -> Iterator[StepResult]:
        """Run one generation to its end in this process, alone: in the batched decode where this
        runtime has one and it takes these options (the answer the worker gives), else in a generator."""
        if self.batches(options):
            batched = self.start_batched(prompt_ids, options)
            try:
                while not batched.is_done:
                    yield decode_all([batched])[0] if batched.is_decoding else batched.prefill_step()
            finally:
                batched.release()
            return
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

    def teacher_forced_leads(self, prompt_text: str, token_ids: Sequence[int],
                             images: Sequence[bytes] = ()) -> list[float]:
        """For each of `token_ids` after `prompt_text` (as is, no chat template): how far its logit
        leads the best other token's, with every earlier token of `token_ids` forced as context.
        With `images` (PNGs), the prompt's image tags stand for them (the image canary).

        The canary health check judges these against the build host's (`agent.wire.canary`).

        Raises:
            RuntimeModelError: onnxruntime-genai failed.
            ContextLengthError: prompt and tokens do not fit the context.
            ValueError: images for a model that takes none, or that do not fit the prompt's tags.
        """
        if self.decoder is not None and not images:
            return self._batched_leads(self.encode(prompt_text), token_ids)
        inputs = self._process_images(prompt_text, images) if images else None
        leads: list[float] = []
        try:
            prompt_ids = inputs.int_values("input_ids") if inputs is not None else self.encode(prompt_text)
            self.check_context(len(prompt_ids), len(token_ids) + 1)
            generator = oga.Generator(self.model, {"max_length": len(prompt_ids) + len(token_ids) + 1,
                                                   "do_sample": False})
            try:
                if inputs is not None:
                    generator.set_inputs(inputs)
                else:
                    generator.append_tokens(prompt_ids)
                for i, token in enumerate(token_ids):
                    leads.append(token_lead(generator.logits(), token))
                    if i + 1 < len(token_ids):
                        generator.append_tokens([token])
            except OgaError as e:
                raise RuntimeModelError(f"onnxruntime-genai failed while teacher forcing the canary: {e}") from e
            finally:
                generator.close()
        finally:
            if inputs is not None:
                inputs.close()
        return leads

    def _batched_leads(self, prompt_ids: list[int], token_ids: Sequence[int]) -> list[float]:
        """`teacher_forced_leads` through the batched decode's session, one row a run as a generator
        computes them (the build host recorded a generator's tokens: a manifest without leads is
        judged by its exact tokens)."""
        decoder = self.decoder
        if decoder is None:
            raise ValueError("this runtime has no batched decode")
        self.check_context(len(prompt_ids), len(token_ids) + 1)
        slot = decoder.free_slot() or decoder.add_slots()
        leads: list[float] = []
        try:
            logits = decoder.prefill(slot, prompt_ids)
            for i, token in enumerate(token_ids):
                leads.append(token_lead(logits.tolist(), token))
                if i + 1 < len(token_ids):
                    logits = decoder.decode_alone(slot, token)
        except OgaError as e:
            raise RuntimeModelError(f"onnxruntime failed while teacher forcing the canary: {e}") from e
        finally:
            slot.close()
        return leads

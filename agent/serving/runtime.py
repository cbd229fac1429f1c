"""The runtime around onnxruntime-genai: load a model dir, apply its chat
template, map OpenAI search options onto `GeneratorParams`, step generators.

This module holds the model in the calling process, through the C API of
onnxruntime-genai (`agent.serving.oga`). The API process never loads a model: the
model-worker process (`agent/serving/worker/process.py`) does. Tools that run one generation
at a time (`edge-agent prompt --model`, the canary health check) use it directly.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.serving import oga
from agent.serving.prefix_cache import PrefixCache, batch_end
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


# OpenAI's floor for a log-probability: JSON has no -Infinity.
MIN_LOGPROB = -9999.0


def log_softmax_at(logits: Sequence[float], token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The natural-log probability of `token` under softmax(`logits`), and the `top_n` likeliest
    token ids with theirs (best first; ties by lower id).

    Pure Python (the worker has no numpy), in C-speed builtins over the vocabulary: the log-sum-exp
    without the max shift unless a logit overflows exp(), the top ones by a threshold.
    """
    try:
        log_total = math.log(sum(map(math.exp, logits)))
    except (OverflowError, ValueError):  # a logit above ~709, or every one so low that the sum is 0
        peak = max(logits)
        log_total = peak + math.log(sum(math.exp(x - peak) for x in logits))
    top: list[tuple[int, float]] = []
    if top_n:
        floor = heapq.nlargest(top_n, logits)[-1]
        candidates = itertools.compress(range(len(logits)), map(floor.__le__, logits))
        best = sorted(candidates, key=lambda i: (-logits[i], i))[:top_n]
        top = [(i, max(MIN_LOGPROB, logits[i] - log_total)) for i in best]
    return max(MIN_LOGPROB, logits[token] - log_total), top


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


@dataclass
class Generation:
    """One request's generator with its text bookkeeping (stop sequences, deltas).

    Greedy and sampling stream token by token; beam search only knows its best
    sequence at the end, so it emits everything in its last step.
    """

    runtime: ModelRuntime
    prompt_ids: list[int]
    options: SamplingOptions
    # Finished generators kept for their KV: this one may start from one and goes back there.
    cache: PrefixCache[oga.Generator] | None = None
    # A multimodal prompt as the model's processor made it (`prompt_ids` are its input ids): the
    # generator takes it whole at creation, and is never kept (its KV holds the images).
    inputs: oga.NamedTensors | None = None
    _generator: oga.Generator | None = None
    _stream: oga.TokenizerStream | None = None
    completion_ids: list[int] = field(default_factory=list)
    _pending_text: str = ""
    finish_reason: FinishReason | None = None
    reused_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    _prefilled: int = 0  # prompt tokens whose KV the generator holds
    _max_length: int = 0  # what the generator's KV is allocated for
    _cache_key: tuple[Any, ...] | None = None  # None: this generation's generator is not kept
    _budget: int = 0
    _counts: collections.Counter[int] = field(default_factory=collections.Counter)  # for the penalties

    def __post_init__(self) -> None:
        search = self.runtime.search_options(len(self.prompt_ids), self.options)
        needed = int(search.pop("max_length"))
        self._budget = needed - len(self.prompt_ids)
        guidance = self.options.guidance
        if self.cache is not None and self.cache.enabled and self.inputs is None:
            self._cache_key = prefix_cache_key(self.options, search)
        try:
            reuse = None
            if self._cache_key is not None and self.cache is not None:
                reuse = self.cache.take(self.prompt_ids, self._cache_key, needed)
            if reuse is not None:
                self._generator, self._max_length, self.reused_tokens = reuse.generator, reuse.max_length, reuse.keep
                self._prefilled = reuse.keep
            else:
                # A kept generator serves later turns only if their prompt and completion fit it.
                headroom = PREFIX_HEADROOM_TOKENS if self._cache_key is not None else 0
                self._max_length = min(self.runtime.context_length, needed + headroom)
                self._generator = oga.Generator(self.runtime.model, {**search, "max_length": self._max_length},
                                                None if guidance is None else (guidance.kind, guidance.data))
                if self.inputs is not None:
                    self._generator.set_inputs(self.inputs)  # the first step runs the whole prompt
                    self._prefilled = len(self.prompt_ids)
            self._stream = self.runtime.tokenizer.create_stream()
        except OgaError as e:
            # The C API reports every failure as text; llguidance's compile errors start so (0.18).
            if guidance is not None and str(e).startswith("Error creating grammar"):
                detail = str(e).removeprefix("Error creating grammar: ")
                raise GuidanceError(f"response_format: the {_GUIDANCE_LABELS[guidance.kind]} does not compile "
                                    f"({detail}): fix it, or send the request without it") from e
            raise RuntimeModelError(f"onnxruntime-genai cannot start a generation: {e}") from e

    @property
    def is_done(self) -> bool:
        return self.finish_reason is not None

    @property
    def is_prefilled(self) -> bool:
        return self._prefilled >= len(self.prompt_ids)

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
                    logprobs = [self._logprob(logits, new_ids[0])]
        self.completion_ids.extend(new_ids)
        self._pending_text += new_text
        n, stopped = stop_split(self._pending_text, self.options.stop)
        emit, self._pending_text = self._pending_text[:n], self._pending_text[n:]
        if stopped:
            self.finish_reason = "stop"
        elif g.is_done() or self.options.num_beams > 1 or len(self.completion_ids) >= self._budget:
            emit += self._pending_text  # a held-back tail that never became a stop sequence
            self._pending_text = ""
            is_eos = bool(self.completion_ids) and self.completion_ids[-1] in self.runtime.eos_token_ids
            self.finish_reason = "length" if len(self.completion_ids) >= self._budget and not is_eos else "stop"
        return StepResult(token_ids=new_ids, text=emit, logprobs=logprobs)

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

    def _logprob(self, logits: Sequence[float], token: int) -> TokenLogprob:
        logprob, top = log_softmax_at(logits, token, self.options.logprobs or 0)
        decode = self.runtime.decode
        return TokenLogprob(token=decode([token]), logprob=logprob,
                            top=[TopLogprob(token=decode([i]), logprob=lp) for i, lp in top])

    def cancel(self) -> None:
        self.finish_reason = "cancelled"
        self.release()

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


class ModelRuntime:
    """A loaded ORT-GenAI model dir: tokenizer, chat template, generators.

    Raises (constructor):
        ActivationError: the dir is not a loadable model.
    """

    def __init__(self, model_dir: Path, *, intra_op_num_threads: int | None = None,
                 allow_custom_ops: bool = False, providers: Sequence[str] | None = None,
                 default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        """`providers`: instead of the model's own (`[]`: the CPU; a GPU build's graph runs there too);
        `default_max_tokens`: the most a request without max_tokens gets.

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
        try:
            # The decoder runs on one intra-op thread unless told: measured 1.5x decode
            # and 2x prefill with 2 threads on 2 cores.
            self.model = oga.Model(self.model_dir, overlay={
                "model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}},
                providers=providers)
            self.tokenizer = oga.Tokenizer(self.model)
            self.eos_token_ids = set(self.tokenizer.eos_token_ids)
        except OgaError as e:
            raise ActivationError(f"onnxruntime-genai cannot load {self.model_dir}: {e}") from e
        self.template_renders_tools = toolcalls.template_renders_tools(self.model_dir)
        self.image_tag = image_tag(self.model_dir)
        self._processor: oga.MultiModalProcessor | None = None
        log.info("event=model_loaded dir=%s threads=%d context_length=%d", self.model_dir, self.threads,
                 self.context_length)

    def close(self) -> None:
        """Free the tokenizer and the model now; close every `Generation` of this runtime first."""
        if self._processor is not None:
            self._processor.close()
        self.tokenizer.close()
        self.model.close()

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
              cache: PrefixCache[oga.Generator] | None = None) -> Generation:
        """A new generation, continuing a kept generator of `cache` where one shares its prefix.

        Raises (before allocating anything):
            ContextLengthError: the prompt and max_tokens do not fit.
            ValueError: logit_bias names a token outside the vocabulary.
        """
        self.check_context(len(prompt_ids), options.max_tokens)
        self._check_logit_bias(options)
        return Generation(self, prompt_ids, options, cache)

    def _check_logit_bias(self, options: SamplingOptions) -> None:
        outside = sorted({b.token_id for b in options.logit_bias if b.token_id >= self.vocab_size})
        if outside and self.vocab_size:
            raise ValueError(f"logit_bias names token {outside[0]}, outside this model's vocabulary of "
                             f"{self.vocab_size} tokens")

    def start_with_images(self, prompt_text: str, images: Sequence[bytes], options: SamplingOptions) -> Generation:
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
            return Generation(self, prompt_ids, options, inputs=inputs)
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

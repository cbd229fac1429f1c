"""A request's generation: its token budget, stop sequences and text deltas, with its tokens from
the worker's batched decode (`BatchedGeneration`, `decode_all`) or from an onnxruntime-genai
generator (`OgaGeneration`: beam search, constraints, images, a model the batched decode cannot
run). `agent.serving.runtime.ModelRuntime` starts them.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.serving import oga
from agent.serving.batch import BatchDecoder, Slot, StoredKv
from agent.serving.prefix_cache import PrefixCache, batch_end
from agent.serving.sampling import Logits, Sampler, chooser, logit_additions
from agent.wire.errors import GuidanceError, OgaError, RuntimeModelError
from agent.wire.worker import PREFILL_CHUNK_TOKENS, FinishReason, SamplingOptions, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from agent.serving.runtime import ModelRuntime

# A generator kept by the prefix cache serves a later turn only if that turn's prompt and
# completion fit the KV allocated for it: new cacheable generators get this much room beyond
# their own request.
PREFIX_HEADROOM_TOKENS = 1024

_GUIDANCE_LABELS = {"json_schema": "JSON schema", "regex": "regex", "lark_grammar": "lark grammar"}


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

    def _token_logprob(self, logits: Logits, token: int) -> TokenLogprob:
        logprob, top = chooser().log_softmax_at(logits, token, self.options.logprobs or 0)
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
                adjust = logit_additions(self.options, self._counts) if self.options.adjusts_logits else None
                logits = g.logits(adjust) if self.options.logprobs is not None or adjust else None
                g.generate_next_token()
                new_ids = [g.next_token()]
                self._counts[new_ids[0]] += 1
                new_text = stream.decode(new_ids[0])
                if logits is not None and logprobs is not None:  # asked for, not only read to adjust
                    logprobs = [self._token_logprob(Logits.of(logits), new_ids[0])]
        return self._advance(new_ids, new_text, logprobs, exhausted=g.is_done() or self.options.num_beams > 1)

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

    @property
    def chooses_greedily(self) -> bool:
        """Its next token is its row's largest logit and nothing else is read of the row (a batch of
        such rows is one argmax)."""
        return self.sampler.is_plain_greedy and self.options.logprobs is None

    def accept(self, logits: Logits, token: int | None = None) -> StepResult:
        """The next token, chosen from the logits after the last one (`token`: already chosen)."""
        stream = self._stream
        if stream is None:
            raise RuntimeModelError("this generation was cancelled")
        if token is None:
            token = chooser().choose(logits, self.sampler)
        else:
            self.sampler.took(token)
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
        greedy = [n for n, g in enumerate(generations) if g.chooses_greedily]
        tokens: dict[int, int] = dict(zip(greedy, chooser().greedy([logits[n] for n in greedy]), strict=True))
        return [g.accept(row, tokens.get(n)) for n, (g, row) in enumerate(zip(generations, logits, strict=True))]
    except OgaError as e:
        raise RuntimeModelError(f"decode failed in onnxruntime: {e}") from e

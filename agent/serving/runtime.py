"""The runtime of a model dir: its tokenizer and chat template, the batched decode, and each
request's start (`agent.serving.generation`), with OpenAI search options mapped onto
onnxruntime-genai's where its generators serve.

This module holds the model in the calling process, through the C APIs of onnxruntime-genai
(`agent.serving.oga`) and onnxruntime (`agent.serving.ort`). The API process never loads a
model: the model-worker process (`agent/serving/worker/process.py`) does. Tools that run one generation
at a time (`edge-agent prompt --model`, the canary health check) use it directly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.serving import oga
from agent.serving.batch import BatchDecoder, StoredKv
from agent.serving.decoder_graph import read_decoder_graph
from agent.serving.generation import BatchedGeneration, OgaGeneration, StepResult, decode_all
from agent.serving.prefix_cache import PrefixCache
from agent.wire import toolcalls
from agent.wire.canary import token_lead
from agent.wire.errors import ActivationError, ContextLengthError, OgaError, RuntimeModelError
from agent.wire.genai_config import image_tag, read_context_length, read_kv_bytes_per_token, read_vocab_size
from agent.wire.loadcheck import check_model_dir
from agent.wire.worker import DEFAULT_MAX_NEW_TOKENS, ChatMessage, SamplingOptions

log = logging.getLogger(__name__)


def default_threads() -> int:
    """The CPUs this process may run on (cgroup/affinity aware where Linux tells us)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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
        self.vocab_size = read_vocab_size(self.model_dir)
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
                leads.append(token_lead(logits.values(), token))
                if i + 1 < len(token_ids):
                    logits = decoder.decode_alone(slot, token)
        except OgaError as e:
            raise RuntimeModelError(f"onnxruntime failed while teacher forcing the canary: {e}") from e
        finally:
            slot.close()
        return leads

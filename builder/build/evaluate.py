"""Measure a built model with onnxruntime-genai: perplexity on the shipped
text, the greedy canary, and tokens/s on this host.

Everything runs through onnxruntime-genai, the runtime the device uses, so
the numbers describe what ships rather than what the source framework does.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from agent.wire.base import FrozenModel
from agent.wire.canary import token_lead
from agent.wire.errors import BuildError
from agent.wire.genai_config import image_tags

EVAL_TEXT_RESOURCE = "eval_text.txt"
# The canary prompt: plain text, no chat template, so any device that can
# tokenize can replay it exactly.
CANARY_PROMPT = "The lighthouse keeper opened her ledger and wrote"
CANARY_MAX_NEW_TOKENS = 16
# A model that takes images also gets a canary about a picture shipped with the builder (a red
# circle, a blue square, a green line), put into its artifact under CANARY_IMAGE_FILE.
CANARY_IMAGE_RESOURCE = "canary.png"
CANARY_IMAGE_FILE = "edgefleet-canary.png"
IMAGE_CANARY_QUESTION = "Describe the shapes and colours in this picture."
# Perplexity windows: non-overlapping, each window's first token is context
# only. 1024 bounds the logits buffer (window x vocab x 4 bytes) to ~200 MB
# for a 49k vocabulary.
PPL_WINDOW_TOKENS = 1024
_NLL_ROWS = 128
SPEED_PROMPT_TOKENS = 128
SPEED_DECODE_TOKENS = 32
SPEED_REPEATS = 3
# Evaluation runs on one intra-op thread (onnxruntime-genai's default), fastest for a tiny model's
# small batches; a model this large prefills its windows on every core instead (a 3.8B model's
# 1,024-token window takes minutes on one).
ALL_CPUS_FROM_WEIGHT_BYTES = 512 << 20

Progress = Callable[[int, int], None]


class Measurement(FrozenModel):
    """What evaluation learns about one built model."""

    perplexity: float
    eval_tokens: int
    eval_text_sha256: str
    canary_prompt: str
    canary_max_new_tokens: int
    canary_token_ids: list[int]
    canary_leads: list[float]
    decode_tokens_per_s: float
    prefill_tokens_per_s: float


def eval_text() -> str:
    """The fixed English text perplexity is measured on (original prose shipped in builder/data/)."""
    return resources.files("builder").joinpath("data", EVAL_TEXT_RESOURCE).read_text(encoding="utf-8")


def eval_text_sha256() -> str:
    return hashlib.sha256(eval_text().encode("utf-8")).hexdigest()


def onnx_weight_bytes(model_dir: Path) -> int:
    """The bytes of the ONNX graphs and their external data in `model_dir`."""
    return sum(f.stat().st_size for f in model_dir.iterdir() if f.name.endswith((".onnx", ".onnx.data")))


def load_model(model_dir: Path):  # -> tuple[og.Model, og.Tokenizer]
    """The model on this host's CPU, whichever provider it was built for: the gate evaluates the
    very graph that ships (a CUDA, DirectML or WebGPU build's graph runs on the CPU too). A model
    of ALL_CPUS_FROM_WEIGHT_BYTES or more runs on every core (`cpu_config`)."""
    import onnxruntime_genai as og

    try:
        model = og.Model(cpu_config(model_dir, all_cpus=onnx_weight_bytes(model_dir) >= ALL_CPUS_FROM_WEIGHT_BYTES))
        return model, og.Tokenizer(model)
    except Exception as e:  # ORT-GenAI raises plain RuntimeError/OSError with long text
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise BuildError(f"onnxruntime-genai cannot load the built model {model_dir}: {first}") from e


def cpu_config(model_dir: Path | str, *, all_cpus: bool = False):  # -> og.Config
    """`model_dir`'s config with its execution providers cleared: it runs on the CPU, on one
    intra-op thread (onnxruntime-genai's default) or, with `all_cpus`, on every core this process
    may use (as the agent runs it: faster for long prefills, slower for a tiny model's small ones)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    if all_cpus:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": _usable_cpus()}}}}))
    return config


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _context_length(model) -> int:  # og.Model
    # genai_config's search.max_length is what the generator accepts; read it via a fresh params object.
    import onnxruntime_genai as og

    return int(og.GeneratorParams(model).get_search_options()["max_length"])


def perplexity_of(model, token_ids: list[int], window: int, progress: Progress | None = None) -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows of `window` tokens."""
    import onnxruntime_genai as og

    nll_sum, scored = 0.0, 0
    starts = list(range(0, len(token_ids) - 1, window))
    for i, start in enumerate(starts):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(chunk), do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(chunk)
        logits = gen.get_output("logits")[0]  # float32 [len(chunk), vocab]
        del gen
        target = np.asarray(chunk[1:])
        # In float64, a few rows at a time: a whole window's float64 logits and their exponentials
        # would be 0.8 GB beside the model for a 49k vocabulary.
        for row in range(0, len(target), _NLL_ROWS):
            rows = target[row:row + _NLL_ROWS]
            pred = logits[row:row + len(rows)].astype(np.float64)
            m = pred.max(axis=-1)
            log_z = m + np.log(np.exp(pred - m[:, None]).sum(axis=-1))
            nll_sum += float((log_z - pred[np.arange(len(rows)), rows]).sum())
        scored += len(target)
        if progress:
            progress(i + 1, len(starts))
    return float(np.exp(nll_sum / scored))


def greedy_token_ids(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """The token ids greedy decoding appends to `prompt` (stops early at EOS).

    This is the canary procedure a device replays: encode the prompt with the
    model's tokenizer, max_length = prompt tokens + max_new_tokens, do_sample=false.
    """
    import onnxruntime_genai as og

    prompt_ids = list(tokenizer.encode(prompt))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(prompt_ids):]]


def canary_leads(model, tokenizer, prompt: str, token_ids: list[int]) -> list[float]:
    """Each canary token's lead over the best other token, teacher forced after `prompt`: the
    build host's side of the canary rule (`agent.wire.canary`), measured as a device does."""
    import onnxruntime_genai as og

    prompt_ids = list(tokenizer.encode(prompt))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + len(token_ids) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids)
    return _forced_leads(gen, token_ids)


def _forced_leads(gen, token_ids: list[int]) -> list[float]:  # gen: og.Generator holding the prompt
    """Each token's lead over the best other token, every earlier one appended as context."""
    leads: list[float] = []
    for i, token in enumerate(token_ids):
        leads.append(token_lead(gen.get_logits()[0].ravel().tolist(), token))
        if i + 1 < len(token_ids):
            gen.append_tokens([token])
    return leads


def image_inputs(model, prompt: str, pictures: list[bytes]):  # -> (og.NamedTensors, int)
    """The model's inputs for `prompt` whose image tags stand for `pictures` (encoded images), and
    the prompt's token count (image placeholders included)."""
    import onnxruntime_genai as og

    inputs = model.create_multimodal_processor()(prompt, images=og.Images.open_bytes(*pictures))
    return inputs, int(inputs["input_ids"].as_numpy().size)


def image_generator(model, inputs, tokens: int, new_tokens: int):  # -> og.Generator
    """A greedy generator holding `inputs` (`image_inputs`) with room for `new_tokens` more."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=tokens + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    return gen


def canary_picture() -> bytes:
    """The picture of the image canary (builder/data/canary.png)."""
    return resources.files("builder").joinpath("data", CANARY_IMAGE_RESOURCE).read_bytes()


class ImageCanaryMeasurement(FrozenModel):
    prompt: str
    token_ids: list[int]
    leads: list[float]


def measure_image_canary(model_dir: Path, image_tag: str) -> ImageCanaryMeasurement:
    """Greedy tokens and their teacher-forced leads for IMAGE_CANARY_QUESTION about the canary
    picture, the prompt as is (the model's tag for image 1, then the question; no chat template):
    what a device replays at activation (`agent.serving.host`).

    Raises:
        BuildError: onnxruntime-genai cannot run the model's processor or model on the picture.
    """
    model, _ = load_model(model_dir)
    prompt = image_tags(image_tag, 1) + IMAGE_CANARY_QUESTION
    pictures = [canary_picture()]
    try:
        inputs, tokens = image_inputs(model, prompt, pictures)
        gen = image_generator(model, inputs, tokens, CANARY_MAX_NEW_TOKENS)
        ids: list[int] = []
        while not gen.is_done():
            gen.generate_next_token()
            ids.append(int(gen.get_next_tokens()[0]))
        inputs, tokens = image_inputs(model, prompt, pictures)  # a generator takes its inputs once
        leads = _forced_leads(image_generator(model, inputs, tokens, len(ids) + 1), ids)
    except Exception as e:
        raise BuildError(f"the image canary failed on {model_dir}: {type(e).__name__}: {str(e)[:300]}") from e
    if not ids:
        raise BuildError(f"the image canary of {model_dir} produced no tokens for prompt {prompt!r}")
    return ImageCanaryMeasurement(prompt=prompt, token_ids=ids, leads=leads)


def measure_speed(model, token_ids: list[int], context_length: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s): medians of SPEED_REPEATS runs after one warm-up."""
    import onnxruntime_genai as og

    prompt = token_ids[: max(1, min(SPEED_PROMPT_TOKENS, context_length - SPEED_DECODE_TOKENS - 1))]
    decode_rates, prefill_rates = [], []
    for i in range(SPEED_REPEATS + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + SPEED_DECODE_TOKENS, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done() and n < SPEED_DECODE_TOKENS:
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        if i == 0:
            continue  # warm-up: first run pays for lazy allocations
        prefill_rates.append(len(prompt) / (t1 - t0))
        decode_rates.append(n / (t2 - t1) if n else 0.0)
    return statistics.median(decode_rates), statistics.median(prefill_rates)


def measure_perplexity(model_dir: Path, window: int = PPL_WINDOW_TOKENS,
                       progress: Progress | None = None) -> tuple[float, int]:
    """(perplexity, text token count) of the model in `model_dir` on the shipped text."""
    model, tokenizer = load_model(model_dir)
    ids = [int(t) for t in tokenizer.encode(eval_text())]
    window = min(window, _context_length(model))
    return perplexity_of(model, ids, window, progress), len(ids)


def measure_model(model_dir: Path, progress: Progress | None = None) -> Measurement:
    """Perplexity, canary and speed of the model in `model_dir`.

    Raises:
        BuildError: onnxruntime-genai cannot load or run it.
    """
    model, tokenizer = load_model(model_dir)
    text = eval_text()
    ids = [int(t) for t in tokenizer.encode(text)]
    context_length = _context_length(model)
    try:
        ppl = perplexity_of(model, ids, min(PPL_WINDOW_TOKENS, context_length), progress)
        canary = greedy_token_ids(model, tokenizer, CANARY_PROMPT, CANARY_MAX_NEW_TOKENS)
        leads = canary_leads(model, tokenizer, CANARY_PROMPT, canary) if canary else []
        decode_tps, prefill_tps = measure_speed(model, ids, context_length)
    except BuildError:
        raise
    except Exception as e:
        raise BuildError(f"onnxruntime-genai failed while evaluating {model_dir}: {type(e).__name__}: {e}") from e
    if not canary:
        raise BuildError(f"the canary of {model_dir} produced no tokens for prompt {CANARY_PROMPT!r}")
    return Measurement(
        perplexity=ppl, eval_tokens=len(ids), eval_text_sha256=hashlib.sha256(text.encode()).hexdigest(),
        canary_prompt=CANARY_PROMPT, canary_max_new_tokens=CANARY_MAX_NEW_TOKENS, canary_token_ids=canary,
        canary_leads=leads,
        decode_tokens_per_s=decode_tps, prefill_tokens_per_s=prefill_tps,
    )


def perplexity_ratio(perplexity: float, reference_perplexity: float) -> float:
    return perplexity / reference_perplexity

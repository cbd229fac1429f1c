"""logit_bias and OpenAI's presence and frequency penalties over the real API (SmolLM2): the
answer is exactly what the official onnxruntime_genai module gives when the same changes are
made to its logits by hand before each greedy step, and the changes do what they promise."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from testkit.serving import ServerThread

QUESTION = [{"role": "user", "content": "Write a short poem about the sea."}]


def _reference(model_dir: Path, max_tokens: int, bias: dict[int, float], presence: float = 0.0,
               frequency: float = 0.0) -> str:
    """Greedy decoding in the official module, each step's logits changed by hand first."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode(tokenizer.apply_chat_template(json.dumps(QUESTION), add_generation_prompt=True))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    counts: collections.Counter[int] = collections.Counter()
    out: list[int] = []
    while not generator.is_done():
        logits = np.array(generator.get_logits(), dtype=np.float32)
        row = logits.reshape(-1)
        for token, delta in bias.items():
            row[token] += delta
        for token, count in counts.items():
            row[token] -= presence + frequency * count
        generator.set_logits(logits)
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        counts[token] += 1
        out.append(token)
    return tokenizer.decode(out)


def _answer(smollm2_openai: openai.OpenAI, **fields: Any) -> str:
    response = smollm2_openai.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                                      temperature=0, max_tokens=40, **fields)
    return response.choices[0].message.content or ""


def _token_id(model_dir: Path, text: str) -> int:
    import onnxruntime_genai as og

    ids = [int(t) for t in og.Tokenizer(og.Model(str(model_dir))).encode(text)]
    assert len(ids) == 1, ids
    return ids[0]


def test_a_banned_token_never_appears_and_the_rest_is_the_references(smollm2_openai: openai.OpenAI,
                                                                      smollm2_int4_raw: Path) -> None:
    import onnxruntime_genai as og

    plain = _answer(smollm2_openai)
    # The plain answer's commonest token: which one it is depends on the CPU's kernels (AVX2 and
    # AVX-512 VNNI machines answer differently), that it is banned does not.
    token = collections.Counter(int(t) for t in og.Tokenizer(og.Model(str(smollm2_int4_raw))).encode(plain)
                                ).most_common(1)[0][0]
    banned = _answer(smollm2_openai, logit_bias={str(token): -100})
    assert banned == _reference(smollm2_int4_raw, 40, {token: -100.0}) and banned != plain


def test_a_boosted_token_is_chosen_every_step(smollm2_openai: openai.OpenAI, smollm2_int4_raw: Path) -> None:
    waves = _token_id(smollm2_int4_raw, " waves")
    assert _answer(smollm2_openai, logit_bias={str(waves): 100}) == " waves" * 40


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.0), (0.4, 0.6)])
def test_penalties_match_the_reference_and_repeat_less(smollm2_openai: openai.OpenAI, smollm2_int4_raw: Path,
                                                       presence: float, frequency: float) -> None:
    penalized = _answer(smollm2_openai, presence_penalty=presence, frequency_penalty=frequency)
    assert penalized == _reference(smollm2_int4_raw, 40, {}, presence, frequency)
    plain = _answer(smollm2_openai)
    assert len(set(penalized.split())) / len(penalized.split()) > len(set(plain.split())) / len(plain.split())


def test_a_token_outside_the_vocabulary_is_a_400(smollm2_api: ServerThread) -> None:
    r = requests.post(f"{smollm2_api.url}/v1/chat/completions", timeout=60,
                      json={"messages": QUESTION, "max_tokens": 2, "logit_bias": {"49152": 5}})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "logit_bias names token 49152, outside this model's vocabulary of 49152 tokens" in message


def test_changing_the_logits_computes_no_log_probabilities_nobody_asked_for(smollm2_int4_raw: Path) -> None:
    """The logits are read to change them; the log-softmax over the vocabulary (1.5 ms a token)
    runs only for a request that asks for log-probabilities."""
    from agent.serving.runtime import ModelRuntime
    from agent.wire.worker import SamplingOptions, TokenBias

    runtime = ModelRuntime(smollm2_int4_raw, intra_op_num_threads=1)
    prompt_ids = runtime.encode("The sea is")
    for options in (SamplingOptions(temperature=0.0, max_tokens=6, logit_bias=[TokenBias(token_id=13, bias=-5.0)]),
                    SamplingOptions(temperature=0.0, max_tokens=6, frequency_penalty=1.0)):
        steps = list(runtime.generate(prompt_ids, options))
        assert len(steps) == 6 and all(step.logprobs is None for step in steps)
    asked = list(runtime.generate(prompt_ids, SamplingOptions(temperature=0.0, max_tokens=6, logprobs=0,
                                                              frequency_penalty=1.0)))
    assert all(step.logprobs is not None and len(step.logprobs) == 1 for step in asked)

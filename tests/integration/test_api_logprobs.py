"""Log-probabilities over the real API (uvicorn + model worker + SmolLM2), with the official
`openai` client: one entry per generated token, the same streamed or not, and the values
the model's own distribution gives (the official onnxruntime_genai module and numpy,
teacher-forcing the same tokens, are the reference)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from testkit.serving import ServerThread

QUESTION = [{"role": "user", "content": "Name three rivers in France."}]


def _reference_logprobs(model_dir: Path, messages: list[dict[str, str]] | None, prompt: str | None,
                        tokens: list[str]) -> list[float]:
    """log softmax(logits)[token] for each token, teacher-forced through the official module."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    text = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True) if messages else prompt
    prompt_ids = [int(t) for t in tokenizer.encode(text)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + len(tokens) + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    out = []
    for token in tokens:
        token_id = [int(t) for t in tokenizer.encode(token)]
        assert len(token_id) == 1, (token, token_id)  # each reported token text is one token again
        logits = np.asarray(generator.get_logits(), dtype=np.float64).reshape(-1)
        log_total = logits.max() + np.log(np.exp(logits - logits.max()).sum())
        out.append(float(logits[token_id[0]] - log_total))
        generator.append_tokens(token_id)
    return out


def test_chat_logprobs_are_the_models_own_for_every_token(smollm2_openai: openai.OpenAI,
                                                          smollm2_int4_raw: Path) -> None:
    response = smollm2_openai.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                                      temperature=0, max_tokens=24, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert response.usage is not None and len(content) == response.usage.completion_tokens == 24
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert [a.logprob for a in entry.top_logprobs] == sorted((a.logprob for a in entry.top_logprobs), reverse=True)
        # greedy: the chosen token is the likeliest one
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.logprob <= 0
    reference = _reference_logprobs(smollm2_int4_raw, QUESTION, None, [t.token for t in content])
    assert [t.logprob for t in content] == pytest.approx(reference, abs=2e-3)
    assert sum(t.logprob for t in content) == pytest.approx(sum(reference), abs=2e-2)


def test_streamed_logprobs_equal_the_whole_answers(smollm2_openai: openai.OpenAI) -> None:
    whole = smollm2_openai.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                                   temperature=0, max_tokens=16, logprobs=True, top_logprobs=2)
    stream = smollm2_openai.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                                    temperature=0, max_tokens=16, logprobs=True, top_logprobs=2,
                                                    stream=True)
    streamed = [t for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for t in chunk.choices[0].logprobs.content or []]
    assert whole.choices[0].logprobs is not None
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in streamed] == \
        [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in whole.choices[0].logprobs.content or []]


def test_asking_for_logprobs_changes_no_token_of_a_sampled_answer(smollm2_openai: openai.OpenAI) -> None:
    def ask(**extra: Any) -> Any:
        return smollm2_openai.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                                      temperature=0.9, seed=5, max_tokens=24, **extra)
    plain, with_logprobs = ask(), ask(logprobs=True, top_logprobs=5)
    assert with_logprobs.choices[0].message.content == plain.choices[0].message.content
    content = with_logprobs.choices[0].logprobs.content
    # sampled: the chosen token is among the candidates the model gave it, or below them
    assert all(t.logprob <= t.top_logprobs[0].logprob for t in content)
    assert any(t.token != t.top_logprobs[0].token for t in content) or len(content) < 24


def test_completions_return_the_legacy_shape_streamed_or_not(smollm2_api: ServerThread, smollm2_int4_raw: Path) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = requests.post(f"{smollm2_api.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    logprobs = whole["logprobs"]
    assert "".join(logprobs["tokens"]) == whole["text"] and len(logprobs["tokens"]) == 8
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(8)]
    assert all(len(alternatives) <= 2 and max(alternatives.values()) == chosen
               for alternatives, chosen in zip(logprobs["top_logprobs"], logprobs["token_logprobs"], strict=True))
    reference = _reference_logprobs(smollm2_int4_raw, None, "The capital of France is", logprobs["tokens"])
    assert logprobs["token_logprobs"] == pytest.approx(reference, abs=2e-3)

    with requests.post(f"{smollm2_api.url}/v1/completions", json={**body, "stream": True}, stream=True,
                       timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: {")]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for part in streamed for t in part["tokens"]] == logprobs["tokens"]
    assert [o for part in streamed for o in part["text_offset"]] == logprobs["text_offset"]


def test_no_logprobs_asked_none_sent(smollm2_openai: openai.OpenAI) -> None:
    response = smollm2_openai.chat.completions.create(model="default", messages=QUESTION,  # type: ignore[arg-type]
                                                      temperature=0, max_tokens=4)
    assert response.choices[0].logprobs is None

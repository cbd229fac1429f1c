"""Structured output over the real API (uvicorn + model worker + SmolLM2), spoken to with the
official `openai` client: what `response_format` asks for is what comes back, every time;
a constraint that does not compile is a 400 naming it; a parameter the server does not
implement is a 400 naming it, never a success that ignored it."""

from __future__ import annotations

import json
import re
from typing import Any

import openai
import pytest
import requests
from pydantic import BaseModel, Field

from testkit.serving import ServerThread

QUESTION = [{"role": "user", "content": "Is Paris in France? Answer yes or no."}]
# Fifty different prompts: each answer must parse into `Place`.
PLACES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul", "Hanoi", "Accra",
          "Dakar", "Kyiv", "Riga", "Baku", "Doha", "Bern", "Sofia", "Minsk", "Havana", "Nairobi", "Manila", "Jakarta",
          "Bogota", "Santiago", "Lisbon", "Madrid", "Berlin", "Vienna", "Prague", "Warsaw", "Athens", "Dublin",
          "Ottawa", "Canberra", "Beijing", "Moscow", "Tehran", "Kabul", "Tunis", "Rabat", "Algiers", "Khartoum",
          "Amman", "Beirut", "Ankara", "Tbilisi", "Yerevan", "Helsinki"]


class Place(BaseModel):
    city: str = Field(max_length=40)
    country: str = Field(max_length=40)
    is_capital: bool
    founded_century: int = Field(ge=-40, le=21)


def _post(api: ServerThread, body: dict[str, Any], endpoint: str = "chat/completions") -> requests.Response:
    return requests.post(f"{api.url}/v1/{endpoint}", json=body, timeout=120)


def test_fifty_prompts_all_parse_into_the_pydantic_model(smollm2_openai: openai.OpenAI) -> None:
    """The client's own `parse` sends a strict json_schema made from `Place`; every answer validates.
    Unconstrained, SmolLM2 answers these with prose or with JSON of its own shape."""
    invalid: list[tuple[str, str | None]] = []
    for i, city in enumerate(PLACES):
        completion = smollm2_openai.chat.completions.parse(
            model="default", response_format=Place, max_tokens=96, temperature=0.7, seed=i,
            messages=[{"role": "user", "content": f"Tell me about {city} as JSON."}])
        choice = completion.choices[0]
        if choice.message.parsed is None or choice.finish_reason != "stop":
            invalid.append((city, choice.message.content))
    assert invalid == []


def test_without_a_format_the_same_prompts_do_not_parse(smollm2_openai: openai.OpenAI) -> None:
    """The control for the test above: the constraint is what makes the answers valid."""
    valid = 0
    for i, city in enumerate(PLACES[:10]):
        completion = smollm2_openai.chat.completions.create(
            model="default", max_tokens=96, temperature=0.7, seed=i,
            messages=[{"role": "user", "content": f"Tell me about {city} as JSON."}])
        try:
            Place.model_validate_json(completion.choices[0].message.content or "")
            valid += 1
        except ValueError:
            pass
    assert valid <= 5, f"{valid} of 10 parse without the constraint"


def test_json_object_streams_chunks_that_join_into_one_object(smollm2_openai: openai.OpenAI) -> None:
    stream = smollm2_openai.chat.completions.create(
        model="default", response_format={"type": "json_object"}, max_tokens=200, temperature=0, stream=True,
        # With an example to copy: without one, SmolLM2 fills a list until max_tokens on AVX2 kernels.
        messages=[{"role": "user", "content": 'Give the name and the age of a cat, as a JSON object. '
                                              'Example: {"name": "Tom", "age": 3}'}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict) and len(chunks) > 3


def test_regex_extension_constrains_the_whole_answer(smollm2_api: ServerThread) -> None:
    pattern = r"(yes|no), because [a-z ]{1,40}\."
    for seed in range(3):
        r = _post(smollm2_api, {"messages": QUESTION, "response_format": {"type": "regex", "regex": pattern},
                                "temperature": 1.0, "seed": seed, "max_tokens": 60})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert re.fullmatch(pattern, text), text
        assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_lark_grammar_extension_on_the_completions_endpoint(smollm2_api: ServerThread) -> None:
    grammar = 'start: answer " (" NUMBER ")"\nanswer: "red" | "green" | "blue"\nNUMBER: /[0-9]{1,3}/'
    r = _post(smollm2_api, {"prompt": "My favourite colour is", "max_tokens": 20, "temperature": 0,
                            "response_format": {"type": "lark_grammar", "grammar": grammar}}, "completions")
    assert r.status_code == 200, r.text
    assert re.fullmatch(r"(red|green|blue) \([0-9]{1,3}\)", r.json()["choices"][0]["text"]), r.text


@pytest.mark.parametrize(("response_format", "message_part"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}},
     "the JSON schema does not compile (Invalid type: frobnicate)"),
    ({"type": "regex", "regex": "(unclosed"}, "the regex does not compile"),
    ({"type": "lark_grammar", "grammar": "start: ??"}, "the lark grammar does not compile"),
])
def test_a_constraint_that_does_not_compile_is_a_400_and_the_server_keeps_serving(
        smollm2_api: ServerThread, response_format: dict[str, Any], message_part: str) -> None:
    for stream in (False, True):
        r = _post(smollm2_api, {"messages": QUESTION, "response_format": response_format, "stream": stream})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert message_part in error["message"] and error["message"].startswith("response_format: "), error
    ok = _post(smollm2_api, {"messages": QUESTION, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(("endpoint", "fields", "param"), [
    ("chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),  # OpenAI's bound is 2
    ("chat/completions", {"logit_bias": {"42": 500}}, "logit_bias"),  # and 100
    ("chat/completions", {"tool_choice": "required"}, "tool_choice"),  # needs tools
    ("chat/completions", {"functions": [{"name": "now"}]}, "functions"),
    ("chat/completions", {"n": 9}, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}]},
     "messages.0.content.0.type"),
    # An image to a model that reads text only: never an answer that ignored it.
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
     "messages.0.content.0"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"suffix": " the end."}, "suffix"),
    ("completions", {"logprobs": 6}, "logprobs"),  # OpenAI's bound is 5
])
def test_each_unimplemented_or_invalid_parameter_is_a_400_naming_it(smollm2_api: ServerThread, endpoint: str,
                                                                    fields: dict[str, Any], param: str) -> None:
    base: dict[str, Any] = {"messages": QUESTION} if endpoint == "chat/completions" else {"prompt": "Paris is"}
    r = _post(smollm2_api, {**base, "max_tokens": 2, **fields}, endpoint)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error


def test_the_openai_client_sees_the_refusal_as_a_bad_request(smollm2_openai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="reads text only") as caught:
        smollm2_openai.chat.completions.create(model="default", max_tokens=2, messages=[{  # type: ignore[list-item]
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}])
    assert caught.value.status_code == 400 and caught.value.body["code"] == "unsupported_content"

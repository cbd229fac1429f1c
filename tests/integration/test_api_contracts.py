"""Output contracts served by the real API (SmolLM2): a model dir that carries
`contracts/<name>.json` answers the model id `<model>/<name>` in the contract's format, with
its system prompt and defaults, and refuses what would break the contract; a bad contract
file keeps the model from loading at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from builder.demo.ports import free_port
from testkit.env import subprocess_env
from testkit.serving import ServerThread

CITY = {
    "description": "a city as JSON",
    "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {
        "type": "object", "additionalProperties": False, "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}}}}},
    "system_prompt": "You answer with one JSON object about the city the user names.",
    "sampling": {"temperature": 0, "max_tokens": 60},
    "examples": ["Tell me about Paris."],
}
QUESTION = [{"role": "user", "content": "Tell me about Oslo."}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 40}}}}}


def _with_contracts(model: Path, into: Path, contracts: dict[str, Any]) -> Path:
    """A copy of `model` (hard links: the loader refuses symlinks) that carries `contracts`."""
    into.mkdir()
    for item in model.iterdir():
        if item.is_file():
            os.link(item, into / item.name)
    (into / "contracts").mkdir()
    for name, body in contracts.items():
        (into / "contracts" / f"{name}.json").write_text(body if isinstance(body, str) else json.dumps(body))
    return into


@pytest.fixture(scope="module")
def contracted(smollm2_int4_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    model = _with_contracts(smollm2_int4_raw, tmp_path_factory.mktemp("contracted") / "smollm2-c",
                            {"city": CITY, "yes-no": {"response_format": {"type": "regex", "regex": "(yes|no)"},
                                                      "examples": ["Is the sky blue?"]},
                             "weather": {"tools": [WEATHER_TOOL], "examples": ["Weather in Rome?"]}})
    with ServerThread(model, threads=2) as server:
        yield server


def _chat(server: ServerThread, **fields: Any) -> requests.Response:
    return requests.post(f"{server.url}/v1/chat/completions", json={"messages": QUESTION, **fields}, timeout=120)


def test_models_lists_each_contract_as_a_model_id(contracted: ServerThread) -> None:
    ids = [card["id"] for card in requests.get(f"{contracted.url}/v1/models", timeout=10).json()["data"]]
    assert ids == ["smollm2-c", "smollm2-c/city", "smollm2-c/weather", "smollm2-c/yes-no"]


@pytest.mark.parametrize("model_id", ["smollm2-c/city", "default/city"])
def test_a_contract_answers_in_its_format_with_its_system_prompt(contracted: ServerThread, model_id: str) -> None:
    r = _chat(contracted, model=model_id)
    assert r.status_code == 200, r.text
    body = r.json()
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert set(answer) == {"city", "country"} and body["choices"][0]["finish_reason"] == "stop"
    assert body["model"] == "smollm2-c/city"
    # the system prompt is the contract's: the same tokens as a plain request that sends it itself
    explicit = _chat(contracted, max_tokens=1, messages=[{"role": "system", "content": CITY["system_prompt"]},
                                                         *QUESTION]).json()
    assert body["usage"]["prompt_tokens"] == explicit["usage"]["prompt_tokens"]
    assert _chat(contracted, model=model_id).json()["choices"][0]["message"] == body["choices"][0]["message"]


def test_the_contracts_defaults_yield_to_the_request(contracted: ServerThread) -> None:
    r = _chat(contracted, model="smollm2-c/city", max_tokens=3)
    assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"


def test_a_regex_contract_streams(contracted: ServerThread) -> None:
    with requests.post(f"{contracted.url}/v1/chat/completions", timeout=60, stream=True,
                       json={"model": "smollm2-c/yes-no", "messages": QUESTION, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) in ("yes", "no")
    assert {c["model"] for c in chunks} == {"smollm2-c/yes-no"}


@pytest.mark.parametrize(("fields", "status", "param", "message_part"), [
    ({"model": "smollm2-c/city", "response_format": {"type": "json_object"}}, 400, "response_format",
     "enforces its contract's answers"),
    ({"model": "smollm2-c/city", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "not with your tools"),
    ({"model": "smollm2-c/poem"}, 404, "model", "has no contract 'poem' (it has ['city', 'weather', 'yes-no']"),
    ({"model": "smollm2-c/weather", "tool_choice": "none"}, 400, "tool_choice", "always calls one of its"),
    ({"model": "other/city"}, 404, "model", "does not exist"),
])
def test_what_would_break_a_contract_is_refused(contracted: ServerThread, fields: dict[str, Any], status: int,
                                                param: str, message_part: str) -> None:
    r = _chat(contracted, **fields)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and message_part in r.json()["error"]["message"]


def test_a_tools_contract_answers_with_a_call(contracted: ServerThread) -> None:
    r = _chat(contracted, model="smollm2-c/weather", messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and set(json.loads(call["arguments"])) == {"city"}


def test_a_contract_is_for_chat_only(contracted: ServerThread) -> None:
    r = requests.post(f"{contracted.url}/v1/completions", json={"model": "smollm2-c/city", "prompt": "Oslo"},
                      timeout=60)
    assert r.status_code == 400 and "POST /v1/chat/completions" in r.json()["error"]["message"]


def test_a_model_dir_with_a_bad_contract_does_not_load(smollm2_int4_raw: Path, tmp_path: Path) -> None:
    model = _with_contracts(smollm2_int4_raw, tmp_path / "smollm2-bad", {"city": {**CITY, "examples": []}})
    out = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--model", str(model), "--port",
                          str(free_port())], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 8, out.stderr
    assert f"{model / 'contracts' / 'city.json'} is not a valid contract" in out.stderr
    assert "Traceback" not in out.stderr

"""Output contracts as files and as what they do to a request: which files load, which are
refused and why, and how a contract's format, system prompt and defaults meet a request."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.wire.contract import MAX_CONTRACTS, Contract, read_contracts, split_model_id, under_contract
from agent.wire.openai import ChatCompletionRequest, JsonSchemaFormat

CITY: dict[str, Any] = {
    "description": "a city as JSON",
    "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
    "system_prompt": "Answer with JSON only.",
    "sampling": {"temperature": 0, "max_tokens": 40},
    "examples": ["Tell me about Paris."],
}


def _write(folder: Path, name: str, body: object) -> Path:
    (folder / "contracts").mkdir(exist_ok=True)
    path = folder / "contracts" / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def test_a_model_dir_without_contracts_has_none(tmp_path: Path) -> None:
    assert read_contracts(tmp_path) == {}


def test_contracts_load_by_file_name(tmp_path: Path) -> None:
    _write(tmp_path, "city.json", CITY)
    _write(tmp_path, "yes-no.json", {"response_format": {"type": "regex", "regex": "(yes|no)"}, "examples": ["?"]})
    contracts = read_contracts(tmp_path)
    assert sorted(contracts) == ["city", "yes-no"]
    assert isinstance(contracts["city"].response_format, JsonSchemaFormat)


@pytest.mark.parametrize(("name", "body", "why"), [
    ("city.json", "{not json", "is not a valid contract"),
    ("city.json", {**CITY, "examples": []}, "is not a valid contract"),
    ("city.json", {**CITY, "response_format": {"type": "text"}}, "is not a valid contract"),
    ("city.json", {**CITY, "surprise": 1}, "is not a valid contract"),
    ("City.json", CITY, "is not a contract"),
    ("city.txt", CITY, "is not a contract"),
    ("city.json", "x" * (256 * 1024 + 1), "is over 262144 bytes"),
])
def test_a_bad_contract_file_is_refused_naming_it(tmp_path: Path, name: str, body: object, why: str) -> None:
    path = _write(tmp_path, name, body)
    with pytest.raises(ValueError, match=why) as caught:
        read_contracts(tmp_path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("body", [
    {"examples": ["x"]},  # neither a format nor tools
    {**CITY, "tools": [{"type": "function", "function": {"name": "f"}}]},  # both
])
def test_a_contract_fixes_its_answers_one_way(tmp_path: Path, body: dict[str, Any]) -> None:
    _write(tmp_path, "c.json", body)
    with pytest.raises(ValueError, match="a response_format or with tools: give one of them"):
        read_contracts(tmp_path)


def test_a_tools_contract_makes_every_answer_a_call() -> None:
    contract = Contract.model_validate({"tools": [{"type": "function", "function": {"name": "f"}}],
                                        "examples": ["x"]})
    request = under_contract(_request(), contract)
    assert request.calls_tools and request.tool_choice == "required" and request.response_format is None
    with pytest.raises(ValueError, match="^tool_choice: "):
        under_contract(_request(tool_choice="auto"), contract)


def test_a_symlinked_contract_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(CITY))
    (tmp_path / "contracts").mkdir()
    os.symlink(outside, tmp_path / "contracts" / "city.json")
    with pytest.raises(ValueError, match="is not a contract"):
        read_contracts(tmp_path)


def test_too_many_contracts_are_refused(tmp_path: Path) -> None:
    for i in range(MAX_CONTRACTS + 1):
        _write(tmp_path, f"c{i}.json", CITY)
    with pytest.raises(ValueError, match=f"at most {MAX_CONTRACTS} contracts"):
        read_contracts(tmp_path)


@pytest.mark.parametrize(("requested", "parts"), [
    ("smollm2", ("smollm2", None)), ("smollm2/city", ("smollm2", "city")), ("default/city", ("default", "city")),
    (None, (None, None)), ("org/model/city", ("org/model", "city")),
])
def test_a_model_id_names_a_contract_after_its_last_slash(requested: str | None,
                                                          parts: tuple[str | None, str | None]) -> None:
    assert split_model_id(requested) == parts


def _request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Paris?"}], **fields})


def test_the_contract_brings_its_format_system_prompt_and_defaults() -> None:
    contract = Contract.model_validate(CITY)
    request = under_contract(_request(max_tokens=10), contract)
    assert request.response_format == contract.response_format
    assert [(m.role, m.content) for m in request.messages] == [("system", "Answer with JSON only."),
                                                                ("user", "Paris?")]
    assert request.temperature == 0 and request.max_tokens == 10  # the request's own value wins
    assert request.sampling_options().guidance is not None


@pytest.mark.parametrize(("fields", "field"), [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_a_request_may_not_replace_what_the_contract_fixes(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        under_contract(_request(**fields), Contract.model_validate(CITY))

"""The OpenAI request shapes: which `response_format` becomes which output constraint, and
which parameters are refused by name rather than silently ignored."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from agent.wire.openai import ChatCompletionRequest, CompletionRequest
from agent.wire.worker import Guidance

MESSAGES = [{"role": "user", "content": "Describe Paris."}]
CITY = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def _completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "Paris is", **fields})


def test_text_format_and_no_format_constrain_nothing() -> None:
    assert _chat().sampling_options().guidance is None
    assert _chat(response_format={"type": "text"}).sampling_options().guidance is None


def test_json_object_is_any_object_in_compact_json() -> None:
    guidance = _chat(response_format={"type": "json_object"}).sampling_options().guidance
    assert guidance is not None and guidance.kind == "json_schema"
    assert json.loads(guidance.data) == {"type": "object", "x-guidance": {"whitespace_flexible": False}}


def test_json_schema_is_the_schema_itself_and_a_schema_may_set_its_own_whitespace() -> None:
    request = _chat(response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY,
                                                                             "strict": True}})
    guidance = request.sampling_options().guidance
    assert guidance is not None and json.loads(guidance.data) == {**CITY, "x-guidance": {"whitespace_flexible": False}}
    own = {**CITY, "x-guidance": {"whitespace_flexible": True}}
    request = _chat(response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": own}})
    guidance = request.sampling_options().guidance
    assert guidance is not None and json.loads(guidance.data) == own


def test_regex_and_lark_grammar_extensions() -> None:
    assert _completion(response_format={"type": "regex", "regex": "(yes|no)"}).sampling_options().guidance == \
        Guidance(kind="regex", data="(yes|no)")
    grammar = 'start: "A" | "B"'
    assert _chat(response_format={"type": "lark_grammar", "grammar": grammar}).sampling_options().guidance == \
        Guidance(kind="lark_grammar", data=grammar)


@pytest.mark.parametrize(("response_format", "where"), [
    ({"type": "xml"}, "does not match any of the expected tags"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": CITY}}, "name"),
    ({"type": "json_schema", "json_schema": {"name": "c", "schema": "{}"}}, "schema"),
    ({"type": "regex"}, "regex"),
    ({"type": "regex", "regex": ""}, "at least 1 character"),
    ({"type": "lark_grammar", "grammar": "x", "flavour": "gbnf"}, "flavour"),
])
def test_a_malformed_response_format_is_a_validation_error_naming_it(response_format: dict[str, Any],
                                                                     where: str) -> None:
    with pytest.raises(ValidationError, match=where) as caught:
        _chat(response_format=response_format)
    assert caught.value.errors()[0]["loc"][0] == "response_format"


@pytest.mark.parametrize(("fields", "param"), [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                {"type": "input_audio", "input_audio": {"data": ""}}]}]},
     "messages.0.content.1.type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content.0.image_url"),
    ({"response_format": {"type": "json_object"}, "num_beams": 2}, "num_beams"),
    ({"logprobs": True, "num_beams": 3}, "num_beams"),
    ({"logit_bias": {"5": 1}, "num_beams": 2}, "num_beams"),
    ({"frequency_penalty": 0.5, "num_beams": 2}, "num_beams"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "logprobs": True}, "logprobs"),
])
def test_a_chat_parameter_that_would_change_the_answer_is_refused_by_name(fields: dict[str, Any],
                                                                           param: str) -> None:
    refused = _chat(**fields).unsupported_parameter()
    assert refused is not None and refused[0] == param and refused[1]


@pytest.mark.parametrize(("fields", "param"), [
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "end."}, "suffix"),
])
def test_a_completion_parameter_that_would_change_the_answer_is_refused_by_name(fields: dict[str, Any],
                                                                                 param: str) -> None:
    refused = _completion(**fields).unsupported_parameter()
    assert refused is not None and refused[0] == param


def test_default_values_of_unsupported_parameters_ask_for_nothing() -> None:
    """Clients send the defaults of every parameter they know: those are no request."""
    assert _chat(logprobs=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tools=[],
                 tool_choice="none", user="u1", metadata={"a": "b"}, store=False).unsupported_parameter() is None
    assert _completion(echo=False, best_of=1, suffix="", logprobs=None).unsupported_parameter() is None


@pytest.mark.parametrize(("request_", "alternatives"), [
    (_chat(), None),
    (_chat(logprobs=False), None),
    (_chat(logprobs=True), 0),
    (_chat(logprobs=True, top_logprobs=20), 20),
    (_completion(), None),
    (_completion(logprobs=0), 0),  # legacy: the sampled token's log-probability, no alternatives
    (_completion(logprobs=5), 5),
], ids=["chat-none", "chat-false", "chat-true", "chat-top-20", "completion-none", "completion-0", "completion-5"])
def test_logprobs_ask_the_worker_for_each_token_and_that_many_alternatives(
        request_: ChatCompletionRequest | CompletionRequest, alternatives: int | None) -> None:
    assert request_.sampling_options().logprobs == alternatives


@pytest.mark.parametrize(("make", "fields", "where"), [
    (_chat, {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    (_chat, {"logprobs": False, "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    (_chat, {"logprobs": True, "top_logprobs": 21}, "less than or equal to 20"),
    (_completion, {"logprobs": 6}, "less than or equal to 5"),
    (_completion, {"logprobs": True}, "valid integer"),
])
def test_out_of_range_logprobs_are_validation_errors_naming_the_field(make: Any, fields: dict[str, Any],
                                                                      where: str) -> None:
    with pytest.raises(ValidationError, match=where) as caught:
        make(**fields)
    assert caught.value.errors()[0]["loc"][0] in fields


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.mark.parametrize(("fields", "kind", "allows_text"), [
    ({"tools": [TOOL]}, "lark_grammar", True),
    ({"tools": [TOOL], "tool_choice": "auto"}, "lark_grammar", True),
    ({"tools": [TOOL], "tool_choice": "required"}, "lark_grammar", False),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "lark_grammar", False),
    ({"tools": [TOOL], "tool_choice": "none"}, None, True),
    ({"tools": []}, None, True),
])
def test_tools_constrain_the_answer_unless_the_choice_is_none(fields: dict[str, Any], kind: str | None,
                                                               allows_text: bool) -> None:
    request = _chat(**fields)
    guidance = request.sampling_options().guidance
    assert (guidance.kind if guidance else None) == kind
    assert guidance is None or ("| TEXT" in guidance.data) == allows_text
    assert request.unsupported_parameter() is None
    if fields["tools"]:  # the model sees the tools whatever the choice
        assert json.loads(request.tools_json or "null")[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize(("fields", "where"), [
    ({"tool_choice": "required"}, '"required" needs tools'),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "names the function 'get_time', which is not in tools"),
    ({"tools": [TOOL, TOOL]}, "two tools have the same function name"),
    ({"tools": [{"type": "function", "function": {"name": "get weather!"}}]}, "pattern"),
    ({"tools": [{"type": "retrieval"}]}, "function"),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_malformed_tools_are_validation_errors_naming_the_field(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError, match=where) as caught:
        _chat(**fields)
    assert caught.value.errors()[0]["loc"][0] in fields


def test_a_history_with_calls_and_results_reaches_the_worker() -> None:
    request = _chat(messages=[
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"}])
    assistant, tool = (m.to_chat_message() for m in request.messages[1:])
    assert assistant.content == "" and assistant.tool_calls is not None
    assert (assistant.tool_calls[0].name, assistant.tool_calls[0].arguments) == ("get_weather", '{"city":"Paris"}')
    assert (tool.role, tool.content, tool.tool_call_id) == ("tool", "21 C", "c1")


def test_one_call_unless_parallel_calls_are_asked_for() -> None:
    def first_rule(**fields: Any) -> str:
        guidance = _chat(tools=[TOOL], tool_choice="required", **fields).sampling_options().guidance
        assert guidance is not None
        return guidance.data.splitlines()[0]
    assert first_rule() == first_rule(parallel_tool_calls=False) == "start: call"
    assert first_rule(parallel_tool_calls=True) == "start: call+"


def test_logit_bias_and_penalties_reach_the_worker() -> None:
    options = _chat(logit_bias={"42": -100, "7": 2.5}, presence_penalty=0.5, frequency_penalty=-1).sampling_options()
    assert [(b.token_id, b.bias) for b in options.logit_bias] == [(42, -100.0), (7, 2.5)]
    assert (options.presence_penalty, options.frequency_penalty) == (0.5, -1.0) and options.adjusts_logits
    assert not _chat(logit_bias={}, presence_penalty=0, frequency_penalty=0.0).sampling_options().adjusts_logits


@pytest.mark.parametrize(("fields", "where"), [
    ({"logit_bias": {"the": 5}}, "keys are token ids, not 'the'"),
    ({"logit_bias": {"-3": 5}}, "keys are token ids"),
    ({"logit_bias": {"3": 101}}, r"biases lie in \[-100, 100\]"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "at most 1024"),
    ({"presence_penalty": 2.5}, "less than or equal to 2"),
    ({"frequency_penalty": -2.5}, "greater than or equal to -2"),
])
def test_out_of_range_biases_and_penalties_are_validation_errors(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError, match=where) as caught:
        _chat(**fields)
    assert caught.value.errors()[0]["loc"][0] in fields

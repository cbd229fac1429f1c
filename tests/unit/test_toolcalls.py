"""The tool-call text format: what counts as calls when an answer is read back, how a
history with calls and results is rendered for a template that knows no tools (and for
one that does), and the shape of the grammar that forces calls."""

from __future__ import annotations

import json

import pytest

from agent.wire.toolcalls import (
    CLOSE,
    FALLBACK_PROMPT,
    OPEN,
    call_grammar,
    fallback_messages,
    parse_calls,
    template_messages,
)
from agent.wire.worker import ChatMessage, ToolCall

NAMES = {"get_weather", "get_time"}
WEATHER = OPEN + '{"name":"get_weather","arguments":{"city":"Paris"}}' + CLOSE
TIME = OPEN + '{"name":"get_time","arguments":{}}' + CLOSE


def test_one_call_and_several_calls_are_read_back_with_their_arguments_as_json() -> None:
    assert parse_calls(WEATHER, NAMES) == [("get_weather", '{"city": "Paris"}')]
    assert parse_calls(f"{WEATHER}\n{TIME}\n", NAMES) == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",  # an answer
    "",
    WEATHER + " and that is all",  # text after the calls
    "Sure! " + WEATHER,  # text before them
    OPEN + '{"name":"get_weather","arguments":{"city":"Par',  # cut short by max_tokens
    OPEN + '{"name":"launch","arguments":{}}' + CLOSE,  # not one of the tools
    OPEN + '{"name":"get_time","arguments":"now"}' + CLOSE,  # arguments not an object
    OPEN + "not json" + CLOSE,
])
def test_anything_but_whole_calls_to_known_tools_is_not_calls(text: str) -> None:
    assert parse_calls(text, NAMES) is None


HISTORY = [
    ChatMessage(role="user", content="Weather in Paris?"),
    ChatMessage(role="assistant", content="", tool_calls=[ToolCall(id="c1", name="get_weather",
                                                                   arguments='{"city": "Paris"}')]),
    ChatMessage(role="tool", content='{"temp": 21}', tool_call_id="c1"),
]
TOOLS = json.dumps([{"type": "function", "function": {"name": "get_weather"}}])


def test_without_template_support_tools_go_to_a_system_turn_and_results_to_user_turns() -> None:
    rendered = fallback_messages(HISTORY, TOOLS)
    assert rendered == [
        {"role": "system", "content": FALLBACK_PROMPT + TOOLS + "\n</tools>"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": OPEN + '{"name": "get_weather", "arguments": {"city": "Paris"}}' + CLOSE},
        {"role": "user", "content": '<tool_response>\n{"temp": 21}\n</tool_response>'},
    ]


def test_an_existing_system_turn_gets_the_tools_appended() -> None:
    rendered = fallback_messages([ChatMessage(role="system", content="Be brief."), *HISTORY[:1]], TOOLS)
    assert rendered[0]["content"].startswith("Be brief.\n\n" + FALLBACK_PROMPT) and len(rendered) == 2


def test_a_history_with_calls_but_no_tools_now_gets_no_tool_prompt() -> None:
    assert [m["role"] for m in fallback_messages(HISTORY, None)] == ["user", "assistant", "user"]


def test_a_template_that_knows_tools_gets_structured_calls_with_object_arguments() -> None:
    rendered = template_messages([*HISTORY, ChatMessage(role="assistant", content="", tool_calls=[
        ToolCall(id="c2", name="get_weather", arguments="{broken")])])
    assert rendered[1]["tool_calls"] == [{"id": "c1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert rendered[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "c1"}
    assert rendered[3]["tool_calls"][0]["function"]["arguments"] == "{broken"  # shown as it came
    assert rendered[0] == {"role": "user", "content": "Weather in Paris?"}


def _tools(*names: str) -> list[dict[str, object]]:
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}} for n in names]


def test_the_grammar_allows_text_only_for_auto_and_several_calls_only_when_parallel() -> None:
    auto = call_grammar(_tools("a", "b"), allow_text=True, parallel=True)
    assert auto.splitlines()[0] == "start: call+ | TEXT" and "TEXT: /[^<]" in auto
    required = call_grammar(_tools("a", "b"), allow_text=False, parallel=False)
    assert required.splitlines()[0] == "start: call" and "TEXT" not in required
    schema = json.loads(required.splitlines()[2].removeprefix("body: %json "))
    assert [s["properties"]["name"] for s in schema["anyOf"]] == [{"const": "a"}, {"const": "b"}]
    assert schema["anyOf"][0]["properties"]["arguments"]["required"] == ["city"]


def test_a_named_function_is_the_only_one_and_called_once() -> None:
    named = call_grammar(_tools("a", "b"), only="b", allow_text=False, parallel=True)
    assert named.splitlines()[0] == "start: call"
    schema = json.loads(named.splitlines()[2].removeprefix("body: %json "))
    assert [s["properties"]["name"] for s in schema["anyOf"]] == [{"const": "b"}]


def test_a_function_without_parameters_takes_an_empty_object() -> None:
    grammar = call_grammar([{"type": "function", "function": {"name": "now"}}], allow_text=False, parallel=False)
    schema = json.loads(grammar.splitlines()[2].removeprefix("body: %json "))
    assert schema["anyOf"][0]["properties"]["arguments"] == {"type": "object", "properties": {}}

"""Tool calls over the real API (uvicorn + model worker + SmolLM2), with the official `openai`
client: forced calls come back as `tool_calls` whose arguments match the schema, streamed
or not; a round trip (call, tool result, answer) renders the result back to the model;
"auto" lets the model answer in text; and a template that renders tools itself gets them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from agent.serving.runtime import ModelRuntime
from agent.wire.worker import ChatMessage, ToolCall
from testkit.serving import ServerThread

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "maxLength": 40}}}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _call(smollm2_openai: openai.OpenAI, **fields: Any) -> Any:
    return smollm2_openai.chat.completions.create(model="default", **{"temperature": 0, "max_tokens": 80, **fields})


def test_a_required_call_comes_back_as_tool_calls_matching_the_schema(smollm2_openai: openai.OpenAI) -> None:
    for seed in range(3):  # sampled too: the grammar, not luck, makes the call valid
        response = _call(smollm2_openai, messages=QUESTION, tools=[WEATHER, CLOCK], tool_choice="required",
                         temperature=1.0, seed=seed)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            arguments = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
            else:
                assert call.function.name == "get_time" and set(arguments) == {"zone"}


def test_a_named_function_is_called_even_when_another_fits_better(smollm2_openai: openai.OpenAI) -> None:
    response = _call(smollm2_openai, messages=QUESTION, tools=[WEATHER, CLOCK],
                     tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = response.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"] and "zone" in json.loads(calls[0].function.arguments)


def test_a_streamed_call_arrives_as_one_tool_calls_delta(smollm2_openai: openai.OpenAI) -> None:
    whole = _call(smollm2_openai, messages=QUESTION, tools=[WEATHER], tool_choice="required")
    chunks = list(_call(smollm2_openai, messages=QUESTION, tools=[WEATHER], tool_choice="required", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    streamed = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.index, t.function.name, t.function.arguments) for t in streamed] == \
        [(i, c.function.name, c.function.arguments) for i, c in enumerate(whole.choices[0].message.tool_calls)]
    assert not any(d.content for d in deltas) and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_round_trip_renders_the_tool_result_back_to_the_model(smollm2_openai: openai.OpenAI) -> None:
    first = _call(smollm2_openai, messages=QUESTION, tools=[WEATHER], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    history = [*QUESTION,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.id, "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21, "sky": "sunny"})}]
    for stream in (False, True):
        if stream:
            chunks = list(_call(smollm2_openai, messages=history, tools=[WEATHER], tool_choice="none", stream=True))
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            response = _call(smollm2_openai, messages=history, tools=[WEATHER], tool_choice="none")
            answer, finish = response.choices[0].message.content, response.choices[0].finish_reason
            assert response.choices[0].message.tool_calls is None
        assert finish in ("stop", "length") and "21" in answer, answer  # the result reached the model


def test_auto_lets_the_model_answer_in_text_and_streams_it(smollm2_openai: openai.OpenAI) -> None:
    chunks = list(_call(smollm2_openai, messages=[{"role": "user", "content": "Say hello to Ada."}], tools=[WEATHER],
                        stream=True, max_tokens=24))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) > 2 and not "".join(contents).startswith("<")  # streamed as it came, not held
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_malformed_tool_requests_are_a_400_naming_the_field(smollm2_api: ServerThread, fields: dict[str, Any],
                                                            param: str) -> None:
    r = requests.post(f"{smollm2_api.url}/v1/chat/completions", json={"messages": QUESTION, **fields}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{%- for message in messages %}{%- if message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>{"name": "{{ call.function.name }}", "arguments": \
{{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_renders_tools_gets_the_tools_and_the_structured_history(
        smollm2_int4_raw: Path, tmp_path: Path) -> None:
    """SmolLM2's own template knows no tools (the fallback prompt is used, test above); a copy of the
    model with a Hermes-style template that does gets them from onnxruntime-genai's template engine."""
    model = tmp_path / "smollm2-tools"
    model.mkdir()
    for item in smollm2_int4_raw.iterdir():
        if item.name != "chat_template.jinja":
            os.link(item, model / item.name)  # loadcheck refuses symlinks; a hard link costs no copy
    (model / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    runtime = ModelRuntime(model, intra_op_num_threads=1)
    assert runtime.template_renders_tools
    history = [ChatMessage(role="user", content="Weather in Paris?"),
               ChatMessage(role="assistant", content="", tool_calls=[
                   ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris", "unit": "celsius"}')]),
               ChatMessage(role="tool", content="21 C", tool_call_id="c1")]
    prompt = runtime.apply_chat_template(history, json.dumps([WEATHER]))
    assert prompt.startswith("<|im_start|>system\n# Tools\n") and '"name": "get_weather"' in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>' \
        in prompt
    assert "<tool_response>21 C</tool_response>" in prompt and "You can call functions" not in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

"""Tool calls as a model writes and reads them: the one text format, the grammar that
forces it, how a history with calls is rendered, and how an answer is read back.

A model writes each call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(the Hermes format, Qwen2.5's own). With `tool_choice` other than "none" a lark grammar
(`call_grammar`) lets the model write only that, or, for "auto", text that does not
start with `<`: so the first character tells a call from an answer, and every call
parses and matches its function's parameters schema. A chat template that renders
tools itself (it names `tools`) gets the tools and the structured history
(`template_messages`); any other gets plain messages (`fallback_messages`): the tools in
the system prompt, past calls in the assistant's text, results as user turns in
`<tool_response>` tags. Pure functions, no pydantic: the model worker uses them too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from agent.wire.worker import ChatMessage

OPEN, CLOSE = "<tool_call>", "</tool_call>"

FALLBACK_PROMPT = (
    "You can call functions. To call one, answer with nothing but "
    f'{OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CLOSE}'
    " (one such block per call). Otherwise answer normally. The functions:\n<tools>\n"
)

_CALLS = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
# Compact JSON inside the call, as for response_format (agent.wire.openai).
_COMPACT = {"whitespace_flexible": False}


def _arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters")
    return parameters if isinstance(parameters, dict) and parameters else {"type": "object", "properties": {}}


def call_grammar(tools: list[dict[str, Any]], *, only: str | None = None, allow_text: bool,
                 parallel: bool) -> str:
    """A lark grammar (llguidance's dialect) for an answer of calls to `tools` (OpenAI's shape):
    of the function named `only` when given (exactly one call), else any of them (one or, with
    `parallel`, more); with `allow_text`, a plain answer instead (it cannot start with `<`)."""
    functions = [t["function"] for t in tools if only is None or t["function"]["name"] == only]
    one_call = {
        "anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                   "properties": {"name": {"const": f["name"]}, "arguments": _arguments_schema(f)}}
                  for f in functions],
        "x-guidance": _COMPACT,
    }
    calls = "call+" if parallel and only is None else "call"
    start = f"start: {calls} | TEXT" if allow_text else f"start: {calls}"
    lines = [start, f'call: "{OPEN}" body "{CLOSE}"', f"body: %json {json.dumps(one_call)}"]
    if allow_text:
        lines.append(r"TEXT: /[^<](.|\n)*/")
    return "\n".join(lines)


def parse_calls(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    """The calls `text` consists of, as (name, arguments JSON); None when it is not only calls
    to functions in `names` with object arguments (a plain answer, or one cut short)."""
    stripped = text.strip()
    if not stripped.startswith(OPEN):
        return None
    calls: list[tuple[str, str]] = []
    end = 0
    for match in _CALLS.finditer(stripped):
        if stripped[end:match.start()].strip():
            return None
        end = match.end()
        try:
            call = json.loads(match.group(1))
        except ValueError:
            return None
        if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
            return None
        calls.append((call["name"], json.dumps(call["arguments"], ensure_ascii=False)))
    if not calls or stripped[end:].strip():
        return None
    return calls


def _chat_template_text(model_dir: Path) -> str:
    """The chat template's source, where onnxruntime-genai finds it ("" when there is none)."""
    try:
        return (model_dir / "chat_template.jinja").read_text()
    except OSError:
        pass
    try:
        template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template", "")
    except (OSError, ValueError, AttributeError):
        return ""
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        return "\n".join(t.get("template", "") for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else ""


def template_renders_tools(model_dir: Path) -> bool:
    """Whether the model's chat template renders tools itself (it names `tools`)."""
    return "tools" in _chat_template_text(model_dir)


def render(messages: list[ChatMessage], tools_json: str | None, *, template_renders_tools: bool
           ) -> tuple[list[dict[str, Any]], str | None]:
    """The messages and tools to hand the chat template: structured for a template that renders
    tools, plain turns (and no tools) for one that does not."""
    has_tool_turns = any(m.tool_calls or m.role == "tool" for m in messages)
    if (tools_json is not None or has_tool_turns) and not template_renders_tools:
        return list(fallback_messages(messages, tools_json)), None
    return template_messages(messages), tools_json


def _arguments(call_arguments: str) -> Any:
    try:
        return json.loads(call_arguments)
    except ValueError:
        return call_arguments  # a client's malformed arguments are shown to the model as they came


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The history for a chat template that renders tools: calls with their arguments as
    objects (as Hugging Face templates expect), results with the id of the call they answer."""
    rendered: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                  for c in m.tool_calls]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        rendered.append(item)
    return rendered


def fallback_messages(messages: list[ChatMessage], tools_json: str | None) -> list[dict[str, str]]:
    """The history as plain system/user/assistant turns, for a template that knows no tools."""
    rendered: list[dict[str, str]] = []
    for m in messages:
        if m.role == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"})
            continue
        content = m.content
        for c in m.tool_calls or []:
            content += OPEN + json.dumps({"name": c.name, "arguments": _arguments(c.arguments)},
                                         ensure_ascii=False) + CLOSE
        rendered.append({"role": m.role, "content": content})
    if tools_json is not None:
        prompt = FALLBACK_PROMPT + tools_json + "\n</tools>"
        if rendered and rendered[0]["role"] in ("system", "developer"):
            rendered[0] = {"role": rendered[0]["role"], "content": rendered[0]["content"] + "\n\n" + prompt}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered

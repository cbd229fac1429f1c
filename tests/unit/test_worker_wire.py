"""The worker's wire, checked on both sides: `parse_command` in the (pydantic-free) worker
and pydantic in the API process accept and reject the same lines; and the real worker
process stays lean (it maps neither pydantic-core nor numpy)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from agent.serving.worker.client import EVENT_LINE
from agent.wire.worker import (
    CancelCommand,
    ChatMessage,
    Command,
    DoneEvent,
    ErrorEvent,
    GenerateCommand,
    Guidance,
    LoadFailedEvent,
    ReadyEvent,
    SamplingOptions,
    ShutdownCommand,
    StartedEvent,
    TokenBias,
    TokenEvent,
    TokenLogprob,
    TopLogprob,
    parse_command,
)

PYDANTIC_COMMAND: TypeAdapter[Command] = TypeAdapter(Command)

COMMANDS: list[Command] = [
    GenerateCommand(id="a", prompt="The capital of France is", options=SamplingOptions(temperature=0.0, max_tokens=8)),
    GenerateCommand(id="b", messages=[ChatMessage(role="system", content="Be brief."),
                                      ChatMessage(role="user", content="naïve — 東京 🚀")],
                    options=SamplingOptions(temperature=0.7, top_p=0.9, top_k=20, seed=3, stop=["\n", "END"],
                                            repetition_penalty=1.1, num_beams=1), stream_interval_s=0.05),
    GenerateCommand(id="c", prompt="Is it?", options=SamplingOptions(guidance=Guidance(kind="regex", data="(yes|no)"))),
    GenerateCommand(id="d", prompt="Go", options=SamplingOptions(
        logprobs=3, logit_bias=[TokenBias(token_id=42, bias=-100.0)], presence_penalty=0.5, frequency_penalty=-0.25)),
    CancelCommand(id="a"),
    ShutdownCommand(),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.type)
def test_commands_round_trip_on_both_sides(command: Command) -> None:
    line = command.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_command(line) == command
    assert PYDANTIC_COMMAND.validate_json(line) == command


def _generate(**changes: Any) -> bytes:
    data = json.loads(COMMANDS[1].to_line())
    for key, value in changes.items():
        target, _, name = key.rpartition("__")
        where = data[target] if target else data
        if value is KeyError:
            del where[name]
        else:
            where[name] = value
    return json.dumps(data).encode()


# Where the stdlib side names no field, pydantic's words for the same refusal.
_PYDANTIC_WORDS = {"not JSON": "Invalid JSON", "JSON object": "Input should be an object",
                   "unknown command type 'reboot'": "GenerateCommand.type"}


@pytest.mark.parametrize(("line", "reason"), [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"type": "reboot"}', "unknown command type 'reboot'"),
    (_generate(schema_version=2), "schema_version"),
    (_generate(extra="x"), "extra"),
    (_generate(options__nucleus=0.5), "nucleus"),
    (_generate(id=KeyError), "id"),
    (_generate(id=7), "id must be str"),
    (_generate(options__temperature="hot"), "temperature must be a number"),
    (_generate(options__temperature=2.5), "temperature must be a number >= 0.0 and <= 2.0"),
    (_generate(options__max_tokens=True), "max_tokens must be an integer"),
    (_generate(options__stop=["a", "b", "c", "d", "e"]), "stop takes at most 4"),
    (_generate(messages=[{"role": "root", "content": "x"}]), "role must be one of"),
    (_generate(messages=[{"role": "user"}]), "content"),
    (_generate(stream_interval_s=5), "stream_interval_s must be a number >= 0.0 and <= 1.0"),
    (_generate(options__guidance={"kind": "sql", "data": "x"}), "guidance kind must be one of"),
    (_generate(options__guidance={"kind": "regex", "data": ""}), "a regex takes 1 to 65536 characters"),
    (_generate(options__guidance={"kind": "regex", "data": "x" * 65537}), "a regex takes 1 to 65536 characters"),
    (_generate(options__guidance={"kind": "regex"}), "data"),
    (_generate(options__guidance="(yes|no)"), "guidance must be Guidance"),
    (_generate(options__num_beams=2, options__guidance={"kind": "regex", "data": "a"}), "beam search cannot be"),
    (_generate(options__logit_bias=[{"token_id": -1, "bias": 1.0}]), "token_id must be an integer >= 0"),
    (_generate(options__logit_bias=[{"token_id": 1, "bias": 500.0}]), "bias must be a number >= -100.0 and <= 100.0"),
    (_generate(options__logit_bias=[[1, 2.0]]), "logit_bias must be a list of TokenBias"),
    (_generate(options__presence_penalty=3), "presence_penalty must be a number >= -2.0 and <= 2.0"),
    (_generate(options__num_beams=2, options__frequency_penalty=1.0), "beam search takes no logit_bias"),
    (_generate(options__logprobs=21), "logprobs must be an integer >= 0 and <= 20"),
])
def test_bad_commands_are_rejected_on_both_sides(line: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        parse_command(line)
    with pytest.raises(ValidationError) as pydantic_side:
        PYDANTIC_COMMAND.validate_json(line)
    # pydantic says it in its own words: the same message (a __post_init__ check), or the field by name.
    said = str(pydantic_side.value)
    field = reason.split()[0]
    assert _PYDANTIC_WORDS.get(reason, reason) in said or field in said.replace("GenerateCommand.", ""), said


EVENTS = [
    ReadyEvent(threads=2, pid=123, load_s=0.5),
    LoadFailedEvent(error_type="ActivationError", message="no weights"),
    StartedEvent(id="a", prompt_tokens=5),
    TokenEvent(id="a", token_ids=[1, 2], text="Paris 🚀"),
    TokenEvent(id="a", token_ids=[3], text=" is", logprobs=[
        TokenLogprob(token=" is", logprob=-0.25, top=[TopLogprob(token=" is", logprob=-0.25)])]),
    DoneEvent(id="a", finish_reason="length", prompt_tokens=5, completion_tokens=2),
    ErrorEvent(id="a", kind="context_length", message="too long"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_events_validate_in_the_api_process(event: Any) -> None:
    assert EVENT_LINE.validate_json(event.to_line()) == event


@pytest.mark.parametrize(("change", "where"), [
    ({"surprise": 1}, "surprise"),
    ({"token_ids": ["x"]}, "token_ids"),
    ({"type": "token", "token_ids": [1], "text": "x", "logprobs": [{"token": "x", "logprob": "low"}]}, "logprob"),
    ({"finish_reason": "bored"}, "finish_reason"),
    ({"type": "teleport"}, "type"),
])
def test_malformed_events_are_rejected_by_the_api_process(change: dict[str, Any], where: str) -> None:
    data = {**json.loads(TokenEvent(id="a", token_ids=[1], text="x").to_line()), "finish_reason": "stop",
            "prompt_tokens": 1, "completion_tokens": 1, "type": "done"}
    del data["token_ids"], data["text"]
    data.update(change)
    with pytest.raises(ValidationError, match=where):
        EVENT_LINE.validate_json(json.dumps(data))



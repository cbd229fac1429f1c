"""A request's worker events as OpenAI answers: one whole completion of every choice, or
server-sent events per choice and merged for several.

The HTTP side (`agent.serving.api`) opens the generations and decides between the two;
this module only turns events into bytes and models: how a stream shows tokens, held
stop-sequence text, tool calls, log-probabilities, errors after the headers and usage.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from agent.wire import toolcalls
from agent.wire.errors import ApiError
from agent.wire.openai import (
    AssistantMessage,
    CalledFunction,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    Completion,
    CompletionChoice,
    Delta,
    DeltaToolCall,
    ErrorBody,
    ErrorDetail,
    PromptTokensDetails,
    ToolCallOut,
    Usage,
    chat_logprobs,
    completion_logprobs,
)
from agent.wire.worker import DoneEvent, ErrorEvent, RequestEvent, TokenEvent, TokenLogprob

Events = AsyncGenerator[tuple[Any, RequestEvent], None]


def error_body(error: ApiError) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code))


_EVENT_ERRORS: dict[str, tuple[int, str, str]] = {
    "context_length": (400, "invalid_request_error", "context_length_exceeded"),
    "invalid_request": (400, "invalid_request_error", "invalid_request"),
    "runtime": (500, "server_error", "generation_failed"),
    "worker_died": (503, "unavailable_error", "worker_died"),
    "model_replaced": (503, "unavailable_error", "model_replaced"),
    "agent_stopping": (503, "unavailable_error", "agent_stopping"),
}


def event_error(event: ErrorEvent) -> ApiError:
    """The HTTP error a worker's error event answers with."""
    status, type_, code = _EVENT_ERRORS[event.kind]
    return ApiError(status, event.message, type_, code=code)


@dataclass(frozen=True)
class Reply:
    """What every part of one request's answer carries, and what shapes it."""

    request_id: str
    created: int
    model_name: str
    is_chat: bool
    with_logprobs: bool
    tool_names: set[str] | None  # set when the answer may be calls to these tools


@dataclass(frozen=True)
class Collected:
    """One choice's whole answer."""

    text: str
    done: DoneEvent
    logprobs: list[TokenLogprob]


async def collect(events: Events) -> Collected:
    """Read one choice to its end.

    Raises:
        ApiError: the worker answered with an error.
    """
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async with aclosing(events):
        async for _, event in events:
            if isinstance(event, TokenEvent):
                parts.append(event.text)
                logprobs.extend(event.logprobs or [])
            elif isinstance(event, DoneEvent):
                return Collected("".join(parts), event, logprobs)
            elif isinstance(event, ErrorEvent):
                raise event_error(event)
    raise ApiError(500, "the generation ended without a result", "server_error")


def _usage(done: list[DoneEvent]) -> Usage:
    """The prompt once (every choice has the same), every choice's completion."""
    prompt_tokens = done[0].prompt_tokens if done else 0
    completion_tokens = sum(event.completion_tokens for event in done)
    cached_tokens = done[0].cached_tokens if done else 0
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def whole(reply: Reply, choices: list[Collected]) -> BaseModel:
    """The answer of a request that did not stream."""
    usage = _usage([c.done for c in choices])
    if not reply.is_chat:
        return Completion(id=reply.request_id, created=reply.created, model=reply.model_name, usage=usage, choices=[
            CompletionChoice(index=i, text=c.text, finish_reason=c.done.finish_reason,
                             logprobs=completion_logprobs(c.logprobs) if reply.with_logprobs else None)
            for i, c in enumerate(choices)])
    chat_choices = []
    for i, c in enumerate(choices):
        calls = None if reply.tool_names is None else toolcalls.parse_calls(c.text, reply.tool_names)
        if calls is not None:
            chat_choices.append(ChatChoice(index=i, message=AssistantMessage(content=None,
                                                                             tool_calls=_tool_calls_out(calls)),
                                           finish_reason="tool_calls"))
        else:
            chat_choices.append(ChatChoice(index=i, message=AssistantMessage(content=c.text),
                                           finish_reason=c.done.finish_reason,
                                           logprobs=chat_logprobs(c.logprobs) if reply.with_logprobs else None))
    return ChatCompletion(id=reply.request_id, created=reply.created, model=reply.model_name, usage=usage,
                          choices=chat_choices)


async def choice_events(reply: Reply, events: Events, *, on_error: Callable[[ApiError], None],
                        include_usage: bool = False, index: int = 0,
                        done_into: list[DoneEvent] | None = None) -> AsyncIterator[bytes]:
    """One choice's server-sent events. With `done_into` (one of several choices) its done event
    goes there, and the usage and `[DONE]` are left to `merged_events`. `on_error` hears an error
    that arrives after the headers (it goes in the stream, as OpenAI does)."""
    is_chat = reply.is_chat
    text_offset = 0  # of the next token in the whole completion (the legacy logprobs' text_offset)
    # With tools, the first character tells calls ("<", the grammar's) from an answer: calls are
    # held until they are whole and sent as one tool_calls delta, an answer streams as usual.
    held: list[str] | None = [] if reply.tool_names is not None else None

    def chunk(text: str | None, finish_reason: str | None, *, first: bool = False,
              logprobs: list[TokenLogprob] | None = None) -> bytes:
        nonlocal text_offset
        obj: BaseModel
        if is_chat:
            delta = Delta(role="assistant", content="") if first else Delta(content=text)
            obj = ChatCompletionChunk(id=reply.request_id, created=reply.created, model=reply.model_name,
                                      choices=[ChunkChoice(index=index,
                                                           delta=delta if finish_reason is None else Delta(),
                                                           finish_reason=finish_reason,
                                                           logprobs=None if logprobs is None
                                                           else chat_logprobs(logprobs))])
        else:
            legacy = None if logprobs is None else completion_logprobs(logprobs, text_offset)
            text_offset += sum(len(t.token) for t in logprobs or [])
            obj = Completion(id=reply.request_id, created=reply.created, model=reply.model_name,
                             choices=[CompletionChoice(index=index, text=text or "", finish_reason=finish_reason,
                                                       logprobs=legacy)])
        return b"data: " + obj.model_dump_json(exclude_none=is_chat).encode() + b"\n\n"

    # The per-token chunk is the hot path: the model's JSON cut once around the text.
    marker = "\u0000marker\u0000"
    head, _, tail = chunk(marker, None).decode().partition(json.dumps(marker)[1:-1])
    head_bytes, tail_bytes = head.encode(), tail.encode()

    def token_chunk(text: str) -> bytes:
        return head_bytes + json.dumps(text)[1:-1].encode() + tail_bytes

    async with aclosing(events):
        if is_chat:
            yield chunk(None, None, first=True)
        async for _, event in events:
            if isinstance(event, TokenEvent):
                if held is not None:
                    held.append(event.text)
                    so_far = "".join(held).lstrip()
                    if so_far and not so_far.startswith("<"):
                        yield token_chunk("".join(held))  # an answer, not calls: stream from here on
                        held = None
                elif reply.with_logprobs:  # every token's, even one whose text is held back (a stop sequence)
                    yield chunk(event.text, None, logprobs=event.logprobs or [])
                elif event.text:
                    yield token_chunk(event.text)
            elif isinstance(event, DoneEvent):
                finish_reason: str = event.finish_reason
                if held is not None:
                    text = "".join(held)
                    calls = toolcalls.parse_calls(text, reply.tool_names or set())
                    if calls is None:  # not calls after all (cut short by max_tokens): the text as is
                        if text:
                            yield token_chunk(text)
                    else:
                        yield _data(ChatCompletionChunk(
                            id=reply.request_id, created=reply.created, model=reply.model_name,
                            choices=[ChunkChoice(index=index, delta=Delta(tool_calls=[
                                DeltaToolCall(index=i, id=call.id, function=call.function)
                                for i, call in enumerate(_tool_calls_out(calls))]))]))
                        finish_reason = "tool_calls"
                yield chunk(None, finish_reason)
                if done_into is not None:
                    done_into.append(event)
                    return
                if include_usage:
                    yield usage_event(reply, [event])
                yield b"data: [DONE]\n\n"
                return
            elif isinstance(event, ErrorEvent):
                error = event_error(event)
                on_error(error)
                yield b"data: " + error_body(error).model_dump_json().encode() + b"\n\n"
                return


def usage_event(reply: Reply, done: list[DoneEvent]) -> bytes:
    """The stream's last data event with `stream_options.include_usage`."""
    obj: BaseModel = (ChatCompletionChunk if reply.is_chat else Completion)(
        id=reply.request_id, created=reply.created, model=reply.model_name, choices=[], usage=_usage(done))
    return b"data: " + obj.model_dump_json().encode() + b"\n\n"


async def merged_events(choices: list[AsyncIterator[bytes]],
                        usage: Callable[[], bytes] | None) -> AsyncIterator[bytes]:
    """Several choices' events as one stream, interleaved as they come, then the usage (when
    asked) and `[DONE]`. Closing it closes every choice, so each cancels its generation."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def pump(choice: AsyncIterator[bytes]) -> None:
        try:
            async with aclosing(choice):  # type: ignore[type-var]
                async for data in choice:
                    await queue.put(data)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(choice)) for choice in choices]
    try:
        remaining = len(tasks)
        while remaining:
            data = await queue.get()
            if data is None:
                remaining -= 1
            else:
                yield data
        if usage is not None:
            yield usage()
        yield b"data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _tool_calls_out(calls: list[tuple[str, str]]) -> list[ToolCallOut]:
    return [ToolCallOut(id="call_" + uuid.uuid4().hex[:24], function=CalledFunction(name=name, arguments=arguments))
            for name, arguments in calls]


def _data(obj: BaseModel) -> bytes:
    return b"data: " + obj.model_dump_json(exclude_none=True).encode() + b"\n\n"

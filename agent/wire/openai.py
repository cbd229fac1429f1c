"""The OpenAI wire shapes the local API speaks: requests in, completions, chunks and errors out.

Requests accept fields that change nothing in the answer (`user`, `metadata`,
`store`, ...: clients send many), so an OpenAI client works unchanged; a
parameter that would change the answer and is not implemented is refused with
its name (`unsupported_parameter`), never silently ignored. Responses keep
OpenAI's field order, since clients and readers compare them with OpenAI's
documentation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from agent.wire import toolcalls
from agent.wire.base import StrictModel
from agent.wire.worker import (
    MAX_LOGIT_BIASES,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    Guidance,
    SamplingOptions,
    TokenBias,
    TokenLogprob,
    ToolCall,
)

# ---- request models (OpenAI's shape; unknown fields are accepted and logged) ----

MAX_CHOICES = 8


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: str | None = None  # OpenAI's low/high/auto: the model's processor decides here


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str  # JSON text


class ApiToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ApiMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[_ContentPart] | None = None
    tool_calls: list[ApiToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def to_chat_message(self, image_tags: Iterator[str] | None = None) -> ChatMessage:
        """The turn for the worker; each image part becomes the next of `image_tags` (the model's
        marker for that image, in the order the images are sent), in its place among the text."""
        if isinstance(self.content, list):
            pieces: list[str] = []
            for part in self.content:
                if part.type == "text":
                    pieces.append(part.text or "")
                elif part.type == "image_url" and image_tags is not None:
                    pieces.append(next(image_tags))
            text = "".join(pieces)
        else:
            text = self.content or ""
        calls = None if not self.tool_calls else [
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in self.tool_calls]
        return ChatMessage(role=self.role, content=text, tool_calls=calls, tool_call_id=self.tool_call_id)


# ---- tools: OpenAI's function tools ----

class FunctionSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # enforced either way: the grammar follows the schema


class ToolSpec(StrictModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


# ---- response_format: OpenAI's three types, plus two extensions for constrained decoding ----

class TextFormat(StrictModel):
    type: Literal["text"]


class JsonObjectFormat(StrictModel):
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    # Enforced either way: constrained decoding cannot follow a schema only loosely.
    strict: bool | None = None


class JsonSchemaFormat(StrictModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class RegexFormat(StrictModel):
    """Extension: the whole answer matches this regex (llguidance's syntax, Rust regex)."""

    type: Literal["regex"]
    regex: str = Field(min_length=1)


class LarkGrammarFormat(StrictModel):
    """Extension: the whole answer is a sentence of this lark grammar (its rule `start`)."""

    type: Literal["lark_grammar"]
    grammar: str = Field(min_length=1)


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat | RegexFormat | LarkGrammarFormat,
                           Field(discriminator="type")]

# Compact JSON unless the schema says otherwise: flexible whitespace lets a small model spend
# its whole budget on newlines between keys (seen with SmolLM2), and costs tokens besides.
_COMPACT_JSON = {"whitespace_flexible": False}


def _json_guidance(schema: dict[str, Any]) -> Guidance:
    if "x-guidance" not in schema:
        schema = {**schema, "x-guidance": _COMPACT_JSON}
    return Guidance(kind="json_schema", data=json.dumps(schema, separators=(",", ":")))


def guidance_of(response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | RegexFormat | LarkGrammarFormat
                | None) -> Guidance | None:
    """The constraint that makes the answer match `response_format` (None: free text)."""
    if response_format is None or isinstance(response_format, TextFormat):
        return None
    if isinstance(response_format, JsonObjectFormat):
        return _json_guidance({"type": "object"})
    if isinstance(response_format, JsonSchemaFormat):
        return _json_guidance(response_format.json_schema.json_schema)
    if isinstance(response_format, RegexFormat):
        return Guidance(kind="regex", data=response_format.regex)
    return Guidance(kind="lark_grammar", data=response_format.grammar)


def _asks(value: Any, *defaults: Any) -> bool:
    """Whether a parameter asks for something: set, and not to one of its no-op `defaults`
    (compared with their type: `logprobs: 0` asks for the sampled token's, `false` does not)."""
    return value is not None and not any(type(value) is type(d) and value == d for d in defaults)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, description="extension")
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, description="extension")
    num_beams: int | None = Field(default=None, ge=1, le=8, description="extension: beam search")
    # Choices per request: each is a generation of its own and takes a slot of its own.
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # {token id (as a string, JSON keys are): bias}, added to the logits before each sampling step.
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIASES)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence takes at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounds(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids, not {key[:40]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} is {bias}: biases lie in [-100, 100]")
        return value

    def guidance(self) -> Guidance | None:
        """The constraint on the answer: the response_format's (None: free text)."""
        return guidance_of(self.response_format)

    def unsupported_parameter(self) -> tuple[str, str] | None:
        """The first parameter this request sets to something this server does not do, and why;
        None when it asks for nothing of the sort. A default value (0, false, {}) is no request."""
        if self.response_format is not None and not isinstance(self.response_format, TextFormat) \
                and _asks(self.num_beams, 1):
            return "num_beams", "beam search cannot be constrained: send num_beams 1 with a response_format"
        if self.logprob_alternatives() is not None and _asks(self.num_beams, 1):
            return "num_beams", "beam search reports no per-token log-probabilities: send num_beams 1 with logprobs"
        if (self.logit_bias or self.presence_penalty or self.frequency_penalty) and _asks(self.num_beams, 1):
            return "num_beams", "beam search takes no logit_bias or penalties: send num_beams 1 with them"
        return None

    def logprob_alternatives(self) -> int | None:
        """None: no log-probabilities asked; n: each token's, with its n likeliest alternatives."""
        return None

    def sampling_options(self) -> SamplingOptions:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        defaults = SamplingOptions()
        return SamplingOptions(
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=self.top_p or defaults.top_p,
            top_k=defaults.top_k if self.top_k is None else self.top_k,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            seed=self.seed,
            stop=stops,
            repetition_penalty=self.repetition_penalty or defaults.repetition_penalty,
            num_beams=self.num_beams or 1,
            guidance=self.guidance(),
            logprobs=self.logprob_alternatives(),
            logit_bias=[TokenBias(token_id=int(k), bias=v) for k, v in (self.logit_bias or {}).items()],
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
        )


class ChatCompletionRequest(GenerationRequest):
    messages: list[ApiMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolSpec] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: false, unlike OpenAI (see `guidance`)
    # The deprecated function-calling shape: not implemented (a 400 naming it).
    functions: Any = None
    function_call: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, value: list[ToolSpec] | None) -> list[ToolSpec] | None:
        names = [t.function.name for t in value or []]
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same function name")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(cls, value: str | NamedToolChoice | None, info: ValidationInfo
                             ) -> str | NamedToolChoice | None:
        names = {t.function.name for t in info.data.get("tools") or []}
        if value == "required" and not names:
            raise ValueError('"required" needs tools')
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"names the function {value.function.name!r}, which is not in tools")
        return value

    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may (or must) be calls: tools given and tool_choice not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tools_json(self) -> str | None:
        """The tools for the model's prompt (also with tool_choice "none": the model knows them)."""
        return None if not self.tools else json.dumps([t.model_dump(exclude_none=True) for t in self.tools])

    def guidance(self) -> Guidance | None:
        if not self.calls_tools:
            return super().guidance()
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []]
        choice = self.tool_choice
        only = choice.function.name if isinstance(choice, NamedToolChoice) else None
        # One call unless parallel calls are asked for (llama.cpp's server's default too): a small
        # model allowed more keeps calling until max_tokens cuts it off.
        grammar = toolcalls.call_grammar(tools, only=only, allow_text=choice in (None, "auto"),
                                         parallel=self.parallel_tool_calls is True)
        return Guidance(kind="lark_grammar", data=grammar)

    def unsupported_parameter(self) -> tuple[str, str] | None:
        if _asks(self.functions, []):
            return "functions", "the deprecated functions parameter is not supported: send them as tools"
        if _asks(self.function_call, "none"):
            return "function_call", "the deprecated function_call is not supported: send tool_choice"
        if self.calls_tools and self.response_format is not None and not isinstance(self.response_format,
                                                                                     TextFormat):
            return "response_format", "a response_format cannot be combined with tools: send one or the other"
        if self.calls_tools and self.logprobs:
            return "logprobs", "log-probabilities are not reported with tools yet: send one or the other"
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if part.type not in ("text", "image_url"):
                        return (f"messages.{i}.content.{j}.type",
                                f"{part.type} content parts are not supported: send text and image_url parts")
                    if part.type == "image_url" and part.image_url is None:
                        return (f"messages.{i}.content.{j}.image_url", "an image_url part needs image_url.url")
        return super().unsupported_parameter()

    def image_urls(self) -> list[tuple[str, str]]:
        """(where, url) of every image part, in order: `where` names the part (messages.i.content.j)."""
        return [(f"messages.{i}.content.{j}", part.image_url.url)
                for i, message in enumerate(self.messages) if isinstance(message.content, list)
                for j, part in enumerate(message.content) if part.type == "image_url" and part.image_url is not None]


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    # The legacy shape: the sampled token's log-probability and this many alternatives (OpenAI's bound).
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)  # strict: `true` is not 1
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    def unsupported_parameter(self) -> tuple[str, str] | None:
        if _asks(self.echo, False):
            return "echo", "echo is not supported: send the request without it"
        if _asks(self.best_of, 1):
            return "best_of", "best_of is not supported: send 1 or leave it out (num_beams, an extension, is)"
        if _asks(self.suffix, ""):
            return "suffix", "suffix (insertion) is not supported: send the request without it"
        return super().unsupported_parameter()

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# ---- response models ----

class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache (OpenAI's name)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


def chat_logprobs(items: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        ChatTokenLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode()),
                         top_logprobs=[TopLogprobOut(token=a.token, logprob=a.logprob, bytes=list(a.token.encode()))
                                       for a in t.top])
        for t in items])


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


def completion_logprobs(items: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """`offset`: where the first token's text starts in the whole completion (streaming)."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return CompletionLogprobs(tokens=[t.token for t in items], token_logprobs=[t.logprob for t in items],
                              top_logprobs=[{a.token: a.logprob for a in t.top} for t in items], text_offset=offsets)


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


Modality = Literal["text", "image"]


def _text_only() -> list[Modality]:
    return ["text"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgefleet"
    version: int | None = Field(description="extension: the manifest version")
    context_length: int = Field(description="extension")
    input_modalities: list[Modality] = Field(default_factory=_text_only,
                                              description="extension: what a chat message may carry")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

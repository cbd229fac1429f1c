"""The OpenAI wire shapes the local API speaks: requests in, completions, chunks and errors out.

Requests accept and ignore fields we do not implement (clients send many), so
an OpenAI client works unchanged; responses keep OpenAI's field order, since
clients and readers compare them with OpenAI's documentation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.wire.worker import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, ChatMessage, SamplingOptions

# ---- request models (OpenAI's shape; unknown fields are accepted and logged) ----


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ApiMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[_ContentPart] | None = None

    def to_chat_message(self) -> ChatMessage:
        if isinstance(self.content, list):
            text = "".join(p.text or "" for p in self.content if p.type == "text")
        else:
            text = self.content or ""
        return ChatMessage(role=self.role, content=text)


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
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence takes at most {MAX_STOP_CHARS} characters")
        return value

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
        )


class ChatCompletionRequest(GenerationRequest):
    messages: list[ApiMessage] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

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

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


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
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgefleet"
    version: int | None = Field(description="extension: the manifest version")
    context_length: int = Field(description="extension")


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

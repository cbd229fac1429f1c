"""The wire between the API process and the model worker: JSON lines, one object each.

Commands go to the worker's stdin, events come back on a private copy of its
stdout. Defined once, here, as stdlib dataclasses rather than pydantic models:
the worker process never imports pydantic (it costs 11 MB in every process
that builds a model, measured; `python bench/agent.py`). The API process
validates every event with pydantic over these same classes
(`agent.serving.worker.client`: extra keys, missing keys and wrong types are errors);
the worker checks every command with `parse_command` (the classes'
`__post_init__` checks, which pydantic runs too).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, get_args

from agent.wire import _checks as wirecheck

FinishReason = Literal["stop", "length", "cancelled"]
# OpenAI caps a request at 4 stop sequences; ORT-GenAI's own turn API at 16. Each is matched
# against the text after every token, so its length is bounded too.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1024
# The most prompt tokens the worker prefills at once: the attention scratch of one batch grows with
# it, so the builder measures `min_ram_bytes` prefilling the whole context in batches of this size.
PREFILL_CHUNK_TOKENS = 1024
# A request without max_tokens gets at most this many: with past_present_share_buffer the
# KV cache is allocated for the whole max_length up front, and a full 8k context of
# SmolLM2 would take ~0.4 GB per request on a small box.
DEFAULT_MAX_NEW_TOKENS = 1024  # agent.toml's default_max_tokens

Role = Literal["system", "user", "assistant", "tool", "developer"]
_ROLES: frozenset[str] = frozenset(get_args(Role))


@dataclass(frozen=True, kw_only=True)
class ToolCall:
    """A function call an assistant turn made (history sent back by the client)."""

    __pydantic_config__ = {"extra": "forbid", "strict": True}  # a ConfigDict: pydantic reads it, no import

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI's wire carries it

    def __post_init__(self) -> None:
        for name in ("id", "name", "arguments"):
            wirecheck.expect(self, name, str)


@dataclass(frozen=True, kw_only=True)
class ChatMessage:
    """One chat turn. A stdlib dataclass, not a pydantic model, because the model worker
    builds it and stays free of pydantic (`agent.wire.worker`); pydantic validates it
    wherever it is part of a pydantic model, running these same checks."""

    __pydantic_config__ = {"extra": "forbid", "strict": True}  # a ConfigDict: pydantic reads it, no import

    role: Role
    content: str
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"role must be one of {sorted(_ROLES)}, not {self.role!r}")
        wirecheck.expect(self, "content", str)
        wirecheck.expect_items(self, "tool_calls", ToolCall, optional=True)
        wirecheck.expect(self, "tool_call_id", str, optional=True)


GuidanceKind = Literal["json_schema", "regex", "lark_grammar"]
_GUIDANCE_KINDS: frozenset[str] = frozenset(get_args(GuidanceKind))
# A schema or grammar is compiled in the worker between decode rounds: bound what one request may ask.
MAX_GUIDANCE_CHARS = 64 * 1024
# OpenAI's bound on alternatives per token; each costs a decode of its token in the worker.
MAX_TOP_LOGPROBS = 20
# Token biases per request: each is applied to the logits at every step.
MAX_LOGIT_BIASES = 1024


@dataclass(frozen=True, kw_only=True)
class TokenBias:
    """Added to one token's logit before every sampling step (OpenAI's logit_bias: -100 bans it)."""

    __pydantic_config__ = {"extra": "forbid", "strict": True}  # a ConfigDict: pydantic reads it, no import

    token_id: int
    bias: float

    def __post_init__(self) -> None:
        wirecheck.number(self, "token_id", ge=0, integer=True)
        wirecheck.number(self, "bias", ge=-100.0, le=100.0)


@dataclass(frozen=True, kw_only=True)
class Guidance:
    """An output constraint that constrained decoding enforces token by token (onnxruntime-genai's
    guidance, llguidance inside): a JSON schema, a regex or a lark grammar, as text."""

    __pydantic_config__ = {"extra": "forbid", "strict": True}  # a ConfigDict: pydantic reads it, no import

    kind: GuidanceKind
    data: str

    def __post_init__(self) -> None:
        if self.kind not in _GUIDANCE_KINDS:
            raise ValueError(f"guidance kind must be one of {sorted(_GUIDANCE_KINDS)}, not {self.kind!r}")
        wirecheck.expect(self, "data", str)
        if not self.data or len(self.data) > MAX_GUIDANCE_CHARS:
            raise ValueError(f"a {self.kind} takes 1 to {MAX_GUIDANCE_CHARS} characters, not {len(self.data)}")


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """The search options of one request (part of the worker's wire, so a stdlib
    dataclass like `ChatMessage`). Invalid values raise ValueError at construction."""

    __pydantic_config__ = {"extra": "forbid", "strict": True}  # a ConfigDict: pydantic reads it, no import

    temperature: float = 1.0  # [0, 2]; 0 is greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 50  # >= 0
    max_tokens: int | None = None  # > 0; None: DEFAULT_MAX_NEW_TOKENS, within the context length
    seed: int | None = None  # >= 0
    stop: list[str] = field(default_factory=list)  # at most MAX_STOP_SEQUENCES
    repetition_penalty: float = 1.0  # > 0
    num_beams: int = 1  # [1, 8]
    guidance: Guidance | None = None  # the output must match it
    # None: no log-probabilities; n >= 0: each token's, with its n likeliest alternatives.
    logprobs: int | None = None
    logit_bias: list[TokenBias] = field(default_factory=list)
    # OpenAI's penalties on the completion so far: a token's logit loses presence_penalty once it
    # has appeared and frequency_penalty for each time it has.
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]

    def __post_init__(self) -> None:
        wirecheck.number(self, "temperature", ge=0.0, le=2.0)
        wirecheck.number(self, "top_p", gt=0.0, le=1.0)
        wirecheck.number(self, "top_k", ge=0, integer=True)
        wirecheck.number(self, "max_tokens", gt=0, integer=True, optional=True)
        wirecheck.number(self, "seed", ge=0, integer=True, optional=True)
        wirecheck.number(self, "repetition_penalty", gt=0.0)
        wirecheck.number(self, "num_beams", ge=1, le=8, integer=True)
        wirecheck.expect_items(self, "stop", str, max_items=MAX_STOP_SEQUENCES)
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop sequences take at most {MAX_STOP_CHARS} characters each")
        wirecheck.expect(self, "guidance", Guidance, optional=True)
        if self.guidance is not None and self.num_beams > 1:
            raise ValueError("beam search cannot be constrained: send num_beams 1 with a response_format")
        wirecheck.number(self, "logprobs", ge=0, le=MAX_TOP_LOGPROBS, integer=True, optional=True)
        if self.logprobs is not None and self.num_beams > 1:
            raise ValueError("beam search reports no per-token log-probabilities: send num_beams 1 with logprobs")
        wirecheck.expect_items(self, "logit_bias", TokenBias, max_items=MAX_LOGIT_BIASES)
        wirecheck.number(self, "presence_penalty", ge=-2.0, le=2.0)
        wirecheck.number(self, "frequency_penalty", ge=-2.0, le=2.0)
        if self.adjusts_logits and self.num_beams > 1:
            raise ValueError("beam search takes no logit_bias or penalties: send num_beams 1 with them")

    @property
    def adjusts_logits(self) -> bool:
        """Whether each step's logits are changed before sampling (logit_bias, the penalties)."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.num_beams > 1


# Images in one prompt (each some 2,000 prompt tokens for Phi-3.5-vision).
MAX_PROMPT_IMAGES = 4

# A canary longer than this is not a health check any more.
MAX_CANARY_TOKENS = 256

ErrorKind = Literal["context_length", "invalid_request", "runtime", "worker_died", "model_replaced",
                    "agent_stopping"]

_STRICT = {"extra": "forbid", "strict": True}  # a pydantic ConfigDict, read by pydantic without importing it


@dataclass(kw_only=True)
class _Line:
    """One line of the wire: its `type` tags it, `schema_version` guards against a skewed peer."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _STRICT
    schema_version: Literal[1] = 1

    def to_line(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


# ---- commands (API process -> worker) ----

@dataclass(kw_only=True)
class GenerateCommand(_Line):
    type: Literal["generate"] = "generate"
    id: str
    prompt: str | None = None  # raw text, used as is (completions, canary)
    messages: list[ChatMessage] | None = None  # chat: the model's template is applied
    tools: str | None = None  # chat: the request's tools, a JSON list in OpenAI's shape
    options: SamplingOptions
    # Tokens made within this many seconds of the last token event ride in the next one
    # (the first token and the last are never held): 0 sends every token on its own.
    stream_interval_s: float = 0.0
    # PNGs (base64) for the prompt's image tags, in order: only ones the API process wrote itself
    # (`agent.serving.images`), since the runtime's decoder ends the process on a damaged file.
    images: list[str] | None = None

    def __post_init__(self) -> None:
        wirecheck.expect(self, "id", str)
        wirecheck.expect(self, "prompt", str, optional=True)
        wirecheck.expect_items(self, "images", str, optional=True, max_items=MAX_PROMPT_IMAGES)
        wirecheck.expect_items(self, "messages", ChatMessage, optional=True)
        wirecheck.expect(self, "tools", str, optional=True)
        wirecheck.expect(self, "options", SamplingOptions)
        wirecheck.number(self, "stream_interval_s", ge=0.0, le=1.0)


@dataclass(kw_only=True)
class CancelCommand(_Line):
    type: Literal["cancel"] = "cancel"
    id: str

    def __post_init__(self) -> None:
        wirecheck.expect(self, "id", str)


@dataclass(kw_only=True)
class CanaryCommand(_Line):
    """Teacher-force `token_ids` after `prompt` (raw text) and report each token's lead."""

    type: Literal["canary"] = "canary"
    id: str
    prompt: str
    token_ids: list[int]
    images: list[str] | None = None  # the image canary: PNGs (base64) for the prompt's image tags

    def __post_init__(self) -> None:
        wirecheck.expect(self, "id", str)
        wirecheck.expect(self, "prompt", str)
        wirecheck.expect_items(self, "token_ids", int, max_items=MAX_CANARY_TOKENS)
        wirecheck.expect_items(self, "images", str, optional=True, max_items=MAX_PROMPT_IMAGES)


@dataclass(kw_only=True)
class ShutdownCommand(_Line):
    type: Literal["shutdown"] = "shutdown"


Command = GenerateCommand | CancelCommand | CanaryCommand | ShutdownCommand
_COMMANDS: dict[str, type[GenerateCommand] | type[CancelCommand] | type[CanaryCommand] | type[ShutdownCommand]] = {
    "generate": GenerateCommand, "cancel": CancelCommand, "canary": CanaryCommand, "shutdown": ShutdownCommand}


def _refuse_constant(name: str) -> None:
    raise ValueError(f"a command line is not JSON: {name} (RFC 8259 has no NaN or Infinity)")


def _chat_message(data: dict[str, Any]) -> ChatMessage:
    if isinstance(data.get("tool_calls"), list):
        data["tool_calls"] = [ToolCall(**c) if isinstance(c, dict) else c for c in data["tool_calls"]]
    return ChatMessage(**data)


def parse_command(line: bytes) -> Command:
    """One command line, checked as strictly as pydantic checks events on the other side.

    Raises:
        ValueError: not JSON, not an object, an unknown type or schema version, an unknown
            or missing key, or a field of the wrong type or out of range (the message says which).
    """
    try:
        data: Any = json.loads(line, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"a command line is not JSON: {e}") from e
    except RecursionError as e:
        raise ValueError(f"a command line nested too deeply to parse: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"a command is a JSON object, not {type(data).__name__}")
    type_name = data.get("type")
    kind = _COMMANDS.get(type_name) if isinstance(type_name, str) else None
    if kind is None:
        raise ValueError(f"unknown command type {type_name!r}"[:200])
    if data.get("schema_version", 1) != 1:
        raise ValueError(f"unsupported schema_version {data['schema_version']!r}: the API process and the "
                         "worker come from different agent versions")
    try:
        if kind is GenerateCommand:
            if isinstance(data.get("options"), dict):
                options = data["options"]
                if isinstance(options.get("guidance"), dict):
                    options["guidance"] = Guidance(**options["guidance"])
                if isinstance(options.get("logit_bias"), list):
                    options["logit_bias"] = [TokenBias(**b) if isinstance(b, dict) else b
                                             for b in options["logit_bias"]]
                data["options"] = SamplingOptions(**options)
            if isinstance(data.get("messages"), list):
                data["messages"] = [_chat_message(m) if isinstance(m, dict) else m for m in data["messages"]]
        return kind(**data)
    except TypeError as e:  # an unknown or a missing key
        raise ValueError(f"bad {data['type']} command: {e}") from e


# ---- events (worker -> API process) ----

@dataclass(kw_only=True)
class ReadyEvent(_Line):
    type: Literal["ready"] = "ready"
    threads: int
    pid: int
    load_s: float


@dataclass(kw_only=True)
class LoadFailedEvent(_Line):
    type: Literal["load_failed"] = "load_failed"
    error_type: str
    message: str


@dataclass(kw_only=True)
class StartedEvent(_Line):
    type: Literal["started"] = "started"
    id: str
    prompt_tokens: int


@dataclass(frozen=True, kw_only=True)
class TopLogprob:
    """One candidate for a position: its text and natural-log probability under the model."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _STRICT
    token: str
    logprob: float


@dataclass(frozen=True, kw_only=True)
class TokenLogprob:
    """The log-probability of one generated token, and the likeliest alternatives at its position
    (best first), from the model's own distribution: before temperature, penalties and constraints."""

    __pydantic_config__: ClassVar[dict[str, Any]] = _STRICT
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(kw_only=True)
class TokenEvent(_Line):
    type: Literal["token"] = "token"
    id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked

    def merged(self, later: TokenEvent) -> TokenEvent:
        """This event and a later one of the same request as one."""
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            [*(self.logprobs or []), *(later.logprobs or [])]
        return TokenEvent(id=self.id, token_ids=self.token_ids + later.token_ids, text=self.text + later.text,
                          logprobs=logprobs)


@dataclass(kw_only=True)
class CanaryEvent(_Line):
    """The answer to a `CanaryCommand`: one lead per token (`agent.wire.canary.token_lead`)."""

    type: Literal["canary"] = "canary"
    id: str
    leads: list[float]


@dataclass(kw_only=True)
class DoneEvent(_Line):
    type: Literal["done"] = "done"
    id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV the prefix cache held: not prefilled again


@dataclass(kw_only=True)
class ErrorEvent(_Line):
    type: Literal["error"] = "error"
    id: str
    kind: ErrorKind
    message: str


Event = ReadyEvent | LoadFailedEvent | StartedEvent | TokenEvent | CanaryEvent | DoneEvent | ErrorEvent
RequestEvent = StartedEvent | TokenEvent | DoneEvent | ErrorEvent


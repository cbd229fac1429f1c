"""The model worker answers a request that hits a bug in its own code with an error event
and keeps serving: one request fails, not the worker and every request on it."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from agent.serving.worker.client import EVENT_LINE
from agent.serving.worker.process import _Worker
from agent.wire.worker import ChatMessage, ErrorEvent, GenerateCommand, SamplingOptions


class _BuggyRuntime:
    """A stand-in for ModelRuntime whose template rendering has a bug: no real input reaches one."""

    kv_bytes_per_token = 0
    decoder = None  # onnxruntime-genai's generators serve it

    def apply_chat_template(self, messages: Sequence[ChatMessage], tools_json: str | None = None) -> str:
        raise KeyError("a bug")


def test_a_bug_while_admitting_a_request_fails_that_request_only() -> None:
    out = io.BytesIO()
    worker = _Worker(_BuggyRuntime(), out)  # type: ignore[arg-type]
    command = GenerateCommand(id="r1", messages=[ChatMessage(role="user", content="hi")], options=SamplingOptions())
    worker.admit(command)
    event: Any = EVENT_LINE.validate_json(out.getvalue())
    assert isinstance(event, ErrorEvent) and event.id == "r1" and event.kind == "runtime"
    assert "internal error in the model worker (KeyError)" in event.message
    assert worker.active == {} and worker.handle(command)  # still taking commands

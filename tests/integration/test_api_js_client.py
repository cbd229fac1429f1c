"""The official OpenAI JavaScript client (npm, pinned in tests/js/package-lock.json; `make test`
installs it) against a real API over SmolLM2: structured output that parses, a tool-call round
trip streamed and not, logprobs, and a refused parameter, as a Node.js program sees them."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.env import REPO_ROOT
from testkit.serving import ServerThread

JS_DIR = REPO_ROOT / "tests" / "js"


@pytest.fixture(scope="module")
def seen(smollm2_int4_raw: Path) -> Iterator[dict[str, Any]]:
    node = shutil.which("node")
    assert node is not None, "Node.js is missing: `make test` installs it (Debian's nodejs)"
    assert (JS_DIR / "node_modules" / "openai").is_dir(), "run `make test` (it runs npm ci in tests/js)"
    with ServerThread(smollm2_int4_raw, threads=2) as server:
        out = subprocess.run([node, str(JS_DIR / "client.mjs"), f"{server.url}/v1"], capture_output=True,
                             text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    yield json.loads(out.stdout)


def test_structured_output_parses_every_time(seen: dict[str, Any]) -> None:
    assert seen["structured"] == [{"finish": "stop", "valid": True}] * 5


def test_a_tool_call_round_trip_streamed_and_not(seen: dict[str, Any]) -> None:
    call = seen["toolCall"]
    assert call["finish"] == "tool_calls" and call["name"] == "get_weather" and set(call["arguments"]) == {"city"}
    streamed = seen["streamedToolCall"]
    assert streamed["finish"] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"]] == \
        [("get_weather", call["arguments"])]
    assert seen["answer"]["finish"] in ("stop", "length") and "21" in seen["answer"]["content"]


def test_logprobs_one_per_token(seen: dict[str, Any]) -> None:
    assert seen["logprobs"] == {"entries": 12, "completionTokens": 12, "joined": True, "allNegative": True}


def test_an_image_to_a_text_only_model_is_a_bad_request_naming_the_part(seen: dict[str, Any]) -> None:
    assert seen["refused"] == {"status": 400, "param": "messages.0.content.0"}

"""`edge-agent prompt` and `edge-agent chat`: talk to a model from the terminal,
through the running agent's API (`--url`) or straight from a model dir (`--model`)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.wire.cli import HelpFormatter
from agent.wire.errors import ImageError, RuntimeModelError, UsageError
from agent.wire.genai_config import image_tags
from agent.wire.worker import MAX_PROMPT_IMAGES, ChatMessage, SamplingOptions

_DEFAULT_URL = "http://127.0.0.1:8080"
# Outside the EDGE_AGENT_ prefix on purpose: every EDGE_AGENT_<KEY> is a config key of the
# daemon, which refuses unknown ones, so a client's setting must not look like one.
ENV_API_URL = "EDGEFLEET_API_URL"
_TIMEOUT_S = (5.0, 300.0)  # connect, read: a long answer on a slow box takes minutes


class _Backend(Protocol):
    def stream(self, messages: list[ChatMessage], options: SamplingOptions,
               images: Sequence[bytes] = ()) -> Iterator[str]:
        """`images`: encoded pictures for the last message, shown before its text."""
        ...


class _LocalBackend:
    """The model in this process: no server needed."""

    def __init__(self, model_dir: Path, threads: int | None) -> None:
        from agent.serving.runtime import ModelRuntime

        self.runtime = ModelRuntime(model_dir, intra_op_num_threads=threads)

    def stream(self, messages: list[ChatMessage], options: SamplingOptions,
               images: Sequence[bytes] = ()) -> Iterator[str]:
        if not images:
            generation = self.runtime.start(self.runtime.encode(self.runtime.apply_chat_template(messages)), options)
        else:
            from agent.serving.images import to_png

            tag = self.runtime.image_tag
            if tag is None:
                raise UsageError(f"the model in {self.runtime.model_dir} reads text only: leave out --image")
            try:
                pngs = [to_png(image) for image in images]  # what the API does: whole images only
            except ImageError as e:
                raise UsageError(f"--image: {e}") from e
            last = messages[-1]
            tagged = [*messages[:-1], ChatMessage(role=last.role, content=image_tags(tag, len(images)) + last.content)]
            try:
                generation = self.runtime.start_with_images(self.runtime.apply_chat_template(tagged), pngs, options)
            except ValueError as e:
                raise UsageError(f"--image: {e}") from e
        try:
            while not generation.is_done:
                step = generation.step()
                if step.text:
                    yield step.text
        finally:
            generation.release()


_HTTP_OPTIONS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "repetition_penalty", "num_beams")


class _HttpBackend:
    """The agent's API: POST /v1/chat/completions with stream=true, read the SSE chunks."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def stream(self, messages: list[ChatMessage], options: SamplingOptions,
               images: Sequence[bytes] = ()) -> Iterator[str]:
        import requests

        # The options this command sets, in OpenAI's names (the worker's wire has more, in its own shape).
        sampling = {name: getattr(options, name) for name in _HTTP_OPTIONS if getattr(options, name) is not None}
        wire: list[dict[str, Any]] = [{"role": m.role, "content": m.content} for m in messages]
        if images:  # OpenAI's shape: the pictures as data: URLs, then the text (the server checks them)
            wire[-1]["content"] = [*({"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(image).decode("ascii")}} for image in images),
                {"type": "text", "text": messages[-1].content}]
        body = {"model": "default", "messages": wire, "stream": True, **sampling}
        try:
            response = requests.post(f"{self.url}/v1/chat/completions", json=body, headers=self.headers,
                                     stream=True, timeout=_TIMEOUT_S)
        except requests.RequestException as e:
            raise RuntimeModelError(f"cannot reach the agent API at {self.url} ({e}): is `edge-agent serve` "
                                    "or `edge-agent run` running? pass --url or --model") from e
        with response:
            if response.status_code != 200:
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text[:200]
                raise RuntimeModelError(f"the agent API at {self.url} answered {response.status_code}: {message}")
            for raw in response.iter_lines():
                line = raw.decode("utf-8", "replace")
                if not line or not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeModelError(f"generation failed in the agent: {chunk['error']['message']}")
                for choice in chunk.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text


def _add_common(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, metavar="DIR", help="run this model dir in-process (no server)")
    source.add_argument("--url", default=os.environ.get(ENV_API_URL, _DEFAULT_URL),
                        help=f"the agent API base URL (env: {ENV_API_URL})")
    # The env value is read in the handler, never shown as a default in --help: it is a secret.
    p.add_argument("--token", default=None,
                   help="bearer token for --url; None: no token (env: EDGE_AGENT_API_TOKEN)")
    p.add_argument("--system", default=None, help="a system message; None: the model's own")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling bound")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling; None: random")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads with --model; None: the CPU count")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "prompt", help="stream one answer to the terminal", formatter_class=HelpFormatter,
        description="Send one prompt and stream the answer to stdout.",
        epilog='example:\n  edge-agent prompt "Name three rivers in France." --model ./smollm2-int4\n')
    p.add_argument("text", help="the user message")
    p.add_argument("--image", type=Path, action="append", default=[], metavar="FILE",
                   help="a picture for the message (PNG, JPEG, GIF, WebP, BMP); repeatable, at most "
                        f"{MAX_PROMPT_IMAGES}; the model must take images (GET /v1/models: input_modalities)")
    _add_common(p)
    p.set_defaults(handler=_prompt)
    c = subparsers.add_parser(
        "chat", help="an interactive chat that keeps the conversation", formatter_class=HelpFormatter,
        description="Interactive chat: each line you type is a user message; the conversation is kept. "
                    "Type /exit or press Ctrl-D to leave, /reset to start over.",
        epilog="example:\n  edge-agent chat --url http://127.0.0.1:8080\n")
    _add_common(c)
    c.set_defaults(handler=_chat)


def _backend(args: argparse.Namespace) -> _Backend:
    if args.model is not None:
        if not (args.model / "genai_config.json").is_file():
            raise UsageError(f"{args.model} is not a model dir (no genai_config.json)")
        return _LocalBackend(args.model, args.threads)
    return _HttpBackend(args.url, args.token or os.environ.get("EDGE_AGENT_API_TOKEN"))


def _options(args: argparse.Namespace) -> SamplingOptions:
    try:
        return SamplingOptions(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                               seed=args.seed)
    except ValueError as e:
        raise UsageError(f"bad sampling option: {e}") from e


def _read_images(paths: list[Path]) -> list[bytes]:
    """The files of --image, read whole (each at most MAX_IMAGE_BYTES).

    Raises:
        UsageError: too many, unreadable, or too large.
    """
    from agent.serving.images import MAX_IMAGE_BYTES, read_bounded

    if len(paths) > MAX_PROMPT_IMAGES:
        raise UsageError(f"--image takes at most {MAX_PROMPT_IMAGES} pictures, not {len(paths)}")
    try:
        return [read_bounded(path, MAX_IMAGE_BYTES, "--image") for path in paths]
    except ImageError as e:
        raise UsageError(str(e)) from e


def _answer(backend: _Backend, messages: list[ChatMessage], options: SamplingOptions,
            images: Sequence[bytes] = ()) -> str:
    parts: list[str] = []
    for text in backend.stream(messages, options, images):
        parts.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def _prompt(args: argparse.Namespace) -> int:
    options = _options(args)
    messages = [ChatMessage(role="system", content=args.system)] if args.system else []
    messages.append(ChatMessage(role="user", content=args.text))
    images = _read_images(args.image)
    _answer(_backend(args), messages, options, images)
    return 0


def _chat(args: argparse.Namespace) -> int:
    options = _options(args)
    backend = _backend(args)
    start = [ChatMessage(role="system", content=args.system)] if args.system else []
    messages = list(start)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append(ChatMessage(role="user", content=line))
        answer = _answer(backend, messages, options)
        messages.append(ChatMessage(role="assistant", content=answer))

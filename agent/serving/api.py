"""The local OpenAI-compatible API (design section 7), a Starlette app.

The API process never runs the model: it parses requests at the boundary,
routes them through the ModelHost's slots to a model-worker process and
streams the worker's events back as OpenAI JSON or server-sent events.

Trust: the API listens on 127.0.0.1 or a unix socket. With `api_token` set,
every `/v1/*` request needs `Authorization: Bearer <token>`; `/healthz` and
`/metrics` stay open for local supervisors, as in llama.cpp's server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from agent.serving import images, responses
from agent.serving.host import ModelHost
from agent.serving.images import MAX_IMAGES
from agent.serving.worker.client import WorkerClient
from agent.wire.contract import split_model_id, under_contract
from agent.wire.errors import ActivationError, ApiError, ConfigError, ImageError, ModelNotReadyError, QueueFullError
from agent.wire.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorDetail,
    GenerationRequest,
    ModelCard,
    ModelList,
)
from agent.wire.worker import ChatMessage, DoneEvent, ErrorEvent, RequestEvent, StartedEvent

log = logging.getLogger(__name__)

# ---- errors ----


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(responses.error_body(error).model_dump(), status_code=error.status, headers=error.headers)


def _invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code=code, param=param)


class _CancellingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always watches for the client going away.

    Starlette's own only notices a disconnect at the next write under ASGI
    2.4; we cancel the generation as soon as the disconnect arrives, so the
    slot is freed even while the model is between tokens.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as task_group:
            async def run_then_cancel(func: Callable[[], Any]) -> None:
                await func()
                task_group.cancel_scope.cancel()

            task_group.start_soon(run_then_cancel, partial(self.stream_response, send))
            await run_then_cancel(partial(self.listen_for_disconnect, receive))


# ---- the app ----

# A request body larger than this is refused before it is read (413): a chat request of a
# whole context is tens of KiB; this leaves room for long prompts and images to come.
DEFAULT_MAX_BODY_BYTES = 8 << 20


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


class _Api:
    def __init__(self, host: ModelHost, api_token: str | None, max_body_bytes: int,
                 image_dir: Path | None = None) -> None:
        self.host = host
        self.api_token = api_token  # replaced in place when the daemon reloads its config
        self.max_body_bytes = max_body_bytes
        self.image_dir = image_dir  # image parts may name files in it; None: data: URLs only

    def _check_auth(self, request: Request) -> None:
        if self.api_token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_token.encode()):
            raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer <api_token>'",
                           "authentication_error", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        """The body, read only up to `max_body_bytes`: a huge POST costs a 413, not the memory."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        too_large = ApiError(413, f"the request body is over {limit} bytes: send a shorter prompt or smaller "
                             "images (the server's limit is --max-body-bytes / api_max_body_bytes)",
                             "invalid_request_error", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        return b"".join(parts)

    async def _parse(self, request: Request, model: type[GenerationRequest]) -> Any:
        body = await self._read_body(request)
        try:
            data = json.loads(body, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _invalid(f"the request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e}): "
                           "send a JSON object") from e
        except RecursionError as e:
            raise _invalid("the request body is nested too deeply to parse: send a flat JSON object") from e
        except ValueError as e:  # an integer of more digits than Python converts, NaN, Infinity
            raise _invalid(f"the request body is not valid JSON ({e})"[:300]) from e
        if not isinstance(data, dict):
            raise _invalid("the request body must be a JSON object")
        try:
            parsed = model.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise _invalid(f"{param}: {first['msg']}", param=param) from e
        if parsed.model_extra:
            log.info("event=unknown_request_fields endpoint=%s fields=%s", request.url.path,
                     ",".join(sorted(parsed.model_extra)))
        model_name, _ = split_model_id(parsed.model)
        if not self.host.accepts_model(model_name):
            active = self.host.identity.name if self.host.identity else None
            raise ApiError(404, f"the model {parsed.model!r} does not exist: this server runs {active!r} "
                           "(see GET /v1/models)", "invalid_request_error", code="model_not_found", param="model")
        return parsed

    def _contract(self, req: GenerationRequest) -> str | None:
        """The contract the request's model id names (None: none), checked to exist.

        Raises:
            ApiError: 404, the active model has no such contract.
        """
        _, name = split_model_id(req.model)
        if name is None:
            return None
        identity = self.host.identity
        if identity is None or name not in identity.contracts:
            known = sorted(identity.contracts) if identity else []
            raise ApiError(404, f"the model {identity.name if identity else None!r} has no contract {name!r} "
                           f"(it has {known}; see GET /v1/models)", "invalid_request_error",
                           code="model_not_found", param="model")
        return name

    async def _first_event(self, events: AsyncGenerator[tuple[Any, RequestEvent], None]
                           ) -> tuple[WorkerClient, StartedEvent]:
        try:
            worker, event = await events.__anext__()
        except QueueFullError as e:
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from e
        except ModelNotReadyError as e:
            raise ApiError(503, str(e), "unavailable_error", code=503) from e
        if isinstance(event, ErrorEvent):
            raise responses.event_error(event)
        if not isinstance(event, StartedEvent):
            raise ApiError(500, f"the model worker answered {type(event).__name__} before it started the request",
                           "server_error")
        return worker, event

    async def _guarded(self, request: Request, endpoint: str,
                       handler: Callable[[Request], Any]) -> Response:
        try:
            self._check_auth(request)
            response: Response = await handler(request)
        except ApiError as e:
            self.host.metrics.observe_request(endpoint, e.status)
            self.host.metrics.observe_error(str(e.code or e.type))
            log.info("event=request_refused endpoint=%s status=%d code=%s", endpoint, e.status, e.code)
            return _error_response(e)
        self.host.metrics.observe_request(endpoint, response.status_code)
        return response

    # -- generation endpoints --

    async def chat_completions(self, request: Request) -> Response:
        return await self._guarded(request, "/v1/chat/completions", self._chat)

    async def completions(self, request: Request) -> Response:
        return await self._guarded(request, "/v1/completions", self._complete)

    async def _chat(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self._parse(request, ChatCompletionRequest)
        contract = self._contract(req)
        if contract is not None and self.host.identity is not None:
            try:
                req = under_contract(req, self.host.identity.contracts[contract])
            except ValueError as e:
                raise _invalid(str(e), param=str(e).partition(":")[0]) from e
        pngs, tag = await self._images(req)
        tags = (tag.format(n=n) for n in itertools.count(1)) if tag is not None else None
        messages = [m.to_chat_message(tags) for m in req.messages]
        tool_names = {t.function.name for t in req.tools or []} if req.calls_tools else None
        return await self._generate(request, req, messages=messages, prompt=None, is_chat=True,
                                    tools=req.tools_json, tool_names=tool_names, images=pngs or None)

    async def _images(self, req: ChatCompletionRequest) -> tuple[list[str], str | None]:
        """The request's images as base64 PNGs (decoded and re-encoded off the event loop), and the
        model's tag for them; ([], None) without images.

        Raises:
            ApiError: 400, the model reads text only, too many images, or one is unusable (the
                message names the part).
        """
        urls = req.image_urls()
        if not urls:
            return [], None
        identity = self.host.identity
        tag = identity.image_tag if identity is not None else None
        if tag is None:
            where = urls[0][0]
            name = identity.name if identity is not None else None
            raise _invalid(f"{where}: the model {name!r} reads text only (GET /v1/models lists what each model "
                           "takes in input_modalities): send the message without images", param=where,
                           code="unsupported_content")
        if len(urls) > MAX_IMAGES:
            where = urls[MAX_IMAGES][0]
            raise _invalid(f"{where}: a request takes at most {MAX_IMAGES} images, this one has {len(urls)}",
                           param=where, code="too_many_images")
        encoded: list[str] = []
        for where, url in urls:
            try:
                png = await anyio.to_thread.run_sync(_png_from_url, url, self.image_dir)
            except ImageError as e:
                raise _invalid(f"{where}.image_url.url: {e}", param=f"{where}.image_url.url") from e
            encoded.append(base64.b64encode(png).decode("ascii"))
        return encoded, tag

    async def _complete(self, request: Request) -> Response:
        req: CompletionRequest = await self._parse(request, CompletionRequest)
        if self._contract(req) is not None:
            raise _invalid("a contract answers chat: send it to POST /v1/chat/completions", param="model")
        return await self._generate(request, req, messages=None, prompt=req.prompt_text, is_chat=False)

    async def _generate(self, request: Request, req: GenerationRequest, *, messages: list[ChatMessage] | None,
                        prompt: str | None, is_chat: bool, tools: str | None = None,
                        tool_names: set[str] | None = None, images: list[str] | None = None) -> Response:
        """`tools`: the tools for the prompt; `tool_names`: set when the answer may be calls to them."""
        refused = req.unsupported_parameter()
        if refused is not None:
            name, why = refused
            raise _invalid(f"{name}: {why}", param=name, code="unsupported_parameter")
        try:
            options = req.sampling_options()
        except ValidationError as e:
            raise _invalid(str(e.errors()[0]["msg"])) from e
        except ValueError as e:  # a check of the worker's wire (SamplingOptions, Guidance)
            raise _invalid(str(e)) from e
        # n choices are n generations; with a seed, choice i samples with seed + i (reproducible, distinct).
        choice_options = [options if options.seed is None else dataclasses.replace(options, seed=options.seed + i)
                          for i in range(req.n)]
        streams = [self.host.generate(prompt=prompt, messages=messages, tools=tools, options=o, images=images)
                   for o in choice_options]
        # A client may give up while its request waits in the queue: watch for that from here on.
        disconnected = asyncio.ensure_future(_wait_disconnect(request))
        opened = await self._open(streams, disconnected)
        if opened is None:
            return Response(status_code=499)
        # The worker's model, not the host's current one: a switch may happen mid-request.
        _, contract = split_model_id(req.model)
        model_name = opened[0][0].identity.name + (f"/{contract}" if contract else "")
        reply = responses.Reply(request_id=("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex[:24],
                                created=int(time.time()), model_name=model_name, is_chat=is_chat,
                                with_logprobs=options.logprobs is not None, tool_names=tool_names)
        if req.stream:
            disconnected.cancel()  # the streaming response watches for itself
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = partial(responses.choice_events, reply, on_error=self._count_stream_error)
            done: list[DoneEvent] = []  # the choices' done events, for the usage of several
            body = events(streams[0], include_usage=include_usage) if len(streams) == 1 else responses.merged_events(
                [events(choice, index=i, done_into=done) for i, choice in enumerate(streams)],
                partial(responses.usage_event, reply, done) if include_usage else None)
            return _CancellingStreamingResponse(body, media_type="text/event-stream",
                                                headers={"Cache-Control": "no-cache"})
        collects = [asyncio.ensure_future(responses.collect(choice)) for choice in streams]
        everything = asyncio.ensure_future(asyncio.gather(*collects))
        waiting: set[asyncio.Future[Any]] = {everything, disconnected}
        finished, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if everything not in finished:
            everything.cancel()  # the client went away: free the slots now
            log.info("event=client_disconnected id=%s", reply.request_id)
            return Response(status_code=499)
        disconnected.cancel()
        try:
            choices: list[responses.Collected] = everything.result()
        except BaseException:
            for collect in collects:  # one choice failed: the others stop too (gather leaves them running)
                collect.cancel()
            raise
        return JSONResponse(responses.whole(reply, choices).model_dump())

    def _count_stream_error(self, error: ApiError) -> None:
        self.host.metrics.observe_error(str(error.code))

    async def _open(self, streams: list[AsyncGenerator[tuple[Any, RequestEvent], None]],
                    disconnected: asyncio.Future[None]) -> list[tuple[WorkerClient, StartedEvent]] | None:
        """Wait until every stream's generation has started; None when the client went away first
        (every generation then leaves the queue or is cancelled). On an error every stream is closed.

        Raises:
            ApiError: a generation could not start (queue full, no model, a refused request).
        """
        firsts = [asyncio.ensure_future(self._first_event(events)) for events in streams]
        all_started = asyncio.ensure_future(asyncio.gather(*firsts))
        waiting: set[asyncio.Future[Any]] = {all_started, disconnected}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not all_started.done():
                for first in firsts:
                    first.cancel()  # leaves the queue, or cancels the generation in the worker
                await asyncio.wait(firsts)
                all_started.cancel()
                log.info("event=client_disconnected stage=queued")
                for events in streams:
                    await events.aclose()
                return None
            return all_started.result()
        except BaseException:
            disconnected.cancel()
            for first in firsts:  # we were cancelled ourselves (shutdown), or one failed: stop them all
                first.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait(firsts)
            for events in streams:
                await events.aclose()
            raise

    # -- status endpoints --

    async def models(self, request: Request) -> Response:
        async def handler(_: Request) -> Response:
            identity = self.host.identity
            cards = [] if identity is None else [
                ModelCard(id=model_id, version=identity.version, context_length=identity.context_length,
                          created=int(_dir_mtime(identity.model_dir)),
                          input_modalities=["text", "image"] if identity.image_tag is not None else ["text"])
                for model_id in [identity.name, *(f"{identity.name}/{c}" for c in sorted(identity.contracts))]]
            return JSONResponse(ModelList(data=cards).model_dump())
        return await self._guarded(request, "/v1/models", handler)

    async def healthz(self, request: Request) -> Response:
        # llama.cpp server's shape: 503 + "Loading model" until the model serves.
        identity = self.host.identity
        if identity is not None and self.host.is_serving:
            return JSONResponse({"status": "ok", "model": identity.name, "version": identity.version})
        if self.host.state in ("loading", "empty"):
            body = ErrorBody(error=ErrorDetail(message="Loading model", type="unavailable_error", code=503))
        else:
            body = ErrorBody(error=ErrorDetail(message=f"model failed to load: {self.host.last_error}",
                                               type="unavailable_error", code=503))
        return JSONResponse(body.model_dump(), status_code=503)

    async def metrics(self, request: Request) -> Response:
        identity = self.host.identity
        text = self.host.metrics.render_prometheus(identity.name if identity else None,
                                                   identity.version if identity else None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _png_from_url(url: str, image_dir: Path | None) -> bytes:
    return images.to_png(images.image_url_bytes(url, image_dir))


def _dir_mtime(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return 0.0


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):
        raise exc
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_,
                                    code=exc.status_code))


def create_app(host: ModelHost, *, api_token: str | None = None, model_dir: Path | None = None,
               on_load_failure: Callable[[ActivationError], None] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, image_dir: Path | None = None) -> Starlette:
    """The API over `host`.

    With `model_dir`, the app owns the host: its startup begins loading that
    model in the background (`/healthz` answers 503 until it serves) and its
    shutdown stops the workers; `on_load_failure` hears when that model does
    not load. Without, the caller (the agent daemon) loads models with
    `host.switch()` and closes the host itself. `app.state.api.api_token` may be
    replaced while the app runs (a config reload). `image_dir`: image parts may name files in it
    (`file://` URLs or paths); without it only `data:` URLs are read.

    Raises:
        ConfigError: `api_token` is empty (it would let `Authorization: Bearer ` in).
    """
    if api_token is not None and not api_token.strip():
        raise ConfigError("api_token is empty: set a real token or remove the key")
    api = _Api(host, api_token, max_body_bytes, image_dir)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        load: asyncio.Task[Any] | None = None
        if model_dir is not None:
            async def load_initial() -> None:
                try:
                    await host.switch(model_dir)
                except ActivationError as e:  # logged by the host; /healthz reports it
                    if on_load_failure is not None:
                        on_load_failure(e)
            host.state = "loading"
            load = asyncio.create_task(load_initial())
        try:
            yield
        finally:
            if model_dir is not None:
                if load is not None and not load.done():
                    load.cancel()
                await host.close()

    routes = [
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.api = api
    return app


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug answers in OpenAI's error shape too (and is logged with its traceback by the server)."""
    log.error("event=internal_error path=%s error=%r", request.url.path, str(exc)[:300])
    return _error_response(ApiError(500, f"internal error while serving {request.url.path}: see the agent's log",
                                    "server_error", code="internal_error"))

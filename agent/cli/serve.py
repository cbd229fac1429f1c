"""`edge-agent serve`: serve one model dir with the local API (no update machinery)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from agent.serving.prefix_cache import DEFAULT_BUDGET_BYTES
from agent.wire.cli import HelpFormatter
from agent.wire.errors import UsageError
from agent.wire.worker import DEFAULT_MAX_NEW_TOKENS

log = logging.getLogger(__name__)

_EXAMPLE = """example:
  edge-agent serve --model /var/lib/edge-agent/current --port 8080
  curl -s localhost:8080/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model": "default", "messages": [{"role": "user", "content": "Hi"}]}'
"""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model dir through the OpenAI-compatible API",
        description="Serve one model dir with the local OpenAI-compatible API, like `llama-server -m`. "
                    "GET /healthz answers 503 while the model loads.",
        epilog=_EXAMPLE, formatter_class=HelpFormatter)
    p.add_argument("--model", type=Path, required=True, metavar="DIR",
                   help="an onnxruntime-genai model dir (genai_config.json, model.onnx, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="TCP port")
    p.add_argument("--bind", default=os.environ.get("EDGE_AGENT_API_BIND"), metavar="BIND",
                   help="host:port or unix:/path; overrides --host/--port; None: use them (env: EDGE_AGENT_API_BIND)")
    p.add_argument("--threads", type=int, default=_env_int("EDGE_AGENT_INTRA_OP_NUM_THREADS"), metavar="N",
                   help="onnxruntime intra-op threads; None: the CPU count (env: EDGE_AGENT_INTRA_OP_NUM_THREADS)")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="requests generating at once (they share the model token by token)")
    p.add_argument("--queue-size", type=int, default=16, metavar="N",
                   help="requests waiting for a slot before 429 Too Many Requests")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help="the most tokens a request without max_tokens gets (within the context)")
    p.add_argument("--prefix-cache-mb", type=int, default=DEFAULT_BUDGET_BYTES >> 20, metavar="MB",
                   help="KV cache kept of finished requests: a request that repeats their start (a chat's "
                        "history, a shared system prompt) prefills only the rest; 0: off")
    p.add_argument("--stream-interval-ms", type=float, default=50.0, metavar="MS",
                   help="tokens made within MS of the last streamed chunk ride in the next one (the first token "
                        "never waits); 0: a chunk per token, which costs decode speed on a busy CPU")
    # The env value is read in the handler, never shown as a default in --help: it is a secret.
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, metavar="BYTES",
                   help="request bodies over this are refused with 413 before they are read")
    p.add_argument("--image-dir", type=Path, default=None, metavar="DIR",
                   help="chat image parts may name files in DIR (file:// URLs or paths); None: data: URLs only, "
                        "never a remote fetch")
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help="file holding the bearer token required on /v1/*; None: EDGE_AGENT_API_TOKEN, else no "
                        "auth (needed when --host or --bind is not loopback)")
    p.add_argument("--token", default=None, metavar="T",
                   help="the token itself: visible to every user in ps; prefer --token-file")
    p.set_defaults(handler=_serve)


def _token(args: argparse.Namespace) -> str | None:
    if args.token is not None:
        print("edge-agent: warning: --token shows the secret to every user of this machine (ps);"
              " use --token-file or EDGE_AGENT_API_TOKEN", file=sys.stderr)
        return str(args.token)
    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip() or None
        except OSError as e:
            raise UsageError(f"cannot read --token-file {args.token_file}: {e.strerror or e}") from e
    return os.environ.get("EDGE_AGENT_API_TOKEN") or None


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from agent.serving.api import create_app
    from agent.serving.host import ModelHost
    from agent.serving.server import check_exposure, uvicorn_config
    from agent.wire.errors import ActivationError

    if not (args.model / "genai_config.json").is_file():
        raise UsageError(f"{args.model} is not a model dir (no genai_config.json): pass a dir built by edge-builder")
    if args.parallel < 1 or args.queue_size < 0:
        raise UsageError(f"--parallel must be >= 1 and --queue-size >= 0 (got {args.parallel}, {args.queue_size})")
    if args.default_max_tokens < 1:
        raise UsageError(f"--default-max-tokens must be >= 1 (got {args.default_max_tokens})")
    if args.prefix_cache_mb < 0:
        raise UsageError(f"--prefix-cache-mb must be >= 0 (got {args.prefix_cache_mb})")
    bind = args.bind or f"{args.host}:{args.port}"
    if not 0 <= args.stream_interval_ms <= 1000:
        raise UsageError(f"--stream-interval-ms must be between 0 and 1000 (got {args.stream_interval_ms})")
    host = ModelHost(threads=args.threads, parallel=args.parallel, queue_size=args.queue_size,
                     stream_interval_s=args.stream_interval_ms / 1000, prefix_cache_bytes=args.prefix_cache_mb << 20,
                     default_max_tokens=args.default_max_tokens)
    load_failures: list[ActivationError] = []

    def stop_on_load_failure(error: ActivationError) -> None:
        # Like llama-server: a model that does not load ends `serve` (the daemon instead keeps serving the old one).
        load_failures.append(error)
        server.should_exit = True

    token = _token(args)
    check_exposure(bind, token)
    if args.max_body_bytes < 1024:
        raise UsageError(f"--max-body-bytes must be at least 1024 (got {args.max_body_bytes})")
    if args.image_dir is not None and not args.image_dir.is_dir():
        raise UsageError(f"--image-dir {args.image_dir} is not a folder")
    app = create_app(host, api_token=token, model_dir=args.model, on_load_failure=stop_on_load_failure,
                     max_body_bytes=args.max_body_bytes, image_dir=args.image_dir)
    server = uvicorn.Server(uvicorn_config(app, bind, log_level="info" if args.verbose else "warning"))
    print(f"edge-agent: serving {args.model} on {bind}", file=sys.stderr)
    server.run()
    if load_failures:
        raise load_failures[0]
    return 0

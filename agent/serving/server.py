"""Run the API with uvicorn on `host:port` or `unix:/path` (config key `api_bind`)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from agent.wire.errors import ConfigError

log = logging.getLogger(__name__)


def parse_bind(bind: str) -> tuple[str, int] | Path:
    """`"127.0.0.1:8080"` -> (host, port); `"unix:/run/edge-agent.sock"` -> Path.

    Raises:
        ConfigError: neither form.
    """
    if bind.startswith("unix:"):
        path = bind[len("unix:"):]
        if not path.startswith("/"):
            raise ConfigError(f"api_bind {bind!r}: a unix socket needs an absolute path,"
                              " e.g. unix:/run/edge-agent.sock")
        return Path(path)
    host, sep, port_text = bind.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"api_bind {bind!r} is neither host:port (e.g. 127.0.0.1:8080) nor unix:/path")
    return host.strip("[]"), int(port_text)


def is_local_only(bind: str) -> bool:
    """Whether `bind` (as `parse_bind` reads it) listens on this host only: loopback or a unix socket."""
    target = parse_bind(bind)
    if isinstance(target, Path):
        return True
    host = target[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(bind: str, api_token: str | None) -> None:
    """Raises:
        ConfigError: `bind` reaches beyond this host and no token guards it.
    """
    if api_token is None and not is_local_only(bind):
        raise ConfigError(f"api_bind {bind!r} listens beyond this host without an api_token: anyone on the network"
                          " could prompt the model; set api_token (EDGE_AGENT_API_TOKEN) or bind 127.0.0.1 or a"
                          " unix socket")


def uvicorn_config(app: Starlette, bind: str, *, log_level: str = "warning") -> uvicorn.Config:
    target = parse_bind(bind)
    common = {"log_level": log_level, "lifespan": "on", "access_log": False, "timeout_graceful_shutdown": 5}
    if isinstance(target, Path):
        return uvicorn.Config(app, uds=str(target), **common)  # type: ignore[arg-type]
    return uvicorn.Config(app, host=target[0], port=target[1], **common)  # type: ignore[arg-type]


async def serve(app: Starlette, bind: str, *, log_level: str = "warning") -> None:
    """Serve until cancelled or signalled; the agent daemon awaits this next to its other loops."""
    server = uvicorn.Server(uvicorn_config(app, bind, log_level=log_level))
    log.info("event=api_listen bind=%s", bind)
    await server.serve()


def run_server(app: Starlette, bind: str, *, log_level: str = "warning") -> None:
    """Blocking: serve until SIGINT/SIGTERM."""
    server = uvicorn.Server(uvicorn_config(app, bind, log_level=log_level))
    log.info("event=api_listen bind=%s", bind)
    server.run()

"""The device's configuration: one TOML file, one pydantic model.

Order of sources: environment (`EDGE_AGENT_<KEY>`) over the TOML file over the
defaults below. An unknown key in either source is an error that names it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from agent.serving.prefix_cache import DEFAULT_BUDGET_BYTES
from agent.wire.base import StrictModel
from agent.wire.errors import ConfigError
from agent.wire.worker import DEFAULT_MAX_NEW_TOKENS

ENV_PREFIX = "EDGE_AGENT_"
DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


class AgentConfig(StrictModel):
    """Every key of `agent.toml`. The field descriptions are the reference documentation."""

    device_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                           description="unique id of this device; also the MQTT client id")
    fleet: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                       description="MQTT topic prefix edgefleet/<fleet>")
    channel: str = Field(default="stable", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                         description="the release channel this device follows")
    repo_url: str = Field(description="base URL of the TUF repository (serves metadata/ and targets/)")
    state_dir: Path = Field(default=DEFAULT_STATE_DIR, description="the device store")
    disk_cap_bytes: int = Field(default=8 * 1024**3, gt=0, description="most bytes the store may use")
    api_bind: str = Field(default="127.0.0.1:8080", description="host:port or unix:/path of the local API")
    api_token: str | None = Field(default=None, min_length=1, pattern=r"\S",
                                  description="bearer token the local API requires, if set")
    api_max_body_bytes: int = Field(default=8 << 20, ge=1024, description="request bodies over this are a 413")
    api_image_dir: Path | None = Field(default=None, description=(
        "chat image parts may name files in this folder; unset: data: URLs only, never a remote fetch"))
    broker_url: str | None = Field(default=None, description="mqtt://host:port or mqtts://host:port")
    broker_username: str | None = None
    broker_password: str | None = None
    broker_ca_file: Path | None = None
    broker_cert_file: Path | None = None
    broker_key_file: Path | None = None
    mqtt_protocol: str = Field(default="3.1.1", pattern=r"^(3\.1\.1|5)$")
    telemetry_interval_s: float = Field(default=30.0, gt=0)
    poll_interval_s: float = Field(default=900.0, gt=0, description="the longest this device goes without an"
                                   " update check: a check for any reason (a doorbell, a command) starts it over")
    download_rate_limit_bytes_per_s: int | None = Field(default=None, gt=0)
    download_min_rate_bytes_per_s: int = Field(default=1024, ge=1, description=(
        "an attempt slower than this over 30 s is abandoned and retried (a dripping mirror)"))
    download_budget_s: float = Field(default=3600.0, gt=0, description=(
        "a download pass stops after this long, its partials kept for the next check"))
    intra_op_num_threads: int | None = Field(default=None, gt=0,
                                             description="ORT threads per model; default: the CPU count")
    stream_interval_ms: float = Field(default=50.0, ge=0, le=1000,
                                      description="streamed tokens made within this many ms of the last chunk"
                                                  " ride in the next chunk (the first never waits); 0: every token"
                                                  " alone, at a cost in decode speed")
    parallel: int = Field(default=4, ge=1, le=64,
                          description="requests the model generates at once; more wait in the queue")
    queue_size: int = Field(default=16, ge=0, le=4096,
                            description="requests that may wait for a slot; one more is a 429 with Retry-After")
    default_max_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=1 << 20, description=(
        "the most tokens a request without max_tokens gets (within the context); the KV cache is allocated"
        " for them up front. Applies from the next model load"))
    prefix_cache_mb: int = Field(default=DEFAULT_BUDGET_BYTES >> 20, ge=0, le=1 << 20, description=(
        "KV cache the model worker keeps of finished requests, so that a request repeating their start"
        " (a chat's history, a shared system prompt) prefills only the rest; 0: off. Applies from the"
        " next model load"))
    allow_custom_ops: bool = Field(default=False, description=(
        "let a model's genai_config.json load custom operator libraries (native code from the package)"))
    probation_s: float = Field(default=60.0, ge=0,
                               description="a new model whose worker dies within this window is rolled back")
    stop_drain_s: float = Field(default=45.0, ge=0, le=3600, description=(
        "on SIGTERM, requests in flight get this long to finish; one still running then ends with a 503"
        " that says so. Keep it under the unit's TimeoutStopSec (60 s) less 10 s for the workers to stop"))
    switch_mode: Literal["auto", "both", "drain"] = Field(
        default="auto", description="auto: load the new model next to the old one when available RAM holds"
                                    " both (manifest min_ram_bytes), else drain the old one first")

    @field_validator("repo_url")
    @classmethod
    def _repo_url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("broker_url")
    @classmethod
    def _broker_url_is_mqtt(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must start with mqtt:// or mqtts://")
        return value

    @model_validator(mode="after")
    def _rate_limit_above_the_minimum(self) -> AgentConfig:
        limit = self.download_rate_limit_bytes_per_s
        if limit is not None and limit < self.download_min_rate_bytes_per_s:
            raise ValueError(f"download_rate_limit_bytes_per_s {limit} is under download_min_rate_bytes_per_s "
                             f"{self.download_min_rate_bytes_per_s}: every download would be abandoned as too slow")
        return self

    @property
    def trust_dir(self) -> Path:
        return self.state_dir / "trust"


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    known = set(AgentConfig.model_fields)
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in known:
            raise ConfigError(f"unknown environment variable {name}: no config key {key!r}")
        overrides[key] = value
    return overrides


def load_config(path: Path | None, environ: dict[str, str] | None = None) -> AgentConfig:
    """Read `path` (if given), apply `EDGE_AGENT_*` overrides and validate.

    Raises:
        ConfigError: the file is missing or not TOML, or a key is unknown or invalid.
    """
    environ = dict(os.environ) if environ is None else environ
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist: create it or pass --config") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    data.update(_env_overrides(environ))
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(config)"
        where = f"config file {path}" if path else "configuration"
        reason = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"{where}: key {key!r}: {reason} ({len(e.errors())} error(s) in all)") from e

"""The MQTT wire formats (design section 6) and the topic names.

Every payload is the JSON of one model below with `schema_version: 1` and
`extra="forbid"`. The device publishes `DeviceStatus`, `Telemetry` and
`DeviceEvent`; it receives `Doorbell` and `Command`.

What is trusted: nothing that arrives over MQTT. A doorbell is only a hint to
run a TUF refresh now instead of at the next poll; a command can only ask for
that refresh or for a report, never name a model. So the worst a forged or
replayed message can do is cause one extra refresh. `parse_incoming` bounds
the size before it parses, so a huge payload costs no more than a length check.

Topics, under `edgefleet/<fleet>`:

```
releases                   Doorbell      retained  QoS 1  operator -> all
devices/<id>/status        DeviceStatus  retained  QoS 1  device (will: online=false)
devices/<id>/telemetry     Telemetry               QoS 0  device
devices/<id>/events        DeviceEvent             QoS 1  device (via the outbox)
devices/<id>/commands      Command                 QoS 1  operator -> device
```
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Literal, TypeVar

from pydantic import Field, ValidationError

from agent.wire.base import StrictModel
from agent.wire.errors import PayloadError

# Incoming payloads larger than this are dropped before they are parsed. The
# largest legitimate one (a doorbell naming many channels) is well under 1 KiB.
MAX_INCOMING_PAYLOAD_BYTES = 16 * 1024
# An MQTT 5 client announces this in CONNECT, so the broker drops a larger packet
# instead of sending it: the payload cap plus room for the topic and properties.
MAX_INCOMING_PACKET_BYTES = MAX_INCOMING_PAYLOAD_BYTES + 1024

TOPIC_ROOT = "edgefleet"
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

DeviceTopicKind = Literal["status", "telemetry", "events", "commands"]
RejectReason = Literal["oversized", "not_json", "unknown_schema", "invalid"]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Wire(StrictModel):
    schema_version: Literal[1] = 1


_M = TypeVar("_M", bound=_Wire)


# -- operator -> device ------------------------------------------------------
class Doorbell(_Wire):
    """Retained on `releases`: the TUF repository changed. A hint only."""

    repo_timestamp_version: int = Field(ge=1, description="version of timestamp.json after the publish")
    channels: list[str] = Field(default_factory=list, max_length=256,
                                description="channels whose file changed; empty means unknown")
    published_at: dt.datetime | None = None


class Command(_Wire):
    """On `devices/<id>/commands`: nothing here can change which model runs."""

    command: Literal["check_now", "report"]
    request_id: str | None = Field(default=None, max_length=128)
    issued_at: dt.datetime | None = None


# -- device -> operator ------------------------------------------------------
class DeviceStatus(_Wire):
    """Retained on `devices/<id>/status`. The broker publishes the will copy
    (`online: false`) when the device disappears without a clean disconnect."""

    device_id: str
    online: bool
    state: str = Field(default="UNKNOWN", description="update state machine state (design section 5)")
    channel: str | None = None
    model: str | None = None
    version: int | None = None
    agent_version: str
    tokens_per_s: float | None = Field(default=None, description="last measured decode speed")
    last_error: str | None = None
    timestamp: dt.datetime = Field(default_factory=utc_now)


class Telemetry(_Wire):
    """Periodic metrics on `devices/<id>/telemetry` (QoS 0, not retained, not stored)."""

    device_id: str
    timestamp: dt.datetime = Field(default_factory=utc_now)
    cpu_percent: float = Field(ge=0)
    ram_used_bytes: int = Field(ge=0)
    ram_total_bytes: int = Field(ge=0)
    disk_used_bytes: int = Field(ge=0, description="of the filesystem holding the state dir")
    disk_total_bytes: int = Field(ge=0)
    temperature_c: float | None = Field(default=None, description="hottest sensor; None when the OS shows none")
    model: str | None = None
    version: int | None = None
    tokens_per_s: float | None = None
    ttft_ms: float | None = None
    queue_depth: int = Field(default=0, ge=0)
    requests_total: int = Field(default=0, ge=0)
    errors_total: int = Field(default=0, ge=0)
    outbox_pending: int = Field(default=0, ge=0)
    events_dropped_total: int = Field(default=0, ge=0, description="events the full outbox dropped, ever")
    incoming_dropped_total: int = Field(default=0, ge=0, description="invalid incoming payloads dropped")


class DeviceEvent(_Wire):
    """On `devices/<id>/events`: one state-machine transition or error.

    `seq` grows by one per event of a device, across restarts (the outbox
    persists it). Delivery is at-least-once: a subscriber that keeps the
    highest `seq` per device drops duplicates and sees gaps, which are either
    events the full outbox dropped (counted in `events_dropped_total`) or loss.
    """

    device_id: str
    seq: int = Field(ge=1)
    timestamp: dt.datetime = Field(default_factory=utc_now)
    kind: Literal["transition", "error", "info"]
    from_state: str | None = None
    to_state: str | None = None
    trigger: str | None = Field(default=None, description="the state-machine event that caused it")
    model: str | None = None
    version: int | None = None
    reason: str | None = Field(default=None, max_length=2000)


# -- topics ------------------------------------------------------------------
def check_topic_segment(value: str, what: str) -> str:
    """A fleet or device id must be one topic level without wildcards."""
    if not _SEGMENT_RE.match(value):
        raise ValueError(f"{what} {value!r} must be letters, digits, '.', '_', '-' (no '/', '+', '#')")
    return value


def fleet_prefix(fleet: str) -> str:
    return f"{TOPIC_ROOT}/{check_topic_segment(fleet, 'fleet')}"


def releases_topic(fleet: str) -> str:
    return f"{fleet_prefix(fleet)}/releases"


def device_topic(fleet: str, device_id: str, kind: DeviceTopicKind) -> str:
    return f"{fleet_prefix(fleet)}/devices/{check_topic_segment(device_id, 'device id')}/{kind}"


def all_devices_topic(fleet: str, kind: DeviceTopicKind) -> str:
    """Subscription filter for one kind of topic of every device in a fleet."""
    return f"{fleet_prefix(fleet)}/devices/+/{kind}"


def parse_device_topic(topic: str) -> tuple[str, str, str] | None:
    """`edgefleet/<fleet>/devices/<id>/<kind>` -> (fleet, id, kind), else None."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != TOPIC_ROOT or parts[2] != "devices":
        return None
    return parts[1], parts[3], parts[4]


# -- parsing at the boundary -------------------------------------------------
def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def parse_payload(model: type[_M], payload: bytes | bytearray, *,
                  max_bytes: int = MAX_INCOMING_PAYLOAD_BYTES) -> _M:
    """Validate one payload into `model`, checking the size before anything else.

    Raises:
        PayloadError: with `.reason` one of oversized, not_json, unknown_schema, invalid; nothing
            else, whatever the bytes (deep nesting, huge integers, NaN, invalid UTF-8).
    """
    if len(payload) > max_bytes:
        raise PayloadError("oversized", f"{len(payload)} bytes, limit {max_bytes}")
    try:
        data = json.loads(payload, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError("not_json", str(e)) from e
    except RecursionError as e:  # `[[[[...`: nesting deeper than the parser's stack
        raise PayloadError("not_json", f"nested too deeply to parse ({e})") from e
    except ValueError as e:  # an integer of more digits than Python converts, NaN, Infinity
        raise PayloadError("not_json", str(e)) from e
    if not isinstance(data, dict):
        raise PayloadError("not_json", f"expected a JSON object, got {type(data).__name__}")
    if data.get("schema_version") != 1:
        raise PayloadError("unknown_schema", f"schema_version {data.get('schema_version')!r}, this agent reads 1")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(payload)"
        raise PayloadError("invalid", f"{model.__name__}.{where}: {first['msg']}") from e


DeviceMessage = DeviceStatus | Telemetry | DeviceEvent
DeviceMessageKind = Literal["status", "telemetry", "events"]
_DEVICE_MESSAGES: dict[str, type[DeviceMessage]] = {"status": DeviceStatus, "telemetry": Telemetry,
                                                     "events": DeviceEvent}


def parse_device_message(fleet: str, kinds: tuple[DeviceMessageKind, ...], topic: str,
                         payload: bytes | bytearray) -> DeviceMessage | None:
    """The message a device of `fleet` published on `topic`, if its kind is one of `kinds`.

    None for any other topic, and for an empty payload (clearing a retained
    message is not a message). A device may only speak for itself: a payload
    naming another device than its topic is invalid.

    Raises:
        PayloadError: as `parse_payload`, or "invalid" for a device id that is not the topic's.
    """
    parsed = parse_device_topic(topic)
    if parsed is None or parsed[0] != fleet or parsed[2] not in kinds or not payload:
        return None
    _, device_id, kind = parsed
    message = parse_payload(_DEVICE_MESSAGES[kind], payload)
    if message.device_id != device_id:
        raise PayloadError("invalid", f"{kind} of {message.device_id!r} on the topic of {device_id!r}")
    return message


def encode(message: StrictModel) -> bytes:
    return message.model_dump_json().encode()

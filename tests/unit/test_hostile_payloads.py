"""2,000 generated hostile payloads per ingress: each one is a counted drop with a reason (or a
valid message), never another exception. Real brokers carry the same payloads in
tests/integration/test_mqtt_link.py and test_rollout.py; these check every parser directly."""

from __future__ import annotations

import collections
import json
from typing import Any

import pytest
from pydantic import BaseModel

from agent.wire.errors import PayloadError
from agent.wire.mqtt import Command, DeviceEvent, DeviceStatus, Doorbell, Telemetry, device_topic, parse_payload
from agent.wire.worker import parse_command
from builder.fleet.observer import RolloutObserver
from builder.fleet.view import FleetView
from testkit.hostile import hostile_payloads

N = 2000
FLEET = "f"
VALID: dict[type[BaseModel], dict[str, Any]] = {
    Doorbell: {"schema_version": 1, "repo_timestamp_version": 3, "channels": ["stable"]},
    Command: {"schema_version": 1, "command": "check_now", "request_id": "r1"},
    DeviceStatus: {"schema_version": 1, "device_id": "d1", "online": True, "state": "ACTIVE", "channel": "stable",
                   "model": "m", "version": 2, "agent_version": "0.1.0"},
    Telemetry: {"schema_version": 1, "device_id": "d1", "cpu_percent": 3.0, "ram_used_bytes": 1, "ram_total_bytes": 2,
                "disk_used_bytes": 1, "disk_total_bytes": 2},
    DeviceEvent: {"schema_version": 1, "device_id": "d1", "seq": 7, "kind": "transition", "from_state": "A",
                  "to_state": "B"},
}


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
def test_every_mqtt_payload_is_parsed_or_dropped_with_a_reason(model: type[BaseModel]) -> None:
    reasons: collections.Counter[str] = collections.Counter()
    for payload in hostile_payloads(N, VALID[model], seed=hash(model.__name__) & 0xFFFF):
        try:
            parse_payload(model, payload)
            reasons["parsed"] += 1
        except PayloadError as e:
            reasons[e.reason] += 1
    assert sum(reasons.values()) == N
    assert {"oversized", "not_json", "unknown_schema", "invalid"} <= set(reasons), reasons
    assert reasons["not_json"] > N // 4  # nesting, huge integers, NaN, bad UTF-8, garbage


def test_the_operators_views_count_every_hostile_payload_and_still_see_the_fleet() -> None:
    observer, view = RolloutObserver(FLEET, "m", 2), FleetView(FLEET)
    topics = {kind: device_topic(FLEET, "d1", kind) for kind in ("status", "events", "telemetry")}
    valid = {"status": VALID[DeviceStatus], "events": VALID[DeviceEvent], "telemetry": VALID[Telemetry]}
    for kind, topic in topics.items():
        for payload in hostile_payloads(N, valid[kind], seed=len(kind)):
            observer.apply(topic, payload)
            view.apply(topic, payload)
    assert observer.dropped_payloads > N  # status and events, most of 2 x 2,000
    good = json.dumps({**VALID[DeviceStatus], "device_id": "d2"}).encode()
    assert observer.apply(device_topic(FLEET, "d2", "status"), good)
    assert "d2" in observer.on_channel("stable")
    assert view.apply(device_topic(FLEET, "d2", "status"), good)


def test_every_worker_command_line_is_parsed_or_refused_with_a_value_error() -> None:
    valid = {"schema_version": 1, "type": "generate", "id": "r1", "prompt": "hi",
             "options": {"temperature": 0.0, "max_tokens": 4}}
    refused = 0
    for payload in hostile_payloads(N, valid, seed=7):
        try:
            parse_command(payload)
        except ValueError:
            refused += 1
    assert refused > N // 2  # the rest are near-valid commands that really are valid

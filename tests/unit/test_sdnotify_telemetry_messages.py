"""sd_notify over a real unix datagram socket, telemetry sampling, payload parsing."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.link.telemetry import ServingMetrics, TelemetryCollector
from agent.system import sdnotify
from agent.wire.errors import PayloadError
from agent.wire.mqtt import (
    MAX_INCOMING_PAYLOAD_BYTES,
    Command,
    DeviceEvent,
    DeviceStatus,
    Doorbell,
    Telemetry,
    device_topic,
    parse_device_topic,
    parse_payload,
    releases_topic,
)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
    else:
        name = f"edgefleet-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    sock.settimeout(5)
    yield sock
    sock.close()


def test_sd_notify_messages_reach_the_socket(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("serving smollm2 v3")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving smollm2 v3"
    assert sdnotify.status("DOWNLOADING\nmodel x")
    assert notify_socket.recv(4096) == b"STATUS=DOWNLOADING model x"
    assert sdnotify.watchdog()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_sd_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.watchdog() is False  # logged, not raised


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval_s({}) is None
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None


def test_telemetry_sample_merges_host_and_serving_metrics(tmp_path: Path) -> None:
    serving = ServingMetrics(model="smollm2", version=3, tokens_per_s=42.5, ttft_ms=80, queue_depth=2,
                             requests_total=10, errors_total=1)
    sample = TelemetryCollector("dev-1", tmp_path, lambda: serving).sample()
    assert 0 < sample.ram_used_bytes < sample.ram_total_bytes
    assert 0 < sample.disk_used_bytes < sample.disk_total_bytes
    assert sample.model == "smollm2" and sample.tokens_per_s == 42.5 and sample.queue_depth == 2
    # The round trip through the wire format is exact.
    assert parse_payload(Telemetry, sample.model_dump_json().encode()) == sample


def test_telemetry_survives_a_broken_metrics_source(tmp_path: Path) -> None:
    def broken() -> ServingMetrics:
        raise RuntimeError("server gone")

    sample = TelemetryCollector("dev-1", tmp_path, broken).sample()
    assert sample.model is None and sample.requests_total == 0 and sample.ram_total_bytes > 0


@pytest.mark.parametrize(
    ("model", "payload", "reason"),
    [
        (Doorbell, b"x" * (MAX_INCOMING_PAYLOAD_BYTES + 1), "oversized"),
        (Doorbell, b"{not json", "not_json"),
        (Doorbell, b'"a string"', "not_json"),
        (Doorbell, b'{"repo_timestamp_version": 3}', "unknown_schema"),
        (Doorbell, b'{"schema_version": "1", "repo_timestamp_version": 3}', "unknown_schema"),
        (Doorbell, b'{"schema_version": 1, "repo_timestamp_version": 0}', "invalid"),
        (Doorbell, b'{"schema_version": 1, "repo_timestamp_version": 3, "install": "x"}', "invalid"),
        (Command, b'{"schema_version": 1, "command": "switch_model"}', "invalid"),
    ],
)
def test_parse_payload_rejects_with_a_reason(model: type, payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_payload(model, payload)
    assert info.value.reason == reason


def test_wire_models_round_trip_and_topics() -> None:
    for message in (Doorbell(repo_timestamp_version=4, channels=["stable"]), Command(command="report"),
                    DeviceStatus(device_id="d", online=True, agent_version="0.1.0", state="ACTIVE"),
                    DeviceEvent(device_id="d", seq=7, kind="error", reason="canary mismatch")):
        assert parse_payload(type(message), message.model_dump_json().encode()) == message
    assert releases_topic("f1") == "edgefleet/f1/releases"
    assert device_topic("f1", "dev-1", "status") == "edgefleet/f1/devices/dev-1/status"
    assert parse_device_topic("edgefleet/f1/devices/dev-1/events") == ("f1", "dev-1", "events")
    assert parse_device_topic("edgefleet/f1/releases") is None
    with pytest.raises(ValueError, match="no '/', '\\+', '#'"):
        device_topic("f1", "dev/+", "status")

"""The pure folding of statuses and events into rollout outcomes (builder.fleet.observer)."""

from __future__ import annotations

from agent.wire.mqtt import DeviceEvent, DeviceStatus, device_topic, encode
from builder.fleet.observer import RolloutObserver

FLEET = "f"


def _status(obs: RolloutObserver, device: str, **fields: object) -> bool:
    values: dict[str, object] = {"online": True, "channel": "stable", "agent_version": "1", **fields}
    return obs.apply(device_topic(FLEET, device, "status"), encode(DeviceStatus(device_id=device, **values)))  # type: ignore[arg-type]


def _event(obs: RolloutObserver, device: str, seq: int, to_state: str, **fields: object) -> bool:
    event = DeviceEvent(device_id=device, seq=seq, kind="transition", to_state=to_state, **fields)  # type: ignore[arg-type]
    return obs.apply(device_topic(FLEET, device, "events"), encode(event))


def test_status_alone_tells_channel_online_and_active() -> None:
    obs = RolloutObserver(FLEET, "m", 2)
    _status(obs, "a", state="ACTIVE", model="m", version=2)
    _status(obs, "b", state="UP_TO_DATE", model="m", version=2)
    _status(obs, "c", state="ACTIVE", model="m", version=1)
    _status(obs, "d", state="ACTIVE", model="m", version=2, channel="beta")
    _status(obs, "e", state="ACTIVE", model="m", version=1, online=False)
    # Downloading v2 while still serving v1 is not active yet.
    _status(obs, "g", state="DOWNLOADING", model="m", version=1)
    assert obs.on_channel("stable") == {"a", "b", "c", "g"}
    assert obs.active() == {"a", "b", "d"}
    assert obs.failed() == set()


def test_failures_from_events_and_from_statuses() -> None:
    obs = RolloutObserver(FLEET, "m", 2)
    # Rolled back from the target: the events name it.
    _event(obs, "a", 1, "DOWNLOADING", model="m", version=2)
    _event(obs, "a", 2, "ROLLING_BACK", model="m", version=2, reason="canary mismatch")
    # Refused without a download: the event names no target, its reason does ("m v2").
    _event(obs, "b", 1, "FAILED", reason="m v2 failed activation on this device earlier and is refused")
    # A hardware shortfall for the target.
    _event(obs, "c", 1, "INCOMPATIBLE", reason="model m v2 needs 6.1 GiB RAM, this device has 3.8 GiB: ...")
    # Failure of another version, and a mention of v21, are not failures of v2.
    _event(obs, "d", 1, "FAILED", reason="m v21 failed activation")
    _status(obs, "e", state="FAILED", model="m", version=1, last_error="m v1 failed: disk full")
    # A status that names the target in its error (a controller that missed the events).
    _status(obs, "f", state="FAILED", model="m", version=1, last_error="ACTIVATING m v2 failed: load error")
    assert obs.failed() == {"a", "b", "c", "f"}
    assert obs.failure_reasons({"a", "f"}) == {"a": "canary mismatch", "f": "ACTIVATING m v2 failed: load error"}


def test_latest_message_wins_and_duplicates_are_dropped() -> None:
    obs = RolloutObserver(FLEET, "m", 2)
    assert _event(obs, "a", 5, "ACTIVE", model="m", version=2)
    assert obs.active() == {"a"}
    # A resent older event (at-least-once delivery) changes nothing.
    assert not _event(obs, "a", 3, "FAILED", model="m", version=2, reason="old")
    assert obs.active() == {"a"}
    # Probation failed after ACTIVE: the device now counts as failed.
    assert _event(obs, "a", 6, "ROLLING_BACK", model="m", version=2, reason="probation: crashed")
    assert obs.failed() == {"a"} and obs.active() == set()


def test_attempt_then_failed_status_without_names() -> None:
    obs = RolloutObserver(FLEET, "m", 2)
    _event(obs, "a", 1, "ACTIVATING", model="m", version=2)
    _status(obs, "a", state="FAILED", model="m", version=1, last_error="load error")
    assert obs.failed() == {"a"}
    # The rollback's downgrade to v1 starts: no longer attempting v2, and its ACTIVE on v1 is not v2's.
    obs2 = RolloutObserver(FLEET, "m", 2)
    _event(obs2, "b", 1, "ACTIVATING", model="m", version=2)
    _event(obs2, "b", 2, "DOWNLOADING", model="m", version=1)
    _event(obs2, "b", 3, "ACTIVE", model="m", version=1)
    _status(obs2, "b", state="FAILED", model="m", version=1, last_error="unrelated")
    assert obs2.failed() == set() and obs2.active() == set()


def test_bad_payloads_are_counted_not_raised() -> None:
    obs = RolloutObserver(FLEET, "m", 2)
    assert not obs.apply(device_topic(FLEET, "a", "status"), b"{nope")
    assert not obs.apply(device_topic(FLEET, "a", "status"),
                         encode(DeviceStatus(device_id="other", online=True, agent_version="1")))
    assert not obs.apply(device_topic(FLEET, "a", "events"), b'{"schema_version": 2}')
    assert obs.dropped_payloads == 3
    # Another fleet and unrelated topics are ignored without counting.
    assert not obs.apply(device_topic("g", "a", "status"), b"{nope")
    assert not obs.apply("edgefleet/f/releases", b"{}")
    assert obs.dropped_payloads == 3 and obs.devices == {}

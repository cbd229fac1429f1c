"""What the rollout controller knows about each device, folded from MQTT
messages. Pure: it takes (topic, payload) pairs and answers set questions;
the socket lives in builder.fleet.rollout.

Sources, in the order a subscriber receives them:
- the retained `devices/<id>/status`: which channel a device follows, whether
  it is online, its update state and the model version `current` serves
  (a restarted controller learns everything it needs from these alone);
- `devices/<id>/events`: each state-machine transition, with the update's
  target. Events say *why* a device failed, which a status may only hint at.

For the version under rollout (`target`) each device ends up `active`
(ACTIVE or UP_TO_DATE serving it), `failed` (it rolled back from it, refused
it as a version that failed before, or found it incompatible), or neither yet.
The latest message wins, so a device that went ACTIVE and then failed its
probation counts as failed.

Nothing here is trusted for safety: MQTT is a hint channel. A forged message
can at worst make the controller roll back early or wait longer; it can never
make a device install anything (TUF decides that).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.wire.errors import PayloadError
from agent.wire.mqtt import DeviceEvent, DeviceStatus, parse_device_message

_IN_PROGRESS = frozenset({"CHECKING", "DOWNLOADING", "VERIFYING", "INSTALLING", "ACTIVATING"})
_SERVING_STATES = frozenset({"ACTIVE", "UP_TO_DATE"})


@dataclass
class DeviceFacts:
    device_id: str
    channel: str | None = None
    online: bool = False
    state: str = "UNKNOWN"
    outcome: str | None = None  # "active" | "failed" for the target, None while undecided
    reason: str | None = None
    is_attempting: bool = False  # an in-progress transition named the target
    last_seq: int = 0


class RolloutObserver:
    """Folds status and event messages of one fleet into per-device facts about `model` v`version`."""

    def __init__(self, fleet: str, model: str, version: int) -> None:
        self.fleet = fleet
        self.model = model
        self.version = version
        # "smollm2 v3" as ModelRef prints it and hardware shortfalls say it; not "smollm2 v31".
        self._mention = re.compile(rf"\b{re.escape(model)} v{version}\b")
        self.devices: dict[str, DeviceFacts] = {}
        self.dropped_payloads = 0

    def _facts(self, device_id: str) -> DeviceFacts:
        facts = self.devices.get(device_id)
        if facts is None:
            facts = self.devices[device_id] = DeviceFacts(device_id)
        return facts

    def _is_target(self, model: str | None, version: int | None) -> bool:
        return model == self.model and version == self.version

    def _mentions_target(self, text: str | None) -> bool:
        return bool(text) and self._mention.search(text or "") is not None

    def apply(self, topic: str, payload: bytes | bytearray) -> bool:
        """Take one message; True if a device's facts changed. Bad payloads are counted, not raised."""
        try:
            message = parse_device_message(self.fleet, ("status", "events"), topic, payload)
        except PayloadError:
            self.dropped_payloads += 1
            return False
        if isinstance(message, DeviceStatus):
            return self._apply_status(message)
        if isinstance(message, DeviceEvent):
            return self._apply_event(message)
        return False

    def _set(self, facts: DeviceFacts, outcome: str | None, reason: str | None) -> bool:
        if outcome is None or (facts.outcome, facts.reason) == (outcome, reason):
            return False
        facts.outcome, facts.reason = outcome, reason
        return True

    def _apply_status(self, status: DeviceStatus) -> bool:
        facts = self._facts(status.device_id)
        before = (facts.channel, facts.online, facts.state)
        facts.channel, facts.online, facts.state = status.channel, status.online, status.state
        outcome: str | None = None
        if status.state in _SERVING_STATES and self._is_target(status.model, status.version):
            outcome = "active"
        elif status.state in ("FAILED", "INCOMPATIBLE", "ROLLING_BACK") and (
                facts.is_attempting or self._mentions_target(status.last_error)):
            outcome = "failed"
        changed = self._set(facts, outcome, status.last_error if outcome == "failed" else None)
        return changed or before != (facts.channel, facts.online, facts.state)

    def _apply_event(self, event: DeviceEvent) -> bool:
        facts = self._facts(event.device_id)
        if event.seq <= facts.last_seq:
            return False  # at-least-once delivery: a duplicate (or an older event resent)
        facts.last_seq = event.seq
        if event.kind != "transition" or event.to_state is None:
            return False
        names_target = self._is_target(event.model, event.version)
        to_state = event.to_state
        if to_state in _IN_PROGRESS:
            if names_target:
                facts.is_attempting = True
            elif event.model is not None and to_state != "CHECKING":
                facts.is_attempting = False  # working on another version now (a rollback's downgrade)
            return False
        if to_state in _SERVING_STATES and names_target:
            return self._set(facts, "active", None)
        if to_state in ("FAILED", "ROLLING_BACK", "INCOMPATIBLE") and (
                names_target or facts.is_attempting or self._mentions_target(event.reason)):
            facts.is_attempting = False
            return self._set(facts, "failed", event.reason or to_state)
        return False

    # -- questions -------------------------------------------------------------------
    def on_channel(self, channel: str) -> set[str]:
        """Devices whose last status says they follow `channel` and that are online."""
        return {d for d, f in self.devices.items() if f.channel == channel and f.online}

    def active(self) -> set[str]:
        return {d for d, f in self.devices.items() if f.outcome == "active"}

    def failed(self) -> set[str]:
        return {d for d, f in self.devices.items() if f.outcome == "failed"}

    def failure_reasons(self, devices: set[str]) -> dict[str, str]:
        return {d: self.devices[d].reason or "failed" for d in sorted(devices) if d in self.devices}

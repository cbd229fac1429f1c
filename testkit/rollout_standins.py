"""Stand-in devices for the rollout controller's own tests (STAND-INS, not agents).

They exist so the controller's wave loop can be tested against the real
broker and the real signed repository without starting dozens of agent
processes: each stand-in reads the channel file through the real TUF client
(`agent.update.trust.TrustedRepository` against the real `serve` server), applies the
device rule (cohort, then the downgrade rule, then the refused set), and
publishes what a real agent publishes: a retained `DeviceStatus` and one
`DeviceEvent` per state-machine transition. They do not download or load
models; the fleet tests in tests/test_rollout_fleet.py use real agents.

A stand-in checks on every doorbell and on a short poll. `broken` versions
fail activation (the device rolls back, then refuses the version); `silent`
devices are online but never act (a wave with them times out); `paused`
devices act only once the test removes them from the set.
"""

from __future__ import annotations

import queue
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.update.trust import TrustedRepository
from agent.wire.channel import ChannelFile, is_in_cohort
from agent.wire.errors import EdgefleetError
from agent.wire.mqtt import DeviceEvent, DeviceStatus, device_topic, encode, releases_topic

POLL_S = 0.3
_STEPS = ("CHECKING", "DOWNLOADING", "VERIFYING", "INSTALLING", "ACTIVATING")


@dataclass
class StandIn:
    device_id: str
    channel: str
    model: str
    version: int
    seq: int = 0
    state: str = "ACTIVE"
    refused: set[int] = field(default_factory=set)
    attempted: list[int] = field(default_factory=list)  # versions it started to install, in order
    last_error: str | None = None


class StandInFleet:
    def __init__(self, port: int, fleet: str, repo_url: str, root_json: Path, workdir: Path,
                 devices: list[StandIn], *, broken: set[int] | None = None,
                 silent: set[str] | None = None, paused: set[str] | None = None) -> None:
        self.fleet = fleet
        self.devices = {d.device_id: d for d in devices}
        self.broken = broken or set()
        self.silent = silent or set()
        self.paused = paused if paused is not None else set()
        self.lock = threading.Lock()
        self.repo_url = repo_url
        self._trust_dirs: dict[str, Path] = {}
        for channel in {d.channel for d in devices}:
            trust_dir = workdir / f"trust-{channel}"
            trust_dir.mkdir(parents=True, exist_ok=True)
            (trust_dir / "root.json").write_bytes(root_json.read_bytes())
            self._trust_dirs[channel] = trust_dir
        self._wake: queue.Queue[None] = queue.Queue()
        self._stop = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"standins-{uuid.uuid4().hex[:8]}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(releases_topic(fleet), qos=1)
        self.client.on_message = lambda c, u, m: self._wake.put(None)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        for d in devices:
            self._status(d)
        self._thread = threading.Thread(target=self._run, name="standins", daemon=True)
        self._thread.start()

    # -- publishing ------------------------------------------------------------------
    def _status(self, d: StandIn) -> None:
        status = DeviceStatus(device_id=d.device_id, online=True, state=d.state, channel=d.channel, model=d.model,
                              version=d.version, agent_version="standin", last_error=d.last_error)
        self.client.publish(device_topic(self.fleet, d.device_id, "status"), encode(status), qos=1,
                            retain=True).wait_for_publish(5)

    def _event(self, d: StandIn, from_state: str, to_state: str, version: int | None,
               reason: str | None = None) -> None:
        d.seq += 1
        d.state = to_state
        event = DeviceEvent(device_id=d.device_id, seq=d.seq, kind="transition", from_state=from_state,
                            to_state=to_state, model=d.model if version is not None else None, version=version,
                            reason=reason)
        self.client.publish(device_topic(self.fleet, d.device_id, "events"), encode(event), qos=1)

    # -- the device rule ------------------------------------------------------------------
    def _act(self, d: StandIn, channel: ChannelFile) -> None:
        if (channel.model, channel.version) == (d.model, d.version) or not is_in_cohort(channel.rollout, d.device_id):
            return
        if channel.version < d.version and not channel.allow_downgrade:
            return
        if channel.version in d.refused:
            return
        d.attempted.append(channel.version)
        prev = d.state
        for step in _STEPS:
            self._event(d, prev, step, channel.version)
            prev = step
        if channel.version in self.broken:
            reason = f"ACTIVATING {channel.model} v{channel.version} failed: canary mismatch"
            self._event(d, prev, "ROLLING_BACK", channel.version, reason)
            self._event(d, "ROLLING_BACK", "FAILED", channel.version, reason)
            d.refused.add(channel.version)
            d.last_error = reason
        else:
            d.version = channel.version
            d.last_error = None
            self._event(d, prev, "ACTIVE", channel.version)
        self._status(d)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._wake.get(timeout=POLL_S)
            except queue.Empty:
                pass
            for name, trust_dir in self._trust_dirs.items():
                try:
                    trust = TrustedRepository(self.repo_url, trust_dir, timeout_s=5)  # one session per refresh
                    trust.refresh()
                    channel = trust.read_channel(name)
                except EdgefleetError:
                    continue  # no channel file yet
                with self.lock:
                    for d in self.devices.values():
                        if d.channel == name and d.device_id not in self.silent and d.device_id not in self.paused:
                            self._act(d, channel)

    def versions(self) -> dict[str, int]:
        with self.lock:
            return {d.device_id: d.version for d in self.devices.values()}

    def attempted(self) -> dict[str, list[int]]:
        with self.lock:
            return {d.device_id: list(d.attempted) for d in self.devices.values()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.disconnect()
        self.client.loop_stop()

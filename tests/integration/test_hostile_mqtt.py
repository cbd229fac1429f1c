"""Hostile payloads through a real Mosquitto: 2,000 per ingress topic, to a device's link and to
an operator's rollout watch. Neither network thread dies, every payload is counted, and a
valid message sent afterwards still arrives. A watch that loses the broker says it is blind.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig
from agent.link.backoff import Backoff
from agent.link.mqtt import MqttLink
from agent.link.outbox import Outbox
from agent.wire.broker import BrokerCredentials
from agent.wire.mqtt import MAX_INCOMING_PACKET_BYTES, DeviceStatus, Doorbell, device_topic, encode, releases_topic
from builder.fleet.rollout import Broker, FleetWatch
from testkit.brokers import Mosquitto, Recorder
from testkit.hostile import hostile_payloads
from testkit.link import FLEET, make_link
from testkit.waits import wait_until

N = 2000


def _flood(port: int, topic: str, payloads: list[bytes], *, retain: bool = False) -> None:
    """Publish every payload at QoS 1 from one client and wait until the broker acknowledged all."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1, retain=retain) for payload in payloads]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_device_link_survives_2000_hostile_payloads_per_topic(mosquitto: Mosquitto, tmp_path: Path) -> None:
    link = make_link(mosquitto, tmp_path)
    link.start()
    try:
        assert link.wait_connected(10)
        wait_until(lambda: link.counters().subscribed == 1, 10, "the subscriptions granted")
        doorbell = {"schema_version": 1, "repo_timestamp_version": 3, "channels": ["stable"]}
        command = {"schema_version": 1, "command": "check_now"}

        def handled() -> int:
            c = link.counters()
            return c.dropped_total + c.incoming_accepted + c.inbox_full

        sent = 0
        for topic, valid in ((releases_topic(FLEET), doorbell), (device_topic(FLEET, "dev-1", "commands"), command)):
            payloads = [p for p in hostile_payloads(N, valid, seed=len(topic)) if p]
            # In batches below Mosquitto's per-client queue (1,000): the broker would drop the rest.
            for start in range(0, len(payloads), 500):
                batch = payloads[start:start + 500]
                _flood(mosquitto.port, topic, batch)
                sent += len(batch)
                wait_until(lambda: handled() >= sent, 60, f"{sent} hostile payloads handled")
        counters = link.counters()
        assert counters.callback_errors == 0 and counters.disconnects == 0 and link.is_connected
        assert {"oversized", "not_json", "unknown_schema", "invalid"} <= set(counters.dropped), counters.dropped
        # Still serving: a valid doorbell after the flood arrives.
        while not link.incoming.empty():
            link.incoming.get_nowait()
        accepted = counters.incoming_accepted
        _flood(mosquitto.port, releases_topic(FLEET), [encode(Doorbell(repo_timestamp_version=99))])
        wait_until(lambda: link.counters().incoming_accepted == accepted + 1, 10, "the valid doorbell")
        assert link.incoming.get_nowait() == Doorbell(repo_timestamp_version=99)
    finally:
        link.stop()


def test_a_rollout_watch_survives_2000_hostile_payloads_per_topic_and_goes_blind_without_a_broker(
        mosquitto: Mosquitto) -> None:
    status = {"schema_version": 1, "device_id": "evil", "online": True, "state": "ACTIVE", "channel": "stable",
              "model": "m", "version": 2, "agent_version": "0.1.0"}
    event = {"schema_version": 1, "device_id": "evil", "seq": 1, "kind": "transition", "to_state": "ACTIVE"}
    # A retained poison status is there before the watch subscribes, as after a controller restart.
    _flood(mosquitto.port, device_topic(FLEET, "evil", "status"), [b"[" * 16000], retain=True)
    watch = FleetWatch(Broker(mosquitto.url, BrokerCredentials(), FLEET), "m", 2)
    try:
        sent = watch.messages  # the retained poison, already taken
        for kind, valid in (("status", status), ("events", event)):  # what a rollout watch subscribes to
            payloads = [p for p in hostile_payloads(N, valid) if p]
            for start in range(0, len(payloads), 500):  # below Mosquitto's per-client queue of 1,000
                _flood(mosquitto.port, device_topic(FLEET, "evil", kind), payloads[start:start + 500])
                sent += len(payloads[start:start + 500])
                wait_until(lambda: watch.messages >= sent, 60, f"{sent} messages at the watch")
        good = DeviceStatus(device_id="good", online=True, state="ACTIVE", channel="stable", model="m", version=2,
                            agent_version="0.1.0")
        _flood(mosquitto.port, device_topic(FLEET, "good", "status"), [encode(good)])
        wait_until(lambda: "good" in watch.observer.on_channel("stable"), 30, "the valid status after the flood")
        assert watch.callback_errors == 0 and watch.blind_reason() is None
        assert watch.observer.dropped_payloads > N  # most of the 2 x 2,000 (the near-valid ones apply)
        # Without its broker the watch is blind, and says so (its wave then fails: test_rollout_policy).
        mosquitto.kill()
        wait_until(lambda: watch.blind_reason(0.5) is not None, 30, "the watch to notice")
        assert "disconnected from" in (watch.blind_reason(0.5) or "")
    finally:
        watch.close()


def test_an_mqtt5_link_has_the_broker_drop_packets_over_its_cap(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """MQTT 5's Maximum Packet Size: a 1 MiB payload never reaches the device (paho would read it
    whole into memory before our size check); a valid doorbell after it arrives."""
    link = make_link(mosquitto, tmp_path, protocol="5")
    link.start()
    try:
        assert link.wait_connected(10)
        wait_until(lambda: link.counters().subscribed == 1, 10, "the subscriptions granted")
        _flood(mosquitto.port, releases_topic(FLEET), [b"[" * (1 << 20), b"x" * MAX_INCOMING_PACKET_BYTES])
        _flood(mosquitto.port, releases_topic(FLEET), [encode(Doorbell(repo_timestamp_version=7))])
        assert link.incoming.get(timeout=10) == Doorbell(repo_timestamp_version=7)
        counters = link.counters()
        assert counters.dropped == {} and counters.callback_errors == 0, counters
    finally:
        link.stop()


class LinkWithOneBug(MqttLink):
    """TEST DOUBLE (named as such): the real link whose network loop raises once, standing for a
    bug no input reaches (paho returned error codes for 800 malformed broker packets tried; the
    outbox's unreadable files no longer raise): the loop must be started again and say so."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed = True

    def _send_pending_work(self) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("an unforeseen bug")
        super()._send_pending_work()


def test_a_network_loop_that_fails_anyway_is_restarted_and_reported(mosquitto: Mosquitto, tmp_path: Path) -> None:
    config = AgentConfig(device_id="dev-1", fleet=FLEET, repo_url="http://127.0.0.1:9", state_dir=tmp_path / "dev-1",
                         broker_url=mosquitto.url)
    link = LinkWithOneBug(config, Outbox(config.state_dir / "outbox"), keepalive_s=5,
                          backoff=Backoff(initial_s=0.05, max_s=0.5))
    recorder = Recorder(mosquitto.port, [device_topic(FLEET, "dev-1", "events")])
    link.start()
    try:
        wait_until(lambda: link.counters().thread_restarts == 1 and link.is_connected, 10, "the loop restarted")
        recorder.wait_for(lambda ms: any(b"mqtt_link_restarted" in m.payload for m in ms), 10, "the report")
        (report,) = recorder.payloads("/events")
        assert report["kind"] == "error" and "RuntimeError: an unforeseen bug" in report["reason"]
        assert link.counters().connects == 2
        _flood(mosquitto.port, releases_topic(FLEET), [encode(Doorbell(repo_timestamp_version=8))])
        assert link.incoming.get(timeout=10) == Doorbell(repo_timestamp_version=8)
    finally:
        link.stop()
        recorder.close()


def test_a_rollout_watch_whose_network_loop_fails_is_restarted_and_sees_again(mosquitto: Mosquitto) -> None:
    """paho re-raises what a callback raises and its thread used to end there, leaving the watch
    deaf without ever saying it was disconnected. Here its connect callback raises once (a TEST
    DOUBLE for a bug: the real callback wrapped) on the reconnect after a broker restart."""
    watch = FleetWatch(Broker(mosquitto.url, BrokerCredentials(), FLEET), "m", 2)
    try:
        client = watch._session.client
        real_on_connect = client.on_connect
        armed = [True]

        def on_connect_with_a_bug(*args: Any) -> None:
            if armed[0]:
                armed[0] = False
                raise RuntimeError("an unforeseen bug in on_connect")
            real_on_connect(*args)
        client.on_connect = on_connect_with_a_bug
        mosquitto.restart()
        wait_until(lambda: watch._session.thread_restarts == 1, 30, "the network loop restarted")
        late = DeviceStatus(device_id="late", online=True, state="ACTIVE", channel="stable", model="m", version=2,
                            agent_version="0.1.0")
        wait_until(lambda: _flood(mosquitto.port, device_topic(FLEET, "late", "status"), [encode(late)]) is None
                   and "late" in watch.observer.on_channel("stable"), 30, "a status after the restart")
        assert watch.blind_reason(60) is None
    finally:
        watch.close()

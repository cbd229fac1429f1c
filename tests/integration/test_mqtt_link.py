"""The MQTT link against a real Mosquitto: will on SIGKILL, the outbox across
broker outages and agent restarts, hostile payloads, resubscription."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from agent.link.backoff import Backoff
from agent.wire.broker import parse_broker_url
from agent.wire.errors import ConfigError
from agent.wire.mqtt import MAX_INCOMING_PAYLOAD_BYTES, Command, Doorbell, device_topic, releases_topic
from testkit.brokers import Mosquitto, Recorder, publish_and_wait
from testkit.link import FLEET, LinkProcess, make_link
from testkit.waits import wait_until


def test_broker_url_parsing() -> None:
    assert parse_broker_url("mqtt://h") == parse_broker_url("mqtt://h:1883")
    assert parse_broker_url("mqtts://b.example:8884").port == 8884
    assert parse_broker_url("mqtts://b.example").port == 8883
    assert parse_broker_url("mqtts://b.example").is_tls
    for bad, why in (("http://h", "scheme must be mqtt:// or mqtts://"), ("mqtt://", "has no host"),
                     ("mqtt://h:99999", "Port out of range")):
        with pytest.raises(ConfigError, match=f"broker_url '{bad}'.*{why}"):
            parse_broker_url(bad)


def test_backoff_doubles_to_cap_with_jitter_and_resets() -> None:
    import random

    b = Backoff(initial_s=1, max_s=8, rng=random.Random(7))
    delays = [b.next_delay_s() for _ in range(6)]
    bases = [1, 2, 4, 8, 8, 8]
    for d, base in zip(delays, bases, strict=True):
        assert base * 0.5 <= d <= base
    assert len({round(d / base, 6) for d, base in zip(delays, bases, strict=True)}) > 1, "no jitter"
    b.reset()
    assert b.next_delay_s() <= 1


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_will_on_sigkill_and_online_again_after_restart(mosquitto: Mosquitto, tmp_path: Path,
                                                        link_processes: list[LinkProcess], protocol: str) -> None:
    topic = device_topic(FLEET, "dev-k", "status")
    rec = Recorder(mosquitto.port, [topic])
    try:
        first = LinkProcess(mosquitto.url, "dev-k", tmp_path / "dev-k", state="ACTIVE", model="smollm2", version=3,
                            protocol=protocol)
        link_processes.append(first)
        rec.wait_for(lambda ms: any(json.loads(m.payload)["online"] for m in ms), 10, "online status")

        first.sigkill()
        rec.wait_for(lambda ms: not json.loads(ms[-1].payload)["online"], 10, "the will (online=false)")
        will = json.loads(rec.messages[-1].payload)
        assert will["state"] == "ACTIVE" and will["model"] == "smollm2" and will["version"] == 3
        assert will["device_id"] == "dev-k" and will["schema_version"] == 1
    finally:
        rec.close()

    # The will is retained: a new subscriber sees the device offline.
    late = Recorder(mosquitto.port, [topic])
    try:
        late.wait_for(lambda ms: len(ms) >= 1, 5, "retained status")
        assert late.messages[0].retain and json.loads(late.messages[0].payload)["online"] is False

        second = LinkProcess(mosquitto.url, "dev-k", tmp_path / "dev-k", state="ACTIVE", model="smollm2", version=4,
                             protocol=protocol)
        link_processes.append(second)
        late.wait_for(lambda ms: json.loads(ms[-1].payload)["online"], 10, "online again")
        assert json.loads(late.messages[-1].payload)["version"] == 4
        # A clean stop publishes offline itself (no will on a clean DISCONNECT).
        assert second.ask("quit") == {"stopped": True}
        late.wait_for(lambda ms: not json.loads(ms[-1].payload)["online"], 10, "offline on clean stop")
    finally:
        late.close()


def test_outbox_delivers_in_order_exactly_once_across_broker_outage_and_agent_restart(
        persistent_mosquitto: Mosquitto, tmp_path: Path, link_processes: list[LinkProcess]) -> None:
    broker = persistent_mosquitto
    topic = device_topic(FLEET, "dev-o", "events")
    # A persistent subscriber session: the broker keeps its subscription and
    # queues QoS 1 events for it while it is away and across the broker's restart.
    rec = Recorder(broker.port, [topic], client_id="observer")
    state_dir = tmp_path / "dev-o"
    agent = LinkProcess(broker.url, "dev-o", state_dir)
    link_processes.append(agent)
    try:
        assert agent.ask("event 3")["seqs"] == [1, 2, 3]
        rec.wait_for(lambda ms: len(ms) == 3, 10, "3 events while connected")
        wait_until(lambda: agent.ask("counters")["events_acked"] == 3, 10, "3 PUBACKs")
    finally:
        # A clean DISCONNECT after its PUBACKs: nothing is in flight to the
        # observer, so any duplicate below would be the agent's fault.
        rec.close()
    assert [e["seq"] for e in rec.payloads()] == [1, 2, 3]

    broker.stop()
    assert agent.ask("event 4")["seqs"] == [4, 5, 6, 7]   # broker down: stored only
    agent.sigkill()                                        # and the agent dies with them unsent
    assert len(list((state_dir / "outbox" / "events").iterdir())) == 4

    agent2 = LinkProcess(broker.url, "dev-o", state_dir)
    link_processes.append(agent2)
    assert agent2.hello["next_seq"] == 8
    assert agent2.ask("event 3")["seqs"] == [8, 9, 10]
    broker.start()

    rec2 = Recorder(broker.port, [topic], client_id="observer")
    try:
        rec2.wait_for(lambda ms: len(ms) >= 7, 20, "events 4..10 after the broker returned")
        wait_until(lambda: not list((state_dir / "outbox" / "events").iterdir()), 10, "outbox drained")
        agent2.ask("event 1")  # one more, so anything late or duplicated would arrive before it
        rec2.wait_for(lambda ms: len(ms) >= 8, 10, "event 11")
        seqs = [e["seq"] for e in rec2.payloads("/events")]
        assert seqs == list(range(4, 12)), f"order or exactly-once broken: {seqs}"
        # 4..11 went out through the second process and were all acknowledged.
        wait_until(lambda: agent2.ask("counters")["events_acked"] == 8, 10, "8 PUBACKs")
    finally:
        rec2.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_hostile_payloads_dropped_counted_link_healthy(mosquitto: Mosquitto, tmp_path: Path, protocol: str) -> None:
    link = make_link(mosquitto, tmp_path, protocol=protocol)
    link.start()
    try:
        assert link.wait_connected(10)
        # Subscribed (SUBACK), not only connected: a payload published before would find no subscriber.
        wait_until(lambda: link.counters().subscribed == 1, 5, "the subscriptions granted")
        valid_doorbell = Doorbell(repo_timestamp_version=5, channels=["stable"]).model_dump_json().encode()
        valid_command = Command(command="check_now").model_dump_json().encode()
        hostile = {
            # Over the payload cap, under MQTT 5's packet cap: the link's own check drops it.
            "oversized": b'{"schema_version": 1, "pad": "' + b"x" * MAX_INCOMING_PAYLOAD_BYTES + b'"}',
            "not_json": b"\xff\xfe not json",
            "unknown_schema": b'{"schema_version": 2, "repo_timestamp_version": 1}',
            "invalid": b'{"schema_version": 1, "command": "install", "model": "evil"}',
        }
        topics = [releases_topic(FLEET), device_topic(FLEET, "dev-1", "commands")]
        for topic in topics:
            for payload in hostile.values():
                publish_and_wait(mosquitto.port, topic, payload)
        publish_and_wait(mosquitto.port, topics[0], valid_doorbell)
        publish_and_wait(mosquitto.port, topics[1], valid_command)

        wait_until(lambda: link.counters().incoming_accepted == 2, 10, "the two valid messages")
        counters = link.counters()
        assert counters.dropped == {reason: 2 for reason in hostile}, counters.dropped
        assert counters.disconnects == 0 and link.is_connected
        items = [link.incoming.get_nowait(), link.incoming.get_nowait()]
        assert items == [Doorbell(repo_timestamp_version=5, channels=["stable"]), Command(command="check_now")]

        # Still healthy: an event goes out and is acknowledged.
        rec = Recorder(mosquitto.port, [device_topic(FLEET, "dev-1", "events")])
        try:
            link.publish_event("info", reason="after hostile input")
            rec.wait_for(lambda ms: len(ms) == 1, 10, "event after hostile input")
        finally:
            rec.close()
    finally:
        link.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_reconnect_to_a_kept_session_does_not_receive_the_retained_doorbell_again(
        mosquitto: Mosquitto, tmp_path: Path, protocol: str) -> None:
    """After a switch the link reconnects to refresh its will; the broker kept its session and
    subscriptions. Subscribing again made the broker send the retained doorbell once more to every
    device after every update (bench/fleet.py counted 2 deliveries per device per doorbell)."""
    link = make_link(mosquitto, tmp_path, protocol=protocol)
    link.start()
    try:
        wait_until(lambda: link.counters().subscribed == 1, 10, "the subscriptions granted")
        doorbell = Doorbell(repo_timestamp_version=9, channels=["stable"])
        publish_and_wait(mosquitto.port, releases_topic(FLEET), doorbell.model_dump_json().encode(), retain=True)
        assert link.incoming.get(timeout=10) == doorbell
        link.publish_status(state="ACTIVE", model="tiny", version=2)  # the will names v2 now: a reconnect
        wait_until(lambda: link.counters().connects == 2 and link.is_connected, 10, "the will-refresh reconnect")
        publish_and_wait(mosquitto.port, device_topic(FLEET, "dev-1", "commands"),
                         Command(command="check_now").model_dump_json().encode())
        assert link.incoming.get(timeout=10) == Command(command="check_now")  # still subscribed
        assert link.incoming.empty() and link.counters().subscribed == 1
    finally:
        link.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_reconnect_after_broker_restart_restores_subscriptions(mosquitto: Mosquitto, tmp_path: Path,
                                                               protocol: str) -> None:
    link = make_link(mosquitto, tmp_path, protocol=protocol)
    link.start()
    try:
        wait_until(lambda: link.counters().connects == 1, 10, "first connect")
        # No persistence: the restarted broker has forgotten every session and
        # subscription, so only on_connect's resubscribe can bring the doorbell.
        mosquitto.kill()
        wait_until(lambda: not link.is_connected, 10, "link notices the broker is gone")
        mosquitto.start()
        wait_until(lambda: link.counters().connects == 2, 15, "reconnect")
        status = Recorder(mosquitto.port, [device_topic(FLEET, "dev-1", "status")])
        try:
            status.wait_for(lambda ms: len(ms) >= 1 and json.loads(ms[-1].payload)["online"], 10,
                            "retained online status republished after reconnect")
        finally:
            status.close()
        # Retained, so it reaches the link whether its SUBSCRIBE lands before or
        # after this publish; without the resubscribe it never arrives.
        publish_and_wait(mosquitto.port, releases_topic(FLEET),
                         Doorbell(repo_timestamp_version=9).model_dump_json().encode(), retain=True)
        item = link.incoming.get(timeout=10)
        assert item == Doorbell(repo_timestamp_version=9)
        assert link.counters().disconnects == 1
    finally:
        link.stop()


def test_events_before_first_connect_wait_in_outbox(persistent_mosquitto: Mosquitto, tmp_path: Path) -> None:
    """Events published before the first connect wait in the outbox, then go out in order."""
    broker = persistent_mosquitto
    rec = Recorder(broker.port, [device_topic(FLEET, "dev-2", "events")], client_id="observer-2")
    broker.stop()
    link = make_link(broker, tmp_path, device="dev-2")
    link.start()
    try:
        seqs = [link.publish_event("transition", from_state="IDLE", to_state="CHECKING").seq for _ in range(5)]
        assert seqs == [1, 2, 3, 4, 5] and link.outbox.pending_count == 5
        wait_until(lambda: link.counters().connect_failures >= 2, 10, "failed connect attempts")
        broker.start()
        assert link.wait_outbox_empty(15)
        rec.wait_for(lambda ms: len(ms) == 5, 10, "5 events")
        assert [e["seq"] for e in rec.payloads()] == seqs
        assert link.counters().events_acked == 5
    finally:
        link.stop()
        rec.close()


def test_telemetry_carries_link_counters_and_refreshes_status(mosquitto: Mosquitto, tmp_path: Path) -> None:
    from agent.wire.mqtt import Telemetry

    sample = Telemetry(device_id="dev-t", cpu_percent=5, ram_used_bytes=1, ram_total_bytes=2, disk_used_bytes=1,
                       disk_total_bytes=2, tokens_per_s=33.0)
    link = make_link(mosquitto, tmp_path, device="dev-t", status_refresh_s=0)
    assert link.publish_telemetry(sample) is False  # not started: skipped, not stored
    assert link.counters().telemetry_skipped == 1
    rec = Recorder(mosquitto.port, [device_topic(FLEET, "dev-t", "telemetry"), device_topic(FLEET, "dev-t", "status")])
    link.start()
    try:
        assert link.wait_connected(10)
        rec.wait_for(lambda ms: any(m.topic.endswith("/status") for m in ms), 10, "first status")
        publish_and_wait(mosquitto.port, releases_topic(FLEET), b"garbage")
        wait_until(lambda: link.counters().dropped_total == 1, 10, "garbage dropped")
        assert link.publish_telemetry(sample)
        rec.wait_for(lambda ms: any(m.topic.endswith("/telemetry") for m in ms), 10, "telemetry")
        telemetry = rec.payloads("/telemetry")[-1]
        assert telemetry["incoming_dropped_total"] == 1 and telemetry["tokens_per_s"] == 33.0
        assert telemetry["outbox_pending"] == 0 and telemetry["events_dropped_total"] == 0
        rec.wait_for(lambda ms: any(json.loads(m.payload).get("tokens_per_s") == 33.0
                                    for m in ms if m.topic.endswith("/status")), 10, "status with tokens/s")
        assert link.counters().telemetry_published == 1
    finally:
        link.stop()
        rec.close()


def test_broker_restart_mid_burst_loses_nothing_and_keeps_order(persistent_mosquitto: Mosquitto,
                                                                 tmp_path: Path) -> None:
    """The broker goes away while events are in flight (handed to paho, not yet
    acknowledged): paho resends those, the outbox the rest. Every seq arrives,
    in order; a repeat (at-least-once) is only ever a seq seen before."""
    broker = persistent_mosquitto
    total = 300
    rec = Recorder(broker.port, [device_topic(FLEET, "dev-m", "events")], client_id="observer-m")
    link = make_link(broker, tmp_path, device="dev-m")
    link.start()
    try:
        assert link.wait_connected(10)

        def produce() -> None:
            for _ in range(total):
                link.publish_event("transition", from_state="DOWNLOADING", to_state="VERIFYING")

        producer = threading.Thread(target=produce)
        producer.start()
        wait_until(lambda: link.counters().events_acked >= 20, 10, "some events acknowledged")
        broker.stop()  # while the producer is still appending and events are in flight
        acked_at_stop = link.counters().events_acked
        producer.join(30)
        broker.start()
        assert link.wait_outbox_empty(30), f"{link.outbox.pending_count} events still pending"
        rec.wait_for(lambda ms: {json.loads(m.payload)["seq"] for m in ms} >= set(range(1, total + 1)), 30,
                     "every seq at the subscriber")
        seqs = [e["seq"] for e in rec.payloads()]
        first_seen = list(dict.fromkeys(seqs))
        assert first_seen == list(range(1, total + 1)), "out of order"
        assert acked_at_stop < total, "the broker stop did not interrupt the burst"
        # A repeat is a redelivery of an earlier seq, never something new out of turn.
        high = 0
        for s in seqs:
            assert s <= high + 1, f"seq {s} after {high}: a gap"
            high = max(high, s)
    finally:
        link.stop()
        rec.close()

"""The device's one MQTT connection (paho-mqtt 2.x, callback API version 2).

What it owns: connecting (MQTT 3.1.1, or 5 with `mqtt_protocol = "5"`; TLS and
username/password or a client certificate from `AgentConfig`), the will, the
subscriptions, reconnecting with exponential backoff and jitter, the retained
status, telemetry, and delivering the event outbox. What it does not do:
decide anything. Doorbells and commands are validated and handed to the
daemon through `incoming` (a bounded thread-safe queue); the daemon runs the
TUF refresh, which is the only authority (design section 2).

Threads: one network thread runs the socket loop (`select` over the broker
socket and a wake-up pipe, then paho's `loop_read` / `loop_write` /
`loop_misc`). Every call into paho's publish/subscribe happens on that thread,
outside paho callbacks: paho calls `on_publish` holding its message mutex,
so publishing from other threads while holding our own locks could deadlock.
The public methods (`publish_status`, `publish_telemetry`, `publish_event`)
only record work and wake the thread.

Session: the client id is the device id and the session is persistent
(clean_session=False; for v5 clean_start=False with a session expiry), so
the broker queues QoS 1 commands while the device is away. Subscriptions are
still renewed in `on_connect`, because a broker restarted without
persistence forgets them.

Delivery of events: `publish_event` stores the event in the on-disk outbox
and returns; the network thread publishes stored events in `seq` order with
QoS 1 and removes each only on its PUBACK. paho itself resends unacknowledged
QoS 1 messages after a reconnect; after a restart of the agent the outbox
sends whatever was never acknowledged. So every event is delivered at least
once and in order; see `agent.wire.mqtt.DeviceEvent` for deduplication.

What a malicious broker or client can do here: send payloads. Each is size
checked, then validated by its pydantic model; anything else is dropped,
counted in `counters().dropped` by reason and logged at WARNING.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import Field

from agent import __version__ as AGENT_VERSION
from agent.config import AgentConfig
from agent.link.backoff import Backoff
from agent.link.outbox import Outbox
from agent.wire.base import StrictModel
from agent.wire.broker import BrokerCredentials, configure_client, parse_broker_url
from agent.wire.errors import ConfigError, EdgefleetError, PayloadError
from agent.wire.mqtt import (
    MAX_INCOMING_PACKET_BYTES,
    Command,
    DeviceEvent,
    DeviceStatus,
    Doorbell,
    Telemetry,
    device_topic,
    encode,
    parse_payload,
    releases_topic,
    utc_now,
)

log = logging.getLogger(__name__)

Incoming = Doorbell | Command

DEFAULT_KEEPALIVE_S = 30
# v5 only: how long the broker keeps this device's session (and queued
# commands) after a disconnect. v3.1.1 sessions last until the broker drops them.
SESSION_EXPIRY_S = 7 * 24 * 3600
# Events handed to paho at once; more wait in the outbox. Bounds paho's memory.
OUTBOX_WINDOW = 64
_OFFLINE_ACK_WAIT_S = 2.0
STATUS_REFRESH_S = 300.0


class LinkCounters(StrictModel):
    """What the link did since start; `dropped` is keyed by PayloadError.reason."""

    schema_version: Literal[1] = 1
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    incoming_accepted: int = 0
    dropped: dict[str, int] = Field(default_factory=dict)
    inbox_full: int = 0
    events_acked: int = 0
    telemetry_published: int = 0
    telemetry_skipped: int = 0
    subscribed: int = 0  # SUBACKs granting the releases and commands subscriptions
    callback_errors: int = 0  # exceptions caught in paho callbacks (each logged with its traceback)
    thread_restarts: int = 0  # the network loop itself failed and was started again (each also an event)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class MqttLink:
    """The daemon's handle on MQTT. Build it, `start()`, then read `incoming`.

    `on_incoming`, if given, is called on the network thread after an item
    was queued (keep it short: set an event, nothing more).
    """

    def __init__(self, config: AgentConfig, outbox: Outbox, *,
                 agent_version: str = AGENT_VERSION,
                 keepalive_s: int = DEFAULT_KEEPALIVE_S,
                 backoff: Backoff | None = None,
                 inbox_size: int = 64,
                 status_refresh_s: float = STATUS_REFRESH_S,
                 on_incoming: Callable[[], object] | None = None) -> None:
        if config.broker_url is None:
            raise ConfigError("broker_url is not set: set it in agent.toml or EDGE_AGENT_BROKER_URL")
        self.config = config
        self.device_id = config.device_id
        self.fleet = config.fleet
        self.outbox = outbox
        self.address = parse_broker_url(config.broker_url)
        self.keepalive_s = keepalive_s
        self.incoming: queue.Queue[Incoming] = queue.Queue(maxsize=inbox_size)
        self._on_incoming = on_incoming
        self._backoff = backoff or Backoff()
        self._is_v5 = config.mqtt_protocol == "5"
        self._status_refresh_s = status_refresh_s

        self.topic_releases = releases_topic(self.fleet)
        self.topic_status = device_topic(self.fleet, self.device_id, "status")
        self.topic_telemetry = device_topic(self.fleet, self.device_id, "telemetry")
        self.topic_events = device_topic(self.fleet, self.device_id, "events")
        self.topic_commands = device_topic(self.fleet, self.device_id, "commands")

        self._lock = threading.Lock()  # guards the fields below; never held while calling paho
        self._status = DeviceStatus(device_id=self.device_id, online=True, channel=config.channel,
                                    agent_version=agent_version)
        self._status_dirty = False
        self._telemetry: Telemetry | None = None
        self._counters = LinkCounters()
        # paho mid -> outbox seq. publish() and on_publish both run on the network
        # thread, so a PUBACK can never arrive before its mid is recorded here.
        self._inflight: dict[int, int] = {}
        self._sent_up_to = 0                 # highest seq handed to paho
        self._offline_mid: int | None = None
        self._offline_acked = threading.Event()
        # The model the will names (network thread only): the will is fixed at CONNECT.
        self._will_model: tuple[str | None, int | None] = (None, None)
        self._refreshing_will = False  # a clean reconnect under way, to give the will the new model

        self._connected = threading.Event()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None

        self._client = self._make_client()

    # -- setup -----------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        protocol = mqtt.MQTTv5 if self._is_v5 else mqtt.MQTTv311
        kwargs: dict[str, object] = {}
        if not self._is_v5:
            kwargs["clean_session"] = False
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id, protocol=protocol,
                             reconnect_on_failure=False, **kwargs)  # type: ignore[arg-type]
        configure_client(client, self.address, broker_credentials(self.config))
        client.max_inflight_messages_set(OUTBOX_WINDOW)
        # paho re-raises what a callback raises and its network thread dies with it: every
        # callback is guarded, so a payload or a full disk costs one counted error, not the link.
        client.on_connect = self._guarded(self._on_connect)
        client.on_disconnect = self._guarded(self._on_disconnect)
        client.on_message = self._guarded(self._on_message)
        client.on_publish = self._guarded(self._on_publish)
        client.on_subscribe = self._guarded(self._on_subscribe)
        properties = None
        if self._is_v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            properties.MaximumPacketSize = MAX_INCOMING_PACKET_BYTES
        # Only stores the address; the network thread does the connecting.
        client.connect_async(self.address.host, self.address.port, keepalive=self.keepalive_s,
                             clean_start=False if self._is_v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                             properties=properties)
        return client

    # -- public API (any thread) -----------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"mqtt-link-{self.device_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publish `online: false` (retained), disconnect cleanly and join the thread."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("event=mqtt_stop_timeout timeout_s=%s", timeout_s)
        self._wake_r.close()
        self._wake_w.close()

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def status(self) -> DeviceStatus:
        with self._lock:
            return self._status

    def publish_status(self, **changes: object) -> DeviceStatus:
        """Update fields of the retained status (state, model, version, channel,
        last_error, tokens_per_s) and publish it (QoS 1, retained) now if
        connected, else on the next connect. Returns the new status.

        Raises:
            ValueError: a field name that DeviceStatus does not have (a bug).
        """
        allowed = set(DeviceStatus.model_fields) - {"schema_version", "device_id", "online", "timestamp"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"unknown status fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        with self._lock:
            data = self._status.model_dump()
            data.update(changes)
            data["timestamp"] = utc_now()
            self._status = DeviceStatus.model_validate(data)
            self._status_dirty = True
            status = self._status
        self._wake()
        return status

    def publish_telemetry(self, telemetry: Telemetry) -> bool:
        """Send one sample (QoS 0, latest wins). False when offline: telemetry is
        not stored, the next sample describes the device better than an old one."""
        with self._lock:
            if not self._connected.is_set():
                self._counters.telemetry_skipped += 1
                return False
            self._telemetry = telemetry.model_copy(update={
                "outbox_pending": self.outbox.pending_count,
                "events_dropped_total": self.outbox.dropped_total,
                "incoming_dropped_total": self._counters.dropped_total,
            })
            # The retained status carries the last tokens/s for `fleet status`, but
            # is republished for it at most every `status_refresh_s`, not per sample.
            if telemetry.tokens_per_s is not None:
                now = utc_now()
                is_stale = (now - self._status.timestamp).total_seconds() >= self._status_refresh_s
                self._status = self._status.model_copy(
                    update={"tokens_per_s": telemetry.tokens_per_s, **({"timestamp": now} if is_stale else {})})
                self._status_dirty = self._status_dirty or is_stale
        self._wake()
        return True

    def publish_event(self, kind: Literal["transition", "error", "info"], *,
                      from_state: str | None = None, to_state: str | None = None,
                      trigger: str | None = None, model: str | None = None,
                      version: int | None = None, reason: str | None = None) -> DeviceEvent:
        """Store an event durably in the outbox (returns after fsync) and queue it
        for delivery. Works offline; delivery follows on (re)connect.

        Raises:
            StoreError: the outbox cannot be written.
        """
        event = self.outbox.append(lambda seq: DeviceEvent(
            device_id=self.device_id, seq=seq, kind=kind, from_state=from_state, to_state=to_state,
            trigger=trigger, model=model, version=version, reason=reason))
        self._wake()
        return event

    def counters(self) -> LinkCounters:
        with self._lock:
            return self._counters.model_copy(deep=True)

    def wait_outbox_empty(self, timeout_s: float) -> bool:
        """For shutdown and tests: wait until the broker acknowledged every stored event."""
        deadline = time.monotonic() + timeout_s
        while self.outbox.pending_count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- network thread --------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is already pending) or closed at stop

    def _run(self) -> None:
        """The network thread: its loop, started again after anything it did not foresee, so
        that no bug or odd packet ends the device's MQTT for the rest of the process."""
        while True:
            try:
                self._run_loop()
                return
            except Exception as e:
                with self._lock:
                    self._counters.thread_restarts += 1
                self._connected.clear()
                delay = self._backoff.next_delay_s()
                log.exception("event=mqtt_thread_restarted retry_in_s=%.2f", delay)
                self._report_restart(e)
                try:
                    self._client.disconnect()  # whatever state the socket was left in
                except Exception:  # the reconnect that follows replaces the socket anyway
                    pass
                if self._stop.wait(delay):
                    return

    def _report_restart(self, error: Exception) -> None:
        """An `error` event, sent through the outbox once the link is back."""
        try:
            self.publish_event("error", reason=f"mqtt_link_restarted: the MQTT network loop failed and was "
                                               f"started again: {type(error).__name__}: {error}"[:2000])
        except EdgefleetError:
            log.exception("event=mqtt_restart_report_failed")

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            self._set_will()
            try:
                self._client.reconnect()
            except (OSError, ssl.SSLError) as e:
                with self._lock:
                    self._counters.connect_failures += 1
                delay = self._backoff.next_delay_s()
                log.warning("event=mqtt_connect_failed host=%s port=%d error=%r retry_in_s=%.2f",
                            self.address.host, self.address.port, e, delay)
                self._stop.wait(delay)
                continue
            self._serve_connection()
            if self._stop.is_set():
                break
            if self._refreshing_will:
                self._refreshing_will = False
                continue  # reconnect at once, with the new will
            delay = self._backoff.next_delay_s()
            log.warning("event=mqtt_connection_lost retry_in_s=%.2f", delay)
            self._stop.wait(delay)
        self._shutdown()

    def _set_will(self) -> None:
        # The will carries the last known state, so an operator sees what the
        # device was doing when it vanished.
        with self._lock:
            offline = self._status.model_copy(update={"online": False, "timestamp": utc_now()})
        self._will_model = (offline.model, offline.version)
        self._client.will_set(self.topic_status, encode(offline), qos=1, retain=True)

    def _refresh_will_if_stale(self) -> None:
        """MQTT fixes the will at CONNECT: when the model it names is no longer the one serving
        (a first install, an update, a rollback), reconnect cleanly so that a later crash reports
        the right model. A normal DISCONNECT discards the old will; the persistent session keeps
        the subscriptions and paho resends whatever QoS 1 message was still in flight."""
        with self._lock:
            serving = (self._status.model, self._status.version)
            is_idle = not self._inflight
        if serving != self._will_model and is_idle and not self._refreshing_will:
            log.info("event=mqtt_will_refresh model=%s version=%s", *serving)
            self._refreshing_will = True
            self._client.disconnect()

    def _serve_connection(self) -> None:
        """Run the socket loop until the connection drops or stop() is called."""
        client = self._client
        while not self._stop.is_set():
            sock = client.socket()
            if sock is None:
                return
            rlist = [sock, self._wake_r]
            wlist = [sock] if client.want_write() else []
            pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS bytes select cannot see
            try:
                readable, writable, _ = select.select(rlist, wlist, [], 0 if pending else 1.0)
            except (OSError, ValueError):
                return
            if self._wake_r in readable:
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            if sock in readable or pending:
                if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return
            if sock in writable and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if self._connected.is_set():
                self._send_pending_work()

    def _send_pending_work(self) -> None:
        with self._lock:
            status = self._status if self._status_dirty else None
            self._status_dirty = False
            telemetry, self._telemetry = self._telemetry, None
        if status is not None:
            self._client.publish(self.topic_status, encode(status), qos=1, retain=True)
        if telemetry is not None:
            info = self._client.publish(self.topic_telemetry, encode(telemetry), qos=0)
            with self._lock:
                if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._counters.telemetry_published += 1
                else:
                    self._counters.telemetry_skipped += 1
        self._pump_outbox()
        self._refresh_will_if_stale()

    def _pump_outbox(self) -> None:
        with self._lock:
            room = OUTBOX_WINDOW - len(self._inflight)
            after = self._sent_up_to
        if room <= 0:
            return
        for event in self.outbox.pending(limit=room, after=after):
            info = self._client.publish(self.topic_events, encode(event), qos=1)
            with self._lock:
                self._sent_up_to = event.seq
                self._inflight[info.mid] = event.seq

    def _ack_event(self, seq: int) -> None:
        self.outbox.remove(seq)
        with self._lock:
            self._counters.events_acked += 1

    def _shutdown(self) -> None:
        client = self._client
        if self._connected.is_set():
            with self._lock:
                offline = self._status.model_copy(update={"online": False, "timestamp": utc_now()})
            info = client.publish(self.topic_status, encode(offline), qos=1, retain=True)
            with self._lock:
                self._offline_mid = info.mid
            deadline = time.monotonic() + _OFFLINE_ACK_WAIT_S
            while not self._offline_acked.is_set() and time.monotonic() < deadline and client.socket():
                if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
            client.disconnect()
            client.loop(timeout=0.1)
        self._connected.clear()
        log.info("event=mqtt_stopped device=%s", self.device_id)

    def _guarded(self, callback: Callable[..., None]) -> Callable[..., None]:
        name = callback.__name__

        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception:  # the network thread must keep running; the traceback says why
                with self._lock:
                    self._counters.callback_errors += 1
                log.exception("event=mqtt_callback_error callback=%s", name)

        return guarded

    # -- paho callbacks (network thread; keep them short) ----------------------
    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.warning("event=mqtt_connect_refused host=%s reason=%s", self.address.host, reason_code)
            with self._lock:
                self._counters.connect_failures += 1
            return
        self._backoff.reset()
        if not flags.session_present:
            # A new session (first connect, or a broker restarted without persistence): subscribe.
            # A kept one still has them, and subscribing again would make the broker send the
            # retained doorbell once more on every reconnect (each will refresh after a switch).
            client.subscribe([(self.topic_releases, 1), (self.topic_commands, 1)])
        with self._lock:
            self._counters.connects += 1
            self._status = self._status.model_copy(update={"online": True, "timestamp": utc_now()})
            self._status_dirty = True  # published by the loop, after paho resent older messages
        self._connected.set()
        log.info("event=mqtt_connected host=%s port=%d session_present=%s protocol=%s",
                 self.address.host, self.address.port, flags.session_present,
                 "5" if self._is_v5 else "3.1.1")
        self._wake()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        with self._lock:
            if was_connected:
                self._counters.disconnects += 1
        if was_connected and not self._stop.is_set() and not self._refreshing_will:
            log.warning("event=mqtt_disconnected reason=%s", reason_code)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.warning("event=mqtt_subscribe_refused reason=%s: check the broker ACL for this device", rc)
        if not any(rc.is_failure for rc in reason_codes):
            with self._lock:
                self._counters.subscribed += 1

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        # paho holds its message mutex here: touch only our own lock and the outbox.
        with self._lock:
            if mid == self._offline_mid:
                self._offline_acked.set()
                return
            seq = self._inflight.pop(mid, None)
        if seq is None:
            return  # a status publish
        if reason_code.is_failure:
            # A v5 broker refused it (e.g. the ACL): resending cannot help; the
            # event is dropped and counted rather than blocking the queue forever.
            log.warning("event=event_refused_by_broker seq=%d reason=%s", seq, reason_code)
        self._ack_event(seq)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if not message.payload:
            # An empty retained message is how an operator clears `releases`: not an error.
            log.debug("event=mqtt_empty_payload topic=%s", topic)
            return
        try:
            item: Incoming
            if topic == self.topic_releases:
                item = parse_payload(Doorbell, message.payload)
            elif topic == self.topic_commands:
                item = parse_payload(Command, message.payload)
            else:
                raise PayloadError("unexpected_topic", f"not subscribed to {topic!r}")
        except PayloadError as e:
            with self._lock:
                self._counters.dropped[e.reason] = self._counters.dropped.get(e.reason, 0) + 1
            log.warning("event=mqtt_payload_dropped topic=%s reason=%s bytes=%d detail=%s",
                        topic, e.reason, len(message.payload), e.detail[:200])
            return
        try:
            self.incoming.put_nowait(item)
        except queue.Full:
            # The daemon is behind; a dropped hint only delays work until the next poll.
            with self._lock:
                self._counters.inbox_full += 1
            log.warning("event=mqtt_inbox_full topic=%s", topic)
            return
        with self._lock:
            self._counters.incoming_accepted += 1
        log.info("event=mqtt_incoming topic=%s kind=%s", topic, type(item).__name__)
        if self._on_incoming is not None:
            self._on_incoming()


def broker_credentials(config: AgentConfig) -> BrokerCredentials:
    """The broker credentials and TLS files of the device's config."""
    return BrokerCredentials(config.broker_username, config.broker_password,
                             str(config.broker_ca_file) if config.broker_ca_file else None,
                             str(config.broker_cert_file) if config.broker_cert_file else None,
                             str(config.broker_key_file) if config.broker_key_file else None)

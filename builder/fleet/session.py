"""The operator's MQTT sessions: where every device stands, from the retained status
topics (and live telemetry) of a fleet (`collect_fleet`, `fleet_session`), and
`ring_doorbell`, the one publish an operator makes to `releases`.

Each connects as an ordinary MQTT client with a clean session and a random client id,
so several operators can look at once. The commands are `builder.cli.fleet`.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.wire.broker import BrokerCredentials, configure_client, parse_broker_url
from agent.wire.errors import BrokerError
from agent.wire.mqtt import Doorbell, all_devices_topic, encode, releases_topic
from builder.fleet.view import FleetView

log = logging.getLogger(__name__)

# The operator's broker settings in the environment (`edge-builder fleet` and `rollout`).
ENV_BROKER = "EDGE_BUILDER_BROKER_URL"
ENV_USERNAME = "EDGE_BUILDER_BROKER_USERNAME"
ENV_PASSWORD = "EDGE_BUILDER_BROKER_PASSWORD"
DEFAULT_TIMEOUT_S = 3.0
# Retained messages arrive in one burst after the SUBACK; this much silence ends it.
QUIET_S = 0.3
CONNECT_TIMEOUT_S = 10.0


class _Session:
    """A connected operator client that feeds messages into `on_message`."""

    def __init__(self, broker_url: str, creds: BrokerCredentials,
                 on_message: Callable[[str, bytes | bytearray], None]) -> None:
        address = parse_broker_url(broker_url)
        self.broker_url = broker_url
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-builder-{uuid.uuid4().hex[:12]}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        configure_client(self.client, address, creds)
        self.connack = threading.Event()
        self.refused: str | None = None
        self.subacked = threading.Event()
        self.last_message_at = time.monotonic()
        self.callback_errors = 0
        self.thread_restarts = 0  # the network loop failed and was started again (each logged)
        self.disconnected_since: float | None = None  # monotonic; None while connected
        self._closing = threading.Event()
        self._on_message = on_message
        self._topics: list[str] = []
        self.client.on_connect = self._connected
        self.client.on_disconnect = self._disconnected
        self.client.on_subscribe = lambda *a: self.subacked.set()
        self.client.on_message = self._message
        try:
            self.client.connect(address.host, address.port, keepalive=30)
        except ssl.SSLCertVerificationError as e:
            raise BrokerError(f"cannot connect to broker {broker_url}: its TLS certificate is not trusted "
                              f"({e.verify_message}): pass the fleet's CA certificate with --ca-file") from e
        except OSError as e:
            raise BrokerError(f"cannot connect to broker {broker_url}: {e}; check the URL, that the broker "
                              "runs and that this host may reach it") from e
        self._network = threading.Thread(target=self._run_network, name=f"operator-mqtt-{address.host}", daemon=True)
        self._network.start()
        if not self.connack.wait(CONNECT_TIMEOUT_S):
            self.close()
            raise BrokerError(f"no CONNACK from {broker_url} within {CONNECT_TIMEOUT_S}s: is it an MQTT broker?")
        if self.refused is not None:
            self.close()
            raise BrokerError(f"broker {broker_url} refused the connection: {self.refused}; "
                              f"check the username/password ({ENV_USERNAME}, {ENV_PASSWORD}) or certificates")

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.refused = str(rc)
        else:
            self.disconnected_since = None
            if self._topics:
                client.subscribe([(t, 1) for t in self._topics])  # again after a reconnect
        self.connack.set()

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if self.disconnected_since is None:
            self.disconnected_since = time.monotonic()
        log.warning("event=operator_disconnected broker=%s reason=%s", self.broker_url, rc)

    def blind_reason(self, after_s: float) -> str | None:
        """Why this session sees nothing now: disconnected for `after_s` or longer."""
        since = self.disconnected_since
        if since is not None and time.monotonic() - since >= after_s:
            return f"disconnected from {self.broker_url} for {time.monotonic() - since:.0f} s"
        return None

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.last_message_at = time.monotonic()
        try:
            self._on_message(message.topic, message.payload)
        except Exception:  # paho would re-raise it and end the session's thread: a device cannot blind us
            self.callback_errors += 1
            log.exception("event=operator_message_error topic=%s bytes=%d", message.topic, len(message.payload))

    def subscribe(self, topics: list[str]) -> None:
        self._topics = topics
        self.client.subscribe([(t, 1) for t in topics])
        if not self.subacked.wait(CONNECT_TIMEOUT_S):
            raise BrokerError(f"no SUBACK from {self.broker_url} for {topics}")

    def _run_network(self) -> None:
        """paho's loop, started again after anything it raises (paho re-raises a callback's
        exception and its own thread would end there): a watch that stops seeing must say so."""
        while not self._closing.is_set():
            try:
                self.client.loop_forever(retry_first_connection=True)
                return  # close() disconnected
            except Exception:
                self.thread_restarts += 1
                if self.disconnected_since is None:
                    self.disconnected_since = time.monotonic()
                log.exception("event=operator_network_restarted broker=%s", self.broker_url)
                if self._closing.wait(1.0):
                    return
                try:
                    self.client.reconnect()  # a fresh session, whose CONNACK subscribes again
                except OSError:
                    pass  # loop_forever goes on retrying

    def close(self) -> None:
        self._closing.set()
        self.client.disconnect()
        self._network.join(10)


# Public name for the other operator commands of builder/ (rollout) that watch a fleet.
OperatorSession = _Session


@contextmanager
def fleet_session(broker_url: str, creds: BrokerCredentials, view: FleetView,
                   lock: threading.Lock, changed: threading.Event) -> Iterator[_Session]:
    def on_message(topic: str, payload: bytes | bytearray) -> None:
        with lock:
            if view.apply(topic, payload):
                changed.set()

    session = _Session(broker_url, creds, on_message)
    try:
        session.subscribe([all_devices_topic(view.fleet, "status"), all_devices_topic(view.fleet, "telemetry")])
        yield session
    finally:
        session.close()


def collect_fleet(broker_url: str, creds: BrokerCredentials, fleet: str,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> FleetView:
    """Read the retained statuses: returns after a quiet spell or `timeout_s`.

    Raises:
        BrokerError: the broker is unreachable or refuses the credentials.
    """
    view, lock, changed = FleetView(fleet), threading.Lock(), threading.Event()
    with fleet_session(broker_url, creds, view, lock, changed) as session:
        deadline = time.monotonic() + timeout_s
        session.last_message_at = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - session.last_message_at < QUIET_S:
            time.sleep(0.05)
    return view


def ring_doorbell(broker_url: str, creds: BrokerCredentials, fleet: str, doorbell: Doorbell) -> None:
    """Publish the retained doorbell on `releases` (QoS 1) and wait for the PUBACK.

    Raises:
        BrokerError: unreachable, refused, or not acknowledged in time.
    """
    session = _Session(broker_url, creds, lambda topic, payload: None)
    try:
        info = session.client.publish(releases_topic(fleet), encode(doorbell), qos=1, retain=True)
        info.wait_for_publish(CONNECT_TIMEOUT_S)
        if not info.is_published():
            raise BrokerError(f"doorbell on {releases_topic(fleet)} not acknowledged by {broker_url}")
    finally:
        session.close()

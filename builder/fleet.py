"""`edge-builder fleet status|watch`: where every device stands, from the
retained status topics (and live telemetry) of a fleet.

Also `ring_doorbell`, the one publish an operator makes to `releases`.
Both connect as an ordinary MQTT client with a clean session and a random
client id, so several operators can look at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.broker import BrokerCredentials, configure_client, parse_broker_url
from agent.clikit import HelpFormatter, print_json
from agent.errors import BrokerError, UsageError
from agent.messages import Doorbell, all_devices_topic, encode, releases_topic, utc_now
from builder.fleetview import FleetView, render_table

log = logging.getLogger(__name__)

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
                 on_message: Callable[[str, bytes], None]) -> None:
        address = parse_broker_url(broker_url)
        self.broker_url = broker_url
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-builder-{uuid.uuid4().hex[:12]}",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        configure_client(self.client, address, creds)
        self.connack = threading.Event()
        self.refused: str | None = None
        self.subacked = threading.Event()
        self.last_message_at = time.monotonic()
        self._on_message = on_message
        self._topics: list[str] = []
        self.client.on_connect = self._connected
        self.client.on_subscribe = lambda *a: self.subacked.set()
        self.client.on_message = self._message
        try:
            self.client.connect(address.host, address.port, keepalive=30)
        except OSError as e:
            raise BrokerError(f"cannot connect to broker {broker_url}: {e}; check the URL, that the broker "
                              "runs and that this host may reach it") from e
        self.client.loop_start()
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
        elif self._topics:
            client.subscribe([(t, 1) for t in self._topics])  # again after a reconnect
        self.connack.set()

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.last_message_at = time.monotonic()
        self._on_message(message.topic, message.payload)

    def subscribe(self, topics: list[str]) -> None:
        self._topics = topics
        self.client.subscribe([(t, 1) for t in topics])
        if not self.subacked.wait(CONNECT_TIMEOUT_S):
            raise BrokerError(f"no SUBACK from {self.broker_url} for {topics}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# Public name for the other operator commands of builder/ (rollout) that watch a fleet.
OperatorSession = _Session


@contextmanager
def _fleet_session(broker_url: str, creds: BrokerCredentials, view: FleetView,
                   lock: threading.Lock, changed: threading.Event) -> Iterator[_Session]:
    def on_message(topic: str, payload: bytes) -> None:
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
    with _fleet_session(broker_url, creds, view, lock, changed) as session:
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


# -- CLI (the broker options are shared with `edge-builder rollout`) ----------
def add_credential_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--username", default=os.environ.get(ENV_USERNAME), help=f"broker username (env: {ENV_USERNAME})")
    p.add_argument("--password-file", default=None,
                   help=f"file holding the broker password; None: env {ENV_PASSWORD}")
    p.add_argument("--ca-file", default=None, help="CA certificate for mqtts://; None: the system CAs")
    p.add_argument("--cert-file", default=None, help="client certificate for mqtts://")
    p.add_argument("--key-file", default=None, help="client key for mqtts://")


def credentials_from_args(args: argparse.Namespace) -> BrokerCredentials:
    password = os.environ.get(ENV_PASSWORD)
    if args.password_file is not None:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read --password-file {args.password_file}: {e}") from e
    return BrokerCredentials(username=args.username, password=password, ca_file=args.ca_file,
                             cert_file=args.cert_file, key_file=args.key_file)


def broker_url_from_args(args: argparse.Namespace) -> str:
    if not args.broker:
        raise UsageError(f"no broker: pass --broker mqtt[s]://host:port or set {ENV_BROKER}")
    return str(args.broker)


def _status(args: argparse.Namespace) -> int:
    view = collect_fleet(broker_url_from_args(args), credentials_from_args(args), args.fleet, args.timeout)
    report = view.report(channel=args.channel, state=args.state)
    if args.json:
        print_json(report)
    else:
        print(render_table(report, utc_now()))
    return 0


def _watch(args: argparse.Namespace) -> int:
    view, lock, changed = FleetView(args.fleet), threading.Lock(), threading.Event()
    is_tty = sys.stdout.isatty() and not args.json
    end = time.monotonic() + args.duration if args.duration else None
    with _fleet_session(broker_url_from_args(args), credentials_from_args(args), view, lock, changed):
        time.sleep(QUIET_S)  # let the retained burst arrive before the first frame
        changed.set()
        while end is None or time.monotonic() < end:
            # Redraw on a change, and every few seconds anyway so "last seen" ages.
            if changed.wait(min(args.refresh, (end - time.monotonic()) if end else args.refresh)) or is_tty:
                changed.clear()
                with lock:
                    report = view.report(channel=args.channel, state=args.state)
                if args.json:
                    print_json(report)  # one object per line, per change
                else:
                    frame = render_table(report, utc_now())
                    sys.stdout.write(("\x1b[H\x1b[2J" if is_tty else "\n") + frame + "\n")
                    sys.stdout.flush()
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default=os.environ.get(ENV_BROKER),
                   help=f"mqtt://host:port or mqtts://host:port (env: {ENV_BROKER})")
    p.add_argument("--fleet", default="default", help="topic prefix edgefleet/<fleet>")
    p.add_argument("--channel", default=None, help="only devices following this channel")
    p.add_argument("--state", default=None, help="only devices in this state, e.g. ACTIVE or FAILED")
    p.add_argument("--json", action="store_true", help="print a FleetReport JSON object instead of the table")
    add_credential_args(p)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fleet = subparsers.add_parser("fleet", help="see where every device of a fleet stands",
                                  formatter_class=HelpFormatter)
    sub = fleet.add_subparsers(dest="fleet_command", metavar="{status,watch}", required=True)

    status = sub.add_parser(
        "status", help="print the fleet table once", formatter_class=HelpFormatter,
        description="Subscribe to the retained status topics and print one row per device.",
        epilog="example:\n  edge-builder fleet status --broker mqtts://broker:8884 --fleet prod "
               "--username operator --ca-file ca.crt --state FAILED")
    _common(status)
    status.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds to wait for retained statuses at most")
    status.set_defaults(handler=_status)

    watch = sub.add_parser(
        "watch", help="keep the fleet table live", formatter_class=HelpFormatter,
        description="Like status, redrawn on every change (and every --refresh seconds). "
                    "With --json: one FleetReport object per line, per change.",
        epilog="example:\n  edge-builder fleet watch --broker mqtt://127.0.0.1:1883 --fleet demo --channel stable")
    _common(watch)
    watch.add_argument("--refresh", type=float, default=5.0, help="seconds between redraws without changes")
    watch.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: run until ^C)")
    watch.set_defaults(handler=_watch)

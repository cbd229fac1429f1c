"""A real Mosquitto for tests, and a subscriber that records what arrives.

`Mosquitto` starts the broker on a free port, waits until it accepts TCP
connections, and can be killed (SIGKILL), stopped (SIGTERM, which writes the
persistence file) and restarted on the same port mid-test. The `mosquitto`
fixture kills it in teardown, also when the test failed.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from builder.demo.ports import free_port
from testkit.waits import is_listening, wait_until


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        pytest.fail("mosquitto is not installed: run `make system-deps` (apt-get install mosquitto mosquitto-clients)")
    return found


class Mosquitto:
    def __init__(self, workdir: Path, *, persistence: bool = False, conf_text: str | None = None,
                 port: int | None = None, ready_ports: list[int] | None = None) -> None:
        """`conf_text` replaces the generated config entirely (the ACL test uses
        deploy/mosquitto.conf); then `ready_ports` names the ports to wait for."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        if conf_text is None:
            lines = [
                "user root",  # tests run as root in CI containers; keep files readable
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous true",
                f"persistence {'true' if persistence else 'false'}",
                f"persistence_location {workdir}/",
                "log_type all",
            ]
            conf_text = "\n".join(lines) + "\n"
        self.conf_path.write_text(conf_text)
        self.ready_ports = ready_ports or [self.port]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf_path)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        for port in self.ready_ports:
            wait_until(functools.partial(self._is_up, port), timeout_s, f"mosquitto to accept on {port}",
                       detail=self.log_tail)

    def _is_up(self, port: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {self.proc.returncode}:\n{self.log_tail()}")
        return is_listening(port)

    def kill(self) -> None:
        """SIGKILL: no persistence written, no clean disconnects."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file before exiting."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def persistent_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "broker", persistence=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


class Recorder:
    """A real MQTT client that records every message on its subscriptions.

    With `client_id` given it keeps a persistent session, so QoS 1 messages
    published while it is away (broker restart) are queued for it.
    """

    def __init__(self, port: int, topics: list[str], *, client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 tls_ca: str | None = None, protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.suback: list[Any] = []
        persistent = client_id is not None
        kwargs: dict[str, Any] = {}
        if protocol == mqtt.MQTTv311:
            kwargs["clean_session"] = not persistent
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"rec-{uuid.uuid4().hex[:8]}",
                                  protocol=protocol, **kwargs)
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type] # paho takes floats, its stub says int
        self.topics = topics
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        wait_until(lambda: len(self.suback) >= 1, 10, f"SUBACK for {topics}")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe([(t, 1) for t in self.topics])
            self.connected.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cond:
            self.suback.append(rcs)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def payloads(self, topic_suffix: str = "") -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(m.payload) for m in self.messages if m.topic.endswith(topic_suffix) and m.payload]

    def wait_for(self, predicate: Callable[[list[mqtt.MQTTMessage]], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(list(self.messages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; "
                                         f"got {[(m.topic, m.payload[:120]) for m in self.messages]}")
                self._cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_and_wait(port: int, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
    """Publish one message from a throwaway client and wait for its PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), f"publish to {topic} not acknowledged"
    finally:
        client.disconnect()
        client.loop_stop()

"""deploy/mosquitto.conf + deploy/mosquitto.acl, run for real: TLS, per-device
passwords, and each allowed and each denied case with real clients.

The broker runs exactly the deploy config; only its file directory, the
persistence directory and the two ports are moved. Certificates come from the
openssl CLI, passwords from mosquitto_passwd.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig
from agent.link.backoff import Backoff
from agent.link.mqtt import MqttLink
from agent.link.outbox import Outbox
from agent.wire.broker import BrokerCredentials
from agent.wire.mqtt import DeviceStatus, Doorbell, device_topic, encode, releases_topic
from builder.demo.ports import free_port
from builder.fleet.session import ring_doorbell
from testkit.brokers import Mosquitto
from testkit.env import REPO_ROOT, subprocess_env
from testkit.waits import wait_until

FLEET = "prod"
PASSWORDS = {"operator": "op-secret", "dev-a": "secret-a", "dev-b": "secret-b"}
NOT_AUTHORIZED = 0x87
ACCEPTED = (0x00, 0x10)  # success, "no matching subscribers"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certs(d: Path) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=edgefleet test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    # Device certificates, CN = device id, for the client-certificate variant of the device listener.
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for device in ("dev-a", "dev-b"):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{device}.key", "-out", f"{device}.csr", "-subj", f"/CN={device}", cwd=d)
        _openssl("x509", "-req", "-in", f"{device}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{device}.crt", "-days", "2", "-extfile", "client.ext", cwd=d)


@dataclass
class DeployedBroker:
    broker: Mosquitto
    device_port: int
    operator_port: int
    ca_file: str
    cert_port: int  # the device listener with the two commented-out client-certificate lines enabled
    files: Path


@pytest.fixture(scope="module")
def deployed() -> Iterator[DeployedBroker]:
    for tool in ("openssl", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make system-deps`")
    # Not under pytest's tmp_path: that is 0700 root-only, and mosquitto started
    # as root drops to its own user before it reads these files.
    root = Path(tempfile.mkdtemp(prefix="edgefleet-acl-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        files = root / "etc"
        state = root / "lib"
        files.mkdir()
        state.mkdir()
        _make_certs(files)
        shutil.copy(REPO_ROOT / "deploy" / "mosquitto.acl", files / "acl")
        passwd = files / "passwd"
        for i, (user, password) in enumerate(PASSWORDS.items()):
            subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                           check=True, capture_output=True, timeout=30)
        if os.getuid() == 0:
            mosq = pwd.getpwnam("mosquitto")
            for p in [files, state, *files.iterdir()]:
                os.chown(p, mosq.pw_uid, mosq.pw_gid)
        device_port, operator_port, cert_port = free_port(), free_port(), free_port()
        conf = (REPO_ROOT / "deploy" / "mosquitto.conf").read_text()
        assert conf.count("/etc/mosquitto/edgefleet/") >= 5 and "listener 8883\n" in conf and "listener 8884\n" in conf
        # The device listener once more, with client certificates as its comment says to enable them.
        device_section = conf[conf.index("listener 8883\n"):conf.index("# --- Operators")]
        assert "#require_certificate true\n#use_identity_as_username true\n" in device_section
        conf += device_section.replace("listener 8883\n", f"listener {cert_port}\n").replace(
            "#require_certificate true\n#use_identity_as_username true\n",
            "require_certificate true\nuse_identity_as_username true\n")
        conf = (conf.replace("/etc/mosquitto/edgefleet/", f"{files}/")
                .replace("/var/lib/mosquitto/", f"{state}/")
                .replace("listener 8883\n", f"listener {device_port}\n")
                .replace("listener 8884\n", f"listener {operator_port}\n"))
        broker = Mosquitto(root / "run", conf_text=conf, ready_ports=[device_port, operator_port, cert_port])
        broker.start()
        try:
            yield DeployedBroker(broker, device_port, operator_port, str(files / "ca.crt"), cert_port, files)
        finally:
            broker.kill()
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Client:
    """A synchronous MQTT v5 client over TLS: v5 so the broker names each refusal."""

    def __init__(self, d: DeployedBroker, user: str | None, password: str | None = None, *,
                 port: int | None = None, client_id: str | None = None, tls: bool = True,
                 cert: str | None = None) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.cond = threading.Condition()
        self.connack: Any = None
        self.disconnected = threading.Event()
        self._acks: dict[int, Any] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"c-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        if tls:
            self.client.tls_set(ca_certs=d.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT,
                                certfile=str(d.files / f"{cert}.crt") if cert else None,
                                keyfile=str(d.files / f"{cert}.key") if cert else None)
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_ack
        self.client.on_publish = lambda c, u, mid, rc, p: self._on_ack(c, u, mid, rc, p)
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.connect("127.0.0.1", port or d.device_port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.cond:
            self.connack = rc
            self.cond.notify_all()

    def _on_ack(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self.cond:
            self._acks[mid] = rc
            self.cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _wait(self, predicate: Any, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout=10):
                raise AssertionError(f"timed out waiting for {what}")

    def wait_connack(self) -> Any:
        self._wait(lambda: self.connack is not None or self.disconnected.is_set(), "CONNACK")
        return self.connack

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        self._wait(lambda: mid in self._acks, f"SUBACK {topic}")
        return int(self._acks[mid][0].value)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self._wait(lambda: info.mid in self._acks, f"PUBACK {topic}")
        return int(self._acks[info.mid].value)

    def received(self, topic: str) -> list[bytes]:
        with self.cond:
            return [m.payload for m in self.messages if m.topic == topic]

    def wait_message(self, topic: str, payload: bytes) -> None:
        self._wait(lambda: any(m.topic == topic and m.payload == payload for m in self.messages),
                   f"{payload!r} on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(deployed: DeployedBroker) -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def _connect(deployed: DeployedBroker, clients: list[Client], user: str, **kw: Any) -> Client:
    c = Client(deployed, user, PASSWORDS[user], **kw)
    clients.append(c)
    rc = c.wait_connack()
    assert rc is not None and not rc.is_failure, f"{user}: {rc}"
    return c


def test_device_reads_and_writes_only_its_own_topics(deployed: DeployedBroker, clients: list[Client]) -> None:
    op = _connect(deployed, clients, "operator", port=deployed.operator_port)
    assert op.subscribe(f"edgefleet/{FLEET}/#") == 1
    dev_a = _connect(deployed, clients, "dev-a")
    dev_b = _connect(deployed, clients, "dev-b")

    # allowed: its own status, telemetry and events
    for kind in ("status", "telemetry", "events"):
        topic = device_topic(FLEET, "dev-a", kind)
        assert dev_a.publish(topic, f"own {kind}".encode()) in ACCEPTED
        op.wait_message(topic, f"own {kind}".encode())

    # allowed: reading its own commands, which the operator sends
    assert dev_a.subscribe(device_topic(FLEET, "dev-a", "commands")) == 1
    assert op.publish(device_topic(FLEET, "dev-a", "commands"), b"check") in ACCEPTED
    dev_a.wait_message(device_topic(FLEET, "dev-a", "commands"), b"check")

    # denied: writing another device's topics; the broker refuses and nothing arrives
    forged = device_topic(FLEET, "dev-b", "status")
    assert dev_a.publish(forged, b"forged") == NOT_AUTHORIZED
    assert dev_a.publish(device_topic(FLEET, "dev-b", "commands"), b"forged") == NOT_AUTHORIZED
    # A later message from the same client arriving proves the earlier one was not just slow.
    assert dev_a.publish(device_topic(FLEET, "dev-a", "events"), b"marker-1") in ACCEPTED
    op.wait_message(device_topic(FLEET, "dev-a", "events"), b"marker-1")
    assert b"forged" not in op.received(forged)

    # denied: reading another device's topics, directly or by wildcard. Mosquitto
    # 2.0 may grant the SUBSCRIBE, but checks read access on every delivery.
    for pattern in (device_topic(FLEET, "dev-b", "commands"), f"edgefleet/{FLEET}/devices/+/status", "edgefleet/#"):
        dev_a.subscribe(pattern)
    assert dev_b.publish(device_topic(FLEET, "dev-b", "status"), b"b-status") in ACCEPTED
    assert op.publish(device_topic(FLEET, "dev-b", "commands"), b"b-command") in ACCEPTED
    assert op.publish(device_topic(FLEET, "dev-a", "commands"), b"marker-2") in ACCEPTED
    dev_a.wait_message(device_topic(FLEET, "dev-a", "commands"), b"marker-2")
    leaked = [m.topic for m in dev_a.messages if m.topic.startswith(f"edgefleet/{FLEET}/devices/dev-b/")]
    assert leaked == []
    # ... while the same wildcard does deliver dev-a's own commands to it (marker-2 above).


def test_a_device_cannot_command_itself_or_park_retained_topics(deployed: DeployedBroker,
                                                                 clients: list[Client]) -> None:
    """Only the operator commands a device; a device writes exactly status, telemetry, events."""
    op = _connect(deployed, clients, "operator", port=deployed.operator_port)
    assert op.subscribe(f"edgefleet/{FLEET}/#") == 1
    dev_a = _connect(deployed, clients, "dev-a")
    own_commands = device_topic(FLEET, "dev-a", "commands")
    assert dev_a.subscribe(own_commands) == 1
    assert dev_a.publish(own_commands, b"self-command") == NOT_AUTHORIZED
    parked = [f"edgefleet/{FLEET}/devices/dev-a/{suffix}"
              for suffix in ("status/extra", "events/x/y", "anything", "commands/sub")]
    for topic in parked:
        assert dev_a.publish(topic, b"parked", retain=True) == NOT_AUTHORIZED, topic
    assert dev_a.publish(device_topic(FLEET, "dev-a", "events"), b"marker") in ACCEPTED
    op.wait_message(device_topic(FLEET, "dev-a", "events"), b"marker")
    assert dev_a.received(own_commands) == []
    assert [m.topic for m in op.messages if m.payload in (b"self-command", b"parked")] == []
    # Nothing was retained: a new subscriber to the whole tree gets no parked message.
    late = _connect(deployed, clients, "operator", port=deployed.operator_port)
    assert late.subscribe(f"edgefleet/{FLEET}/devices/dev-a/#") == 1
    assert late.publish(device_topic(FLEET, "dev-a", "commands"), b"marker-2") in ACCEPTED
    late.wait_message(device_topic(FLEET, "dev-a", "commands"), b"marker-2")
    assert [m.topic for m in late.messages if m.payload == b"parked"] == []


def test_only_the_operator_rings_the_doorbell(deployed: DeployedBroker, clients: list[Client]) -> None:
    op = _connect(deployed, clients, "operator", port=deployed.operator_port)
    dev_a = _connect(deployed, clients, "dev-a")
    releases = releases_topic(FLEET)
    assert dev_a.subscribe(releases) == 1  # allowed: devices read the doorbell

    assert dev_a.publish(releases, b"fake release", retain=True) == NOT_AUTHORIZED
    assert op.publish(releases, b"real release", retain=True) in ACCEPTED
    dev_a.wait_message(releases, b"real release")
    assert dev_a.received(releases) == [b"real release"]

    # The retained doorbell a new device sees is the operator's.
    dev_b = _connect(deployed, clients, "dev-b")
    assert dev_b.subscribe(releases) == 1
    dev_b.wait_message(releases, b"real release")
    assert dev_b.received(releases) == [b"real release"]


def test_authentication_is_required(deployed: DeployedBroker, clients: list[Client]) -> None:
    wrong = Client(deployed, "dev-a", "not-the-password")
    anonymous = Client(deployed, None)
    unknown = Client(deployed, "dev-z", "whatever")
    clients += [wrong, anonymous, unknown]
    for c in (wrong, anonymous, unknown):
        rc = c.wait_connack()
        # A refusal the broker says (not a connection that merely never got a CONNACK):
        # 0x86 bad user name or password, 0x87 not authorized.
        assert rc is not None and rc.is_failure and rc.value in (0x86, 0x87), rc
    # Plain MQTT on the TLS port does not get a session either.
    plain = Client(deployed, "dev-a", PASSWORDS["dev-a"], tls=False)
    clients.append(plain)
    wait_until(lambda: plain.disconnected.is_set() or plain.connack is not None, 10, "plain TCP refused")
    assert plain.connack is None or plain.connack.is_failure


def test_a_device_cannot_take_over_another_devices_session(deployed: DeployedBroker, clients: list[Client]) -> None:
    dev_b = _connect(deployed, clients, "dev-b", client_id="dev-b")
    # dev-a asks for dev-b's client id; the device listener uses its username instead.
    _connect(deployed, clients, "dev-a", client_id="dev-b")
    # A QoS 1 round trip after dev-a's CONNACK: dev-b was not kicked.
    assert dev_b.publish(device_topic(FLEET, "dev-b", "events"), b"still here") in ACCEPTED
    assert not dev_b.disconnected.is_set()


def test_the_agent_link_works_with_the_deploy_config(deployed: DeployedBroker, clients: list[Client],
                                                     tmp_path: Path) -> None:
    """The real MqttLink over TLS with a password: status out, doorbell in."""
    op = _connect(deployed, clients, "operator", port=deployed.operator_port)
    assert op.subscribe(device_topic(FLEET, "dev-a", "status")) == 1
    config = AgentConfig(device_id="dev-a", fleet=FLEET, repo_url="http://127.0.0.1:9", state_dir=tmp_path,
                         broker_url=f"mqtts://127.0.0.1:{deployed.device_port}", broker_username="dev-a",
                         broker_password=PASSWORDS["dev-a"], broker_ca_file=Path(deployed.ca_file),
                         mqtt_protocol="5")
    link = MqttLink(config, Outbox(tmp_path / "outbox"), backoff=Backoff(0.05, 0.5))
    link.publish_status(state="ACTIVE", model="smollm2", version=2)
    link.start()
    try:
        assert link.wait_connected(10)
        wait_until(lambda: any(b'"online":true' in p for p in op.received(device_topic(FLEET, "dev-a", "status"))),
                   10, "status over TLS")
        doorbell = Doorbell(repo_timestamp_version=11, channels=["stable"])
        assert op.publish(releases_topic(FLEET), doorbell.model_dump_json().encode(), retain=True) in ACCEPTED
        assert link.incoming.get(timeout=10) == doorbell
        link.publish_event("info", reason="hello over TLS")
        assert link.wait_outbox_empty(10)
    finally:
        link.stop()


def _fleet_status(deployed: DeployedBroker, tmp_path: Path, password: str, *,
                  ca: bool = True) -> subprocess.CompletedProcess[str]:
    password_file = tmp_path / "operator.password"
    password_file.write_text(password + "\n")
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", "fleet", "status", "--broker", f"mqtts://127.0.0.1:{deployed.operator_port}",
         "--fleet", FLEET, "--username", "operator", "--password-file", str(password_file),
         *(["--ca-file", deployed.ca_file] if ca else []), "--json"],
        capture_output=True, text=True, env=subprocess_env(), timeout=60)


def test_the_operator_commands_over_tls_with_a_password(deployed: DeployedBroker, clients: list[Client],
                                                        tmp_path: Path) -> None:
    """`fleet status` and the doorbell as an operator uses them against the deployed broker:
    TLS with the fleet's CA, the operator's password from a file; a wrong password or an unknown
    CA is refused with a message that says which."""
    dev_a = _connect(deployed, clients, "dev-a")
    status = DeviceStatus(device_id="dev-a", online=True, state="ACTIVE", channel="stable", model="tiny", version=3,
                          agent_version="0.1.0")
    assert dev_a.publish(device_topic(FLEET, "dev-a", "status"), encode(status), retain=True) in ACCEPTED

    done = _fleet_status(deployed, tmp_path, PASSWORDS["operator"])
    assert done.returncode == 0, done.stderr
    devices = {d["device_id"]: d for d in json.loads(done.stdout)["devices"]}
    assert devices["dev-a"]["version"] == 3 and devices["dev-a"]["state"] == "ACTIVE"

    wrong = _fleet_status(deployed, tmp_path, "not-the-password")
    assert wrong.returncode != 0 and "refused the connection" in wrong.stderr, wrong.stderr
    assert "check the username/password" in wrong.stderr
    untrusted = _fleet_status(deployed, tmp_path, PASSWORDS["operator"], ca=False)  # the system CAs
    assert untrusted.returncode != 0 and "TLS certificate is not trusted" in untrusted.stderr, untrusted.stderr
    assert "--ca-file" in untrusted.stderr

    # The doorbell, as `rollout` and `rollback` ring it, reaches a device over the device port.
    assert dev_a.subscribe(releases_topic(FLEET)) == 1
    doorbell = Doorbell(repo_timestamp_version=42, channels=["stable"])
    ring_doorbell(f"mqtts://127.0.0.1:{deployed.operator_port}",
                  BrokerCredentials(username="operator", password=PASSWORDS["operator"], ca_file=deployed.ca_file),
                  FLEET, doorbell)
    dev_a.wait_message(releases_topic(FLEET), encode(doorbell))


def test_devices_with_client_certificates(deployed: DeployedBroker, clients: list[Client], tmp_path: Path) -> None:
    """The deploy config's client-certificate variant (its two commented lines enabled): the real
    MqttLink connects with a certificate whose CN is its device id and no password; the ACL holds
    for the identity in the certificate; no certificate, no session."""
    op = _connect(deployed, clients, "operator", port=deployed.operator_port)
    assert op.subscribe(f"edgefleet/{FLEET}/devices/+/status") == 1
    files = deployed.files
    config = AgentConfig(device_id="dev-a", fleet=FLEET, repo_url="http://127.0.0.1:9", state_dir=tmp_path,
                         broker_url=f"mqtts://127.0.0.1:{deployed.cert_port}", broker_ca_file=Path(deployed.ca_file),
                         broker_cert_file=files / "dev-a.crt", broker_key_file=files / "dev-a.key")
    link = MqttLink(config, Outbox(tmp_path / "outbox"), backoff=Backoff(0.05, 0.5))
    link.publish_status(state="ACTIVE", model="smollm2", version=5)
    link.start()
    try:
        assert link.wait_connected(10)
        wait_until(lambda: any(b'"version":5' in p for p in op.received(device_topic(FLEET, "dev-a", "status"))),
                   10, "dev-a's status over a client certificate")
    finally:
        link.stop()
    # dev-b's certificate is dev-b, whatever username it claims: dev-a's topics are not its own.
    dev_b = Client(deployed, "dev-a", None, port=deployed.cert_port, cert="dev-b")
    clients.append(dev_b)
    rc = dev_b.wait_connack()
    assert rc is not None and not rc.is_failure, rc
    assert dev_b.publish(device_topic(FLEET, "dev-a", "status"), b"forged", retain=True) == NOT_AUTHORIZED
    assert dev_b.publish(device_topic(FLEET, "dev-b", "status"), b"own") in ACCEPTED
    # Without a certificate the TLS handshake itself fails: no CONNACK at all.
    bare = Client(deployed, "dev-a", None, port=deployed.cert_port)
    clients.append(bare)
    wait_until(lambda: bare.disconnected.is_set() or bare.connack is not None, 10, "the bare client refused")
    assert bare.connack is None

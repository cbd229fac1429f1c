"""`edge-builder fleet status|watch` against retained statuses on a real Mosquitto."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from agent.wire.broker import BrokerCredentials
from agent.wire.mqtt import DeviceStatus, Doorbell, Telemetry, device_topic
from builder.fleet.session import ring_doorbell
from testkit.brokers import Mosquitto, Recorder, publish_and_wait
from testkit.env import subprocess_env
from testkit.link import make_link

FLEET = "test"


def _fleet(broker: Mosquitto, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "builder.cli", "fleet", *args, "--broker", broker.url,
                           "--fleet", FLEET], capture_output=True, text=True, env=subprocess_env(), timeout=timeout_s)


def _retain_status(broker: Mosquitto, status: DeviceStatus) -> None:
    publish_and_wait(broker.port, device_topic(FLEET, status.device_id, "status"),
                     status.model_dump_json().encode(), retain=True)


def test_fleet_status_table_json_and_filters(mosquitto: Mosquitto, tmp_path: Path) -> None:
    # One real agent link, two statuses as other devices left them (one offline
    # through its will), one garbage retained message, one device of another fleet.
    link = make_link(mosquitto, tmp_path, device="dev-live")
    link.publish_status(state="ACTIVE", model="smollm2", version=3, channel="stable")
    link.start()
    try:
        assert link.wait_connected(10)
        _retain_status(mosquitto, DeviceStatus(device_id="dev-beta", online=True, state="DOWNLOADING",
                                               channel="beta", model="smollm2", version=2, agent_version="0.1.0",
                                               tokens_per_s=12.5))
        _retain_status(mosquitto, DeviceStatus(device_id="dev-gone", online=False, state="FAILED",
                                               channel="stable", model="smollm2", version=2, agent_version="0.1.0",
                                               last_error="canary mismatch"))
        publish_and_wait(mosquitto.port, device_topic(FLEET, "dev-junk", "status"), b"{oops", retain=True)
        publish_and_wait(mosquitto.port, device_topic("other", "dev-x", "status"),
                         DeviceStatus(device_id="dev-x", online=True, agent_version="0").model_dump_json().encode(),
                         retain=True)
        rec = Recorder(mosquitto.port, [device_topic(FLEET, "dev-live", "status")])
        try:
            rec.wait_for(lambda ms: any(json.loads(m.payload)["online"] for m in ms), 10, "live status")
        finally:
            rec.close()
        link.publish_telemetry(Telemetry(device_id="dev-live", cpu_percent=1, ram_used_bytes=1, ram_total_bytes=2,
                                         disk_used_bytes=1, disk_total_bytes=2, tokens_per_s=41.0))

        result = _fleet(mosquitto, "status", "--json", "--timeout", "5")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        rows = {r["device_id"]: r for r in report["devices"]}
        assert sorted(rows) == ["dev-beta", "dev-gone", "dev-live"]
        assert rows["dev-live"]["online"] and rows["dev-live"]["state"] == "ACTIVE" and rows["dev-live"]["version"] == 3
        assert rows["dev-gone"]["online"] is False and rows["dev-gone"]["last_error"] == "canary mismatch"
        assert rows["dev-beta"]["tokens_per_s"] == 12.5
        assert report["online"] == 2 and report["total"] == 3 and report["dropped_payloads"] == 1

        failed = json.loads(_fleet(mosquitto, "status", "--json", "--state", "failed").stdout)
        assert [r["device_id"] for r in failed["devices"]] == ["dev-gone"]
        stable = json.loads(_fleet(mosquitto, "status", "--json", "--channel", "stable").stdout)
        assert [r["device_id"] for r in stable["devices"]] == ["dev-gone", "dev-live"]

        table = _fleet(mosquitto, "status")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["DEVICE", "ONLINE", "STATE", "CHANNEL", "MODEL", "VERSION", "LAST", "SEEN",
                                    "TOKENS/S"]
        assert lines[1].split()[:6] == ["dev-beta", "yes", "DOWNLOADING", "beta", "smollm2", "2"]
        assert lines[2].split()[:3] == ["dev-gone", "NO", "FAILED"]
        assert "3 device(s) in fleet test, 2 online, 1 invalid payload(s) ignored" in table.stdout
    finally:
        link.stop()


def test_fleet_watch_shows_changes_live(mosquitto: Mosquitto) -> None:
    _retain_status(mosquitto, DeviceStatus(device_id="dev-1", online=True, state="IDLE", agent_version="0.1.0"))
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "fleet", "watch", "--broker", mosquitto.url,
                             "--fleet", FLEET, "--json", "--duration", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert [(r["device_id"], r["state"]) for r in first["devices"]] == [("dev-1", "IDLE")]
        _retain_status(mosquitto, DeviceStatus(device_id="dev-1", online=True, state="DOWNLOADING",
                                               agent_version="0.1.0"))
        second = json.loads(proc.stdout.readline())
        assert [(r["device_id"], r["state"]) for r in second["devices"]] == [("dev-1", "DOWNLOADING")]
        _retain_status(mosquitto, DeviceStatus(device_id="dev-2", online=True, state="ACTIVE", agent_version="0.1.0"))
        third = json.loads(proc.stdout.readline())
        assert [r["device_id"] for r in third["devices"]] == ["dev-1", "dev-2"]
    finally:
        proc.kill()
        proc.wait(10)


def test_ring_doorbell_is_retained_for_devices(mosquitto: Mosquitto, tmp_path: Path) -> None:
    ring_doorbell(mosquitto.url, BrokerCredentials(), FLEET, Doorbell(repo_timestamp_version=7, channels=["stable"]))
    link = make_link(mosquitto, tmp_path, device="dev-late")
    link.start()
    try:
        assert link.incoming.get(timeout=10) == Doorbell(repo_timestamp_version=7, channels=["stable"])
    finally:
        link.stop()


def test_fleet_status_unreachable_broker_is_one_clear_error(tmp_path: Path) -> None:
    from builder.demo.ports import free_port

    result = subprocess.run([sys.executable, "-m", "builder.cli", "fleet", "status", "--broker",
                             f"mqtt://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().startswith("edge-builder: error: cannot connect to broker")
    assert len(result.stderr.strip().splitlines()) == 1

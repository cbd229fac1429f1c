"""The daemon against a real Mosquitto: updates rung by the doorbell and found by polling,
the broker dying mid-update, the will after SIGKILL, bad payloads, and systemd notify.

Every agent here is a real `edge-agent run` process with real tiny ORT-GenAI models from a
real TUF repository served over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.update.statemachine import Phase
from agent.wire.broker import BrokerCredentials
from agent.wire.mqtt import Doorbell
from builder.fleet.session import ring_doorbell
from testkit.agents import Agent, Release
from testkit.brokers import Mosquitto, Recorder, publish_and_wait
from testkit.waits import wait_until

FLEET = "test"


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


def _events(rec: Recorder, device: str) -> list[dict]:
    return rec.payloads(f"devices/{device}/events")


def test_update_rung_by_the_doorbell(tiny_raw: Path, release: Release, mosquitto: Mosquitto, tmp_path: Path,
                                     agents: list[Agent]) -> None:
    release.publish(tiny_raw, "tiny", 1)
    rec = Recorder(mosquitto.port, [f"edgefleet/{FLEET}/devices/+/events", f"edgefleet/{FLEET}/devices/+/status"])
    agent = Agent(tmp_path / "a", release, broker_url=mosquitto.url, poll_interval_s=3600)
    agents.append(agent.start())
    agent.wait_serving("tiny", 1)
    assert agent.chat().status_code == 200

    release.publish(tiny_raw, "tiny", 2)
    ring_doorbell(mosquitto.url, BrokerCredentials(), FLEET, Doorbell(repo_timestamp_version=2, channels=["stable"]))
    agent.wait_serving("tiny", 2, timeout_s=60)
    v2 = agent.store.model_dir("tiny", 2).resolve()
    agent.wait(lambda: agent.store.current() == v2, 30, "current -> v2")  # moves right after the canary passed
    assert agent.store.previous() == agent.store.model_dir("tiny", 1).resolve()
    assert agent.store.check_invariants() == []
    assert "triggers=doorbell" in agent.log()
    # Two updates ran, each in its own job process: the daemon never mapped TUF's crypto.
    assert agent.log().count("event=update_job_started") >= 2
    assert agent.proc is not None
    with open(f"/proc/{agent.proc.pid}/maps") as maps:
        assert not [line for line in maps if "cryptography" in line or "_rust.abi3" in line]
    rec.wait_for(lambda ms: any(json.loads(m.payload).get("to_state") == "ACTIVE" and json.loads(m.payload).get(
        "version") == 2 for m in ms if m.topic.endswith("/events")), 30, "ACTIVE v2 event")
    rec.wait_for(lambda ms: any(m.topic.endswith("/status") and json.loads(m.payload).get("version") == 2
                                and json.loads(m.payload)["state"] == "ACTIVE" for m in ms), 30, "status v2")
    rec.close()


def test_a_burst_of_doorbells_coalesces_into_one_or_two_checks(tiny_raw: Path, release: Release,
                                                               mosquitto: Mosquitto, tmp_path: Path,
                                                               agents: list[Agent]) -> None:
    """20 doorbells within milliseconds: one pass runs and at most one more answers every doorbell
    that came during it, counted from the repository's own access log (TUF timestamp fetches)."""
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "a", release, broker_url=mosquitto.url, poll_interval_s=3600)
    agents.append(agent.start())
    agent.wait_serving("tiny", 1)
    agent.wait(lambda: "event=probation_passed" in agent.log(), 60, "v1's probation to end (checks wait for it)")
    faults = release.faults
    with faults.lock:
        mark = len(faults.requests)
    passes_before = agent.log().count("event=check_requested")
    for n in range(20):
        publish_and_wait(mosquitto.port, f"edgefleet/{FLEET}/releases",
                         Doorbell(repo_timestamp_version=100 + n, channels=["stable"]).model_dump_json().encode())
    agent.wait(lambda: agent.log().count("event=check_requested") > passes_before
               and agent.phase() is Phase.UP_TO_DATE, 60, "the check to run")

    def timestamp_fetches() -> int:
        with faults.lock:
            return sum(1 for path, _ in faults.requests[mark:] if path.endswith("/timestamp.json"))
    # No new fetch for 3 s: no further pass is coming.
    last = {"n": timestamp_fetches(), "at": time.monotonic()}

    def quiet() -> bool:
        if (n := timestamp_fetches()) != last["n"]:
            last.update(n=n, at=time.monotonic())
        return time.monotonic() - last["at"] >= 3.0
    wait_until(quiet, 30, "the passes to settle")
    passes = agent.log().count("event=check_requested") - passes_before
    assert 1 <= passes <= 2 and 1 <= timestamp_fetches() <= 2, (passes, timestamp_fetches())
    assert "triggers=doorbell" in agent.log()


def test_while_doorbell_passes_keep_coming_no_poll_pass_runs_and_after_them_the_poll_resumes(
        tiny_raw: Path, release: Release, mosquitto: Mosquitto, tmp_path: Path, agents: list[Agent]) -> None:
    """The poll is the longest a device goes without a check: a pass for a doorbell starts its wait
    over (a crowded fleet update used to run a poll pass per interval beside the doorbell's)."""
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "a", release, broker_url=mosquitto.url, poll_interval_s=3)
    agents.append(agent.start())
    agent.wait_serving("tiny", 1)
    agent.wait(lambda: "event=probation_passed" in agent.log(), 60, "v1's probation to end (checks wait for it)")

    def polls() -> int:
        return len(re.findall(r"event=check_requested triggers=\S*poll", agent.log()))

    def passes() -> int:
        return agent.log().count("event=check_requested")

    polls_before, started, n = polls(), time.monotonic(), 0
    while time.monotonic() - started < 7.5:  # two and a half poll intervals, one doorbell pass after another
        before, n = passes(), n + 1
        publish_and_wait(mosquitto.port, f"edgefleet/{FLEET}/releases",
                         Doorbell(repo_timestamp_version=200 + n, channels=["stable"]).model_dump_json().encode())
        agent.wait(lambda before=before: passes() > before and agent.phase() is Phase.UP_TO_DATE, 30,
                   f"doorbell {n}'s pass")
    assert polls() == polls_before, f"{polls() - polls_before} poll pass(es) ran beside {n} doorbell passes"
    agent.wait(lambda: polls() > polls_before, 30, "the poll to resume once the doorbells stopped")


def test_update_found_only_by_polling(tiny_raw: Path, release: Release, tmp_path: Path,
                                      agents: list[Agent]) -> None:
    """No broker at all (broker_url unset): the poll timer alone finds v2."""
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "a", release, poll_interval_s=1.0)
    agents.append(agent.start())
    agent.wait_serving("tiny", 1)
    release.publish(tiny_raw, "tiny", 2)
    agent.wait_serving("tiny", 2, timeout_s=60)
    log = agent.log()
    assert "event=mqtt_disabled" in log and "triggers=poll" in log and "triggers=doorbell" not in log


def _persistent_broker(workdir: Path) -> Mosquitto:
    # Saves its sessions every second, so a SIGKILLed broker comes back with the
    # subscriber's session (and queues for it what arrives before it reconnects).
    from builder.demo.ports import free_port

    port = free_port()
    conf = (f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir}/\nautosave_interval 1\nlog_type all\n")
    return Mosquitto(workdir, conf_text=conf, port=port)


def test_broker_killed_mid_update_every_event_arrives_once_in_order(tiny_raw: Path, release: Release,
                                                                      tmp_path: Path, agents: list[Agent]) -> None:
    broker = _persistent_broker(tmp_path / "broker")
    broker.start()
    rec: Recorder | None = None
    try:
        release.publish(tiny_raw, "tiny", 1)
        rec = Recorder(broker.port, [f"edgefleet/{FLEET}/devices/box-1/events"], client_id="fleet-watcher")
        agent = Agent(tmp_path / "a", release, broker_url=broker.url)
        agents.append(agent.start())
        agent.wait_serving("tiny", 1)
        agent.wait(lambda: agent.phase() is Phase.ACTIVE and agent.store.current() is not None, 30, "v1 installed")
        release.publish(tiny_raw, "tiny", 2, extra_files={"pad.bin": os.urandom(6_000_000)})
        wait_until(lambda: (broker.workdir / "mosquitto.db").exists(), 10, "broker saved its sessions")
        # v2's 6 MB download at 1 MB/s leaves time to kill the broker mid-update.
        agent.write_config({**agent.config_values, "download_rate_limit_bytes_per_s": 1_000_000})
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)  # the reload also runs a check
        agent.wait(lambda: "event=download_start target=tiny v2" in agent.log(), 30, "v2 download started")
        # Kill only once nothing is in flight: the DOWNLOADING event reached the
        # subscriber and its PUBACK emptied the outbox. A kill between a PUBLISH and
        # its PUBACK makes QoS 1 deliver twice (at-least-once), which is not what
        # this test is about; what is, is every later event crossing the outage.
        rec.wait_for(lambda ms: any(json.loads(m.payload).get("version") == 2
                                    and json.loads(m.payload)["to_state"] == "DOWNLOADING" for m in ms),
                     30, "the DOWNLOADING v2 event")
        outbox_events = agent.store.outbox_dir / "events"
        wait_until(lambda: not any(p.suffix == ".json" for p in outbox_events.iterdir()), 30, "an empty outbox")
        # The same on the broker's side: the subscriber's PUBACK (sent as it received the event) is
        # in the session the broker saves every second; killed before that save, the broker comes
        # back with the event still in flight to the subscriber and delivers it twice.
        acked = time.time() + 0.1
        wait_until(lambda: (broker.workdir / "mosquitto.db").stat().st_mtime > acked, 10,
                   "the broker saving its sessions after the subscriber's PUBACK")
        broker.kill()
        agent.wait(lambda: "event=mqtt_connect_failed" in agent.log(), 30, "the agent noticing the broker is gone")
        # The update goes on while the broker is down: its events wait in the outbox.
        agent.wait(lambda: "to=VERIFYING trigger=DOWNLOADED target=tiny v2" in agent.log(), 30, "v2 downloaded")
        broker.start()
        agent.wait_serving("tiny", 2, timeout_s=60)
        agent.wait(lambda: agent.store.current() == agent.store.model_dir("tiny", 2).resolve(), 30, "v2 current")

        expected_after_check = ["CHECKING", "DOWNLOADING", "VERIFYING", "INSTALLING", "ACTIVATING", "ACTIVE"]

        def v2_done(ms: list) -> bool:
            return any(json.loads(m.payload).get("version") == 2 and json.loads(m.payload)["to_state"] == "ACTIVE"
                       for m in ms)
        rec.wait_for(v2_done, 60, "the ACTIVE v2 event")
        events = rec.payloads("/events")
        seqs = [e["seq"] for e in events]
        # Counted raw: no duplicate, no gap, in order, from the very first event of the device.
        assert seqs == list(range(1, len(seqs) + 1)), seqs
        v2 = [e["to_state"] for e in events if e.get("version") == 2]
        assert v2 == expected_after_check[1:]
        assert [e["to_state"] for e in events][-len(expected_after_check):] == expected_after_check
        assert "event=mqtt_connected" in agent.log().split("event=mqtt_connect_failed")[-1]  # reconnected
    finally:
        if rec is not None:
            rec.close()
        broker.kill()


def test_sigkill_publishes_the_will_and_a_restart_is_online_with_the_right_model(
        tiny_raw: Path, release: Release, mosquitto: Mosquitto, tmp_path: Path, agents: list[Agent]) -> None:
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "a", release, broker_url=mosquitto.url)
    agents.append(agent.start())
    agent.wait_serving("tiny", 1)
    topic = f"edgefleet/{FLEET}/devices/box-1/status"
    rec = Recorder(mosquitto.port, [topic])
    try:
        rec.wait_for(lambda ms: any(json.loads(m.payload)["online"] and json.loads(m.payload)["version"] == 1
                                    for m in ms), 30, "online status with v1")
        # MQTT fixes the will at CONNECT and v1 came after the first connect: the link reconnects
        # cleanly to give its will the new model (a crash before that names the old one).
        agent.wait(lambda: "event=mqtt_will_refresh model=tiny version=1" in agent.log()
                   and agent.log().split("event=mqtt_will_refresh")[1].count("event=mqtt_connected") == 1,
                   30, "will refreshed")
        agent.kill(signal.SIGKILL)
        rec.wait_for(lambda ms: not json.loads(ms[-1].payload)["online"], 30, "the will: online false")
        will = json.loads(rec.messages[-1].payload)
        assert will["device_id"] == "box-1" and will["online"] is False
        assert (will["model"], will["version"]) == ("tiny", 1)
        assert "event=mqtt_disconnected" not in agent.log()  # the refresh is not a lost connection
    finally:
        rec.close()
    # A new subscriber sees the retained status: offline.
    late = Recorder(mosquitto.port, [topic])
    try:
        late.wait_for(lambda ms: len(ms) >= 1, 10, "retained status")
        assert late.messages[0].retain and json.loads(late.messages[0].payload)["online"] is False
        n = len(late.messages)
        agent.start()
        agent.wait_serving("tiny", 1)
        late.wait_for(lambda ms: len(ms) > n and json.loads(ms[-1].payload)["online"], 30, "online again")
        status = json.loads(late.messages[-1].payload)
        assert (status["model"], status["version"]) == ("tiny", 1)
    finally:
        late.close()


BAD_PAYLOADS = [
    (b"not json at all", "not_json"),
    (b"{" + b" " * 20_000 + b"}", "oversized"),
    (b'{"schema_version": 2, "repo_timestamp_version": 3}', "unknown_schema"),
    (b'{"schema_version": 1, "repo_timestamp_version": "three", "command": 7}', "invalid"),
]


def test_malformed_oversized_and_unknown_payloads_are_dropped_and_counted(
        tiny_raw: Path, release: Release, mosquitto: Mosquitto, tmp_path: Path, agents: list[Agent]) -> None:
    release.publish(tiny_raw, "tiny", 1)
    agent = Agent(tmp_path / "a", release, broker_url=mosquitto.url, telemetry_interval_s=0.3)
    agents.append(agent.start())
    agent.wait_serving("tiny", 1)
    agent.wait(lambda: "event=mqtt_connected" in agent.log(), 30, "MQTT connected")
    telemetry = Recorder(mosquitto.port, [f"edgefleet/{FLEET}/devices/box-1/telemetry"])
    try:
        for topic in (f"edgefleet/{FLEET}/releases", f"edgefleet/{FLEET}/devices/box-1/commands"):
            for payload, _ in BAD_PAYLOADS:
                publish_and_wait(mosquitto.port, topic, payload)
        telemetry.wait_for(lambda ms: any(json.loads(m.payload)["incoming_dropped_total"] == 8 for m in ms),
                           30, "telemetry counting 8 dropped payloads")
        log = agent.log()
        for _, reason in BAD_PAYLOADS:
            assert log.count("event=mqtt_payload_dropped") == 8 and log.count(f"reason={reason}") == 2
        assert "triggers=doorbell" not in log and "triggers=check_now" not in log
        # Healthy: it serves, and a valid command still works.
        assert agent.chat().status_code == 200
        publish_and_wait(mosquitto.port, f"edgefleet/{FLEET}/devices/box-1/commands",
                         b'{"schema_version": 1, "command": "check_now"}')
        agent.wait(lambda: "triggers=check_now" in agent.log(), 30, "check_now handled")
        # `report` answers with a fresh sample at once (the telemetry timer alone would take 0.3 s).
        status = Recorder(mosquitto.port, [f"edgefleet/{FLEET}/devices/box-1/status"])
        try:
            status.wait_for(lambda ms: len(ms) >= 1, 10, "retained status")
            n = len(status.messages)
            publish_and_wait(mosquitto.port, f"edgefleet/{FLEET}/devices/box-1/commands",
                             b'{"schema_version": 1, "command": "report"}')
            status.wait_for(lambda ms: len(ms) > n, 10, "status republished on report")
            assert json.loads(status.messages[-1].payload)["version"] == 1
        finally:
            status.close()
        telemetry.wait_for(lambda ms: json.loads(ms[-1].payload)["requests_total"] >= 1, 30, "a counted request")
        sample = json.loads(telemetry.messages[-1].payload)
        assert (sample["model"], sample["version"]) == ("tiny", 1) and sample["queue_depth"] == 0
    finally:
        telemetry.close()


def test_systemd_notify_watchdog_reload_and_clean_stop(tiny_raw: Path, release: Release, mosquitto: Mosquitto,
                                                      tmp_path: Path, agents: list[Agent]) -> None:
    """A fake NOTIFY_SOCKET (a real unix datagram socket) gets READY=1, STATUS= and WATCHDOG=1;
    SIGHUP reloads the config (a broker appears: the link is built); SIGTERM exits 0."""
    release.publish(tiny_raw, "tiny", 1)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    got: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return got

    try:
        agent = Agent(tmp_path / "a", release)
        agents.append(agent.start(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000"))
        wait_until(lambda: any("READY=1" in m for m in drain()), 60, "READY=1")
        ready = next(m for m in got if "READY=1" in m)
        assert "STATUS=" in ready
        n = len(got)
        wait_until(lambda: sum("WATCHDOG=1" in m for m in drain()[n:]) >= 3, 10, "3 watchdog pings")
        agent.wait_serving("tiny", 1)
        assert any(m.startswith("STATUS=ACTIVE") for m in drain())

        status_topic = f"edgefleet/{FLEET}/devices/box-1/status"
        rec = Recorder(mosquitto.port, [status_topic])
        try:
            agent.write_config({**agent.config_values, "broker_url": mosquitto.url})
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            rec.wait_for(lambda ms: any(json.loads(m.payload)["online"] for m in ms), 30, "status after reload")
            status = json.loads(rec.messages[-1].payload)
            assert (status["model"], status["version"]) == ("tiny", 1)
            assert any("RELOADING=1" in m for m in drain())
            assert agent.kill(signal.SIGTERM) == 0, agent.log_tail()
            rec.wait_for(lambda ms: json.loads(ms[-1].payload)["online"] is False, 10, "clean offline status")
        finally:
            rec.close()
        assert any("STOPPING=1" in m for m in drain())
        assert "event=stopped" in agent.log()
    finally:
        sock.close()


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    from testkit.env import subprocess_env

    toml = tmp_path / "agent.toml"
    cases = [('device_id = "d"\nrepo_url = "http://127.0.0.1:9"\npoll_intervall_s = 5\n',
              "'poll_intervall_s': unknown key"),
             ('device_id = "d"\nrepo_url = "ftp://x"\n', "'repo_url'"),
             ('device_id = "d"\nrepo_url = "http://127.0.0.1:9"\nswitch_mode = "fast"\n', "'switch_mode'")]
    for text, reason in cases:
        toml.write_text(text)
        done = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(toml)], env=subprocess_env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.strip().count("\n") == 0 and reason in done.stderr, done.stderr

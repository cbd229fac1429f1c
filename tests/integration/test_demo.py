"""`make demo` end to end (`python -m builder.demo --quick`), and its embedded broker.

The demo runs as a real subprocess with real parts (Mosquitto, the SmolLM2 build,
the TUF repository server, two `edge-agent run` daemons, `edge-builder rollout`).
Each step's outcome is read from the summary JSON the demo writes, then checked
against the live system (the fleet answers while it is up) and against /proc
(nothing it started is left once it stopped). With EDGEFLEET_TEST_CACHE set, the
builds are reused between runs; on CI they are built afresh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from builder.demo.ports import free_port
from builder.demo.procs import group_members
from builder.demo.summary import DemoSummary
from testkit.brokers import Recorder, publish_and_wait
from testkit.env import subprocess_env
from testkit.waits import wait_until


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line names `text` (the demo's work dir): agents, their model
    workers, the broker config, the served www/ dir."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append((int(entry), cmdline))
    return found


def _read_summary(path: Path) -> DemoSummary | None:
    try:
        return DemoSummary.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("broker", ["auto", "amqtt"])
def test_demo_quick_end_to_end_then_ctrl_c_leaves_nothing_running(tmp_path: Path, model_cache_dir: Path,
                                                                  broker: str) -> None:
    """`auto` is what `make demo` runs (Mosquitto here); `amqtt` is the fallback of a machine without it.
    The builds are shared, so the second run reuses them."""
    workdir = tmp_path / "demo-out"
    summary_path = workdir / "summary.json"
    log_path = tmp_path / "demo.log"
    argv = [sys.executable, "-m", "builder.demo", "--quick", "--keep-running", "--broker", broker,
            "--workdir", str(workdir),
            "--cache-dir", str(model_cache_dir / "builder-cache"),
            "--artifacts-dir", str(model_cache_dir / "demo-artifacts")]
    with open(log_path, "wb") as log:
        # Started with SIGINT ignored, as a shell without job control (a CI runner) starts a
        # command with `&`: Ctrl-C below must stop the demo all the same.
        demo = subprocess.Popen(argv, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        # --keep-running writes the summary with is_fleet_up once every step is done; a failure
        # ends the process instead.
        def fleet_up_or_ended() -> bool:
            s = _read_summary(summary_path)
            return demo.poll() is not None or (s is not None and s.is_fleet_up)

        wait_until(fleet_up_or_ended, 1400, "the demo to bring its fleet up", interval_s=0.5)
        output = log_path.read_text(errors="replace")
        assert demo.poll() is None, f"the demo ended early with {demo.returncode}:\n{output[-6000:]}"
        up = _read_summary(summary_path)
        assert up is not None and up.ok, output[-6000:]

        # While up: every long-running part it started is alive, and the parts answer.
        names = {p.name for p in up.processes}
        assert {"broker", "repo-server"} <= names
        for p in up.processes:
            assert Path(f"/proc/{p.pid}").exists(), f"{p.name} (pid {p.pid}) is not running while the fleet is up"
            # What a later demo's kill_leftovers needs to stop it if this demo is SIGKILLed.
            cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            assert str(workdir) in cmdline, f"{p.name}'s command line does not name the run: {cmdline}"
        assert up.repo is not None
        assert requests.get(f"{up.repo.url}/metadata/root.json", timeout=5).status_code == 200
        for dev in up.devices:
            health = requests.get(f"{dev.api_url}/healthz", timeout=5)
            assert health.status_code == 200, health.text
            assert health.json()["version"] == 2
        # The demo's "0 failed requests" checked against the devices' own counters (/metrics):
        # every chat request a device saw was answered 200, at least as many as the demo counted.
        assert up.rollout is not None
        for dev in up.devices:
            chat = _chat_requests_by_status(requests.get(f"{dev.api_url}/metrics", timeout=5).text)
            assert set(chat) == {200}, chat
            assert chat[200] >= up.rollout.requests_by_device[dev.device_id] >= 2, (chat, up.rollout)

        # Ctrl-C: the demo stops everything and exits 0 (keep-running ends this way).
        os.kill(demo.pid, signal.SIGINT)
        rc = demo.wait(120)
        output = log_path.read_text(errors="replace")
        assert rc == 0, output[-4000:]
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
        # Whatever the demo failed to stop must not outlive the test either.
        for pid, _ in _processes_mentioning(str(workdir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    summary = DemoSummary.model_validate_json(summary_path.read_text())
    assert summary.ok and summary.error is None, summary.error
    assert not summary.is_fleet_up

    # 1. broker
    assert summary.broker is not None
    assert summary.broker.kind == ("mosquitto" if broker == "auto" and _has_mosquitto() else "amqtt")
    assert summary.broker.url.startswith("mqtt://127.0.0.1:")
    # 2. two builds that passed the quality gate, with their figures
    v1 = summary.artifacts[0]
    assert (v1.name, v1.version, v1.context_length) == ("smollm2", 1, 2048)
    assert 1.0 < v1.perplexity_ratio <= v1.max_perplexity_ratio == 1.5
    assert v1.perplexity == pytest.approx(v1.perplexity_ratio * v1.reference_perplexity, rel=1e-6)
    assert v1.decode_tokens_per_s > 0 and v1.peak_rss_bytes > 100 * 2**20
    assert 50 * 2**20 < v1.total_file_bytes < 200 * 2**20  # INT4 SmolLM2-135M: ~86 MiB
    assert (Path(v1.out_dir) / "manifest.json").is_file()
    assert "perplexity" in output and "quality gate passed" in output
    # 3. repository: signed, served, channel set
    assert summary.repo is not None and summary.repo.channel == "stable"
    root = json.loads(Path(summary.repo.root_json).read_text())
    assert root["signed"]["_type"] == "root"
    expected_steps = ["step_broker", "step_build_v1", "step_repository", "step_agents", "step_wait_active",
                      "step_ask", "step_rollout", "step_where"]
    # 4.-6. two devices provisioned with root.json only, ACTIVE on v1, each answered
    assert [d.device_id for d in summary.devices] == ["demo-box-1", "demo-box-2"]
    assert len({d.api_url for d in summary.devices}) == 2 and len({d.state_dir for d in summary.devices}) == 2
    for dev in summary.devices:
        assert dev.first_active_version == 1
        assert dev.answer and dev.answer.strip(), f"{dev.device_id} gave no answer"
        assert (Path(dev.state_dir) / "trust" / "root.json").read_bytes() == Path(summary.repo.root_json).read_bytes()
    assert summary.fleet_status_table and "demo-box-1" in summary.fleet_status_table
    assert "ACTIVE" in summary.fleet_status_table
    # 7. v2 reached both devices in two waves with zero failed requests
    v2 = summary.artifacts[1]
    assert v2.version == 2 and "k_quant_mixed" in v2.recipe and v2.perplexity_ratio <= v2.max_perplexity_ratio
    assert summary.repo.published_versions == [1, 2]
    r = summary.rollout
    assert r is not None
    assert r.phase == "SUCCEEDED" and r.waves == [50, 100] and r.first_wave_devices == ["demo-box-1"]
    assert r.requests_failed == 0, r.failures
    assert all(n >= 2 for n in r.requests_by_device.values()), r.requests_by_device
    for dev in summary.devices:
        assert dev.final_state in ("ACTIVE", "UP_TO_DATE") and dev.final_version == 2
        first_v2 = [c.t_s for c in r.timeline if c.device_id == dev.device_id and c.version == 2]
        assert first_v2, f"{dev.device_id} never reported v2"
    # the first wave's device got v2 before the second wave's device did
    when = {d: min(c.t_s for c in r.timeline if c.device_id == d and c.version == 2)
            for d in ("demo-box-1", "demo-box-2")}
    assert when["demo-box-1"] < when["demo-box-2"]
    assert summary.steps_done == expected_steps

    # 8. nothing left running: the demo's own account, each process group, and /proc by work dir
    assert summary.leftover_pids == []
    assert summary.processes, "the summary lists the processes it started"
    for p in summary.processes:
        assert group_members(p.pgid) == [], f"{p.name}'s process group {p.pgid} still has processes"
    assert _processes_mentioning(str(workdir)) == []


def _chat_requests_by_status(metrics_text: str) -> dict[int, int]:
    """`edgefleet_requests_total` of /v1/chat/completions by status code, from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[int, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "edgefleet_requests_total" and sample.labels["endpoint"] == "/v1/chat/completions":
                counts[int(sample.labels["status"])] = int(sample.value)
    return counts


def _has_mosquitto() -> bool:
    from builder.demo.broker import mosquitto_binary

    return mosquitto_binary() is not None


def test_embedded_broker_keeps_retained_messages_and_wills_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The amqtt fallback for machines without Mosquitto does what the fleet needs of a broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    port = free_port()
    broker = subprocess.Popen([sys.executable, "-m", "builder.demo.broker", "--port", str(port)],
                              env=subprocess_env(), stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert broker.stderr is not None
        ready = broker.stderr.readline().decode()
        assert f"event=broker_ready kind=amqtt port={port}" in ready
        status_topic = "edgefleet/demo/devices/box-a/status"
        publish_and_wait(port, status_topic, b'{"online": true}', retain=True)
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="box-b", clean_session=False)
        device.will_set("edgefleet/demo/devices/box-b/status", b'{"online": false}', qos=1, retain=True)
        device.connect("127.0.0.1", port, keepalive=5)
        device.loop_start()
        wait_until(device.is_connected, 10, "box-b connected")
        device.loop_stop()
        device.socket().close()  # vanish without DISCONNECT: the broker must publish the will
        recorder = Recorder(port, ["edgefleet/demo/devices/+/status"])
        try:
            recorder.wait_for(lambda ms: {m.topic for m in ms} >= {status_topic, "edgefleet/demo/devices/box-b/status"},
                              15, "the retained status and box-b's will")
            got = {m.topic: (m.payload, m.retain) for m in recorder.messages}
            assert got[status_topic] == (b'{"online": true}', True)
            assert got["edgefleet/demo/devices/box-b/status"][0] == b'{"online": false}'
        finally:
            recorder.close()
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(15) == 0
    finally:
        if broker.poll() is None:
            os.killpg(broker.pid, signal.SIGKILL)
            broker.wait(10)


def test_demo_salt_splits_two_devices_into_two_waves() -> None:
    from agent.wire.channel import cohort_bucket
    from builder.demo.story import DEVICE_IDS, choose_salt

    salt = choose_salt(DEVICE_IDS, 50)
    assert cohort_bucket(salt, DEVICE_IDS[0]) < 50 <= cohort_bucket(salt, DEVICE_IDS[1])
    assert choose_salt(DEVICE_IDS, 50) == salt  # stable: the same demo every run


def test_kill_leftovers_stops_only_the_recorded_groups_that_name_the_run_dir(tmp_path: Path) -> None:
    """After a demo killed with SIGKILL, the next run stops what it left (its run dir in the command line),
    and nothing else, even in a recorded group."""
    from builder.demo.procs import kill_leftovers

    run_dir = tmp_path / "run"
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    marked = subprocess.Popen([*sleeper, str(run_dir)], start_new_session=True)
    other = subprocess.Popen(sleeper, start_new_session=True)
    unrecorded = subprocess.Popen([*sleeper, str(run_dir)], start_new_session=True)
    try:
        record = tmp_path / "processes.json"
        record.write_text(json.dumps([marked.pid, other.pid]))
        assert kill_leftovers(record, str(run_dir)) == [marked.pid]
        assert marked.wait(10) == -signal.SIGKILL
        assert other.poll() is None and unrecorded.poll() is None
        assert kill_leftovers(tmp_path / "missing.json", str(run_dir)) == []
    finally:
        for p in (marked, other, unrecorded):
            if p.poll() is None:
                p.kill()
                p.wait(10)

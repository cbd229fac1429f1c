"""A fleet update, end to end, with N real `edge-agent run` processes.

For each N: one real Mosquitto, the real repository server, N agents (tiny
random-weight INT4 Llama, testkit/fleet.py) installed on v1. Then --rounds
pairs of updates of the same fleet, each a channel change to 100% onto a
freshly built model (new weights, so every update downloads the same amount):

  baseline   signed, no doorbell: devices find it on their poll
             (poll_interval_s = --poll, so the expected wait is about poll/2)
  candidate  signed and the doorbell rung (what `rollout` does)

The two alternate, in swapped order every round (poll first, then doorbell
first), so that neither is always the fleet's first or second update.

Reported per mode, the median over its rounds: time from the signing to the
last device ACTIVE, the per-device time (median, p90), the share of the summed
device time spent waiting for the check to start (doorbell / poll), checking,
downloading + verifying + installing, and activating (from each device's own
event timestamps), and broker messages per device per update, counted, not
assumed: what the devices published on the fleet topics (seen by a subscriber)
plus every PUBLISH the broker sent to a device (its own log, `log_type all`), and the
update passes each device ran, by what asked for them (its own log).

    python bench/fleet.py --agents 20 [--agents 50 ...] [--poll 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime_genai  # noqa: E402
import paho.mqtt  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.wire.broker import BrokerCredentials  # noqa: E402
from agent.wire.channel import ChannelFile  # noqa: E402
from agent.wire.mqtt import Doorbell, parse_device_topic  # noqa: E402
from builder.fleet.session import ring_doorbell  # noqa: E402
from testkit.artifacts import new_repo, serving  # noqa: E402
from testkit.brokers import Mosquitto  # noqa: E402
from testkit.fleet import Fleet, make_fleet, make_fleet_artifact, tiny_int4_build  # noqa: E402

FLEET = "bench"
# Short, so that rounds follow each other quickly; the bench waits for each window to end.
PROBATION_S = 3.0
_PHASES = ("wait_check", "check", "download_verify_install", "activate")


@dataclass
class Traffic:
    """Everything published on edgefleet/bench/#, with arrival times."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: list[tuple[float, str, bytes]] = field(default_factory=list)

    def add(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append((time.time(), topic, payload))

    def since(self, t0: float) -> list[tuple[float, str, bytes]]:
        with self.lock:
            return [m for m in self.messages if m[0] >= t0]

    def statuses(self) -> dict[str, dict[str, object]]:
        out: dict[str, dict[str, object]] = {}
        with self.lock:
            for _, topic, payload in self.messages:
                parsed = parse_device_topic(topic)
                if parsed and parsed[2] == "status" and payload:
                    out[parsed[1]] = json.loads(payload)
        return out


def _subscribe(port: int, traffic: Traffic) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}")
    client.on_message = lambda c, u, m: traffic.add(m.topic, m.payload)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"edgefleet/{FLEET}/#", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _wait_all(traffic: Traffic, n: int, version: int, timeout_s: float, fleet: object) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        st = traffic.statuses()
        if len(st) == n and all(s["version"] == version and s["state"] in ("ACTIVE", "UP_TO_DATE")
                                for s in st.values()):
            return time.time()
        dead = fleet.dead()  # type: ignore[attr-defined]
        if dead:
            raise SystemExit(f"agents exited: {dead}\n{fleet.log_tail(dead[0])}")  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            states: dict[tuple[object, object], int] = {}
            for s in st.values():
                states[(s["state"], s["version"])] = states.get((s["state"], s["version"]), 0) + 1
            raise SystemExit(f"timed out waiting for {n} devices on v{version}: {len(st)} seen, {states}")
        time.sleep(0.1)


def _ts(value: object) -> float:
    return dt.datetime.fromisoformat(str(value)).timestamp()


def _analyse(traffic: Traffic, t0: float, t_done: float, n: int, version: int) -> dict[str, object]:
    msgs = traffic.since(t0)
    per_device: dict[str, dict[str, float]] = {}
    device_msgs = 0
    by_kind: dict[str, int] = {"events": 0, "status": 0, "telemetry": 0}
    for _, topic, payload in msgs:
        parsed = parse_device_topic(topic)
        if parsed is None:
            continue
        device_msgs += 1
        by_kind[parsed[2]] = by_kind.get(parsed[2], 0) + 1
        if parsed[2] != "events" or not payload:
            continue
        e = json.loads(payload)
        marks = per_device.setdefault(parsed[1], {})
        to_state = e.get("to_state")
        if to_state == "CHECKING":
            # The last check before the download started is the one that found the update.
            if "DOWNLOADING" not in marks:
                marks["CHECKING"] = _ts(e["timestamp"])
        elif to_state in ("DOWNLOADING", "ACTIVATING", "ACTIVE") and e.get("version") in (version, None):
            marks.setdefault(to_state, _ts(e["timestamp"]))
    totals: list[float] = []
    sums = dict.fromkeys(_PHASES, 0.0)
    for marks in per_device.values():
        if not all(k in marks for k in ("CHECKING", "DOWNLOADING", "ACTIVATING", "ACTIVE")):
            continue
        parts = {"wait_check": marks["CHECKING"] - t0, "check": marks["DOWNLOADING"] - marks["CHECKING"],
                 "download_verify_install": marks["ACTIVATING"] - marks["DOWNLOADING"],
                 "activate": marks["ACTIVE"] - marks["ACTIVATING"]}
        for k, v in parts.items():
            sums[k] += max(0.0, v)
        totals.append(marks["ACTIVE"] - t0)
    whole = sum(sums.values()) or 1.0
    totals.sort()
    return {
        "last_active_s": t_done - t0,
        "device_median_s": statistics.median(totals) if totals else float("nan"),
        "device_p90_s": totals[int(0.9 * (len(totals) - 1))] if totals else float("nan"),
        "timed_devices": len(totals),
        **{f"share_{k}": sums[k] / whole for k in _PHASES},
        "messages_per_device": device_msgs / n,
        **{f"{kind}_per_device": count / n for kind, count in by_kind.items() if kind != "commands"},
    }


def _deliveries_to_devices(log_path: Path, offset: int, device_ids: set[str]) -> int:
    """PUBLISH packets the broker sent to a device since byte `offset` of its log."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return sum(1 for line in text.splitlines()
               if "Sending PUBLISH to " in line and line.split("Sending PUBLISH to ", 1)[1].split(" ", 1)[0]
               in device_ids)


def run_one(n: int, poll_s: int, rounds: int, cache: Path, tokenizer_dir: Path,
            work: Path) -> dict[str, list[dict[str, object]]]:
    """{"poll": [result per round], "doorbell": [...]}."""
    order = [mode for k in range(rounds) for mode in (("poll", "doorbell") if k % 2 == 0 else ("doorbell", "poll"))]
    builds = [tiny_int4_build(cache, tokenizer_dir, seed) for seed in range(1, len(order) + 2)]
    repo = new_repo(work / "repo")
    for v, raw in enumerate(builds, start=1):
        repo.publish(make_fleet_artifact(raw, work / f"art{v}", "tiny", v))
    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=1))
    broker = Mosquitto(work / "broker")
    broker.start()
    traffic = Traffic()
    sub = _subscribe(broker.port, traffic)
    try:
        with serving(repo.www_dir) as (url, _faults):
            fleet = make_fleet(work / "devices", repo, url, broker.url, FLEET, n, poll_interval_s=poll_s,
                               probation_s=PROBATION_S)
            device_ids = {a.device_id for a in fleet.agents}
            started = time.time()
            fleet.start()
            try:
                ready = _wait_all(traffic, n, 1, 600, fleet)
                rss = 0  # the agent process and its model worker
                for a in fleet.agents:
                    if a.proc is not None:
                        parent = psutil.Process(a.proc.pid)
                        rss += sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
                print(f"n={n}: {n} agents ACTIVE on v1 after {ready - started:.1f} s; total agent RSS "
                      f"{rss / 2**20:.0f} MiB ({rss / n / 2**20:.0f} MiB each)", file=sys.stderr)
                results: dict[str, list[dict[str, object]]] = {"poll": [], "doorbell": []}
                for version, mode in enumerate(order, start=2):
                    # Every device past the last switch's probation (checks wait for it: measured, it
                    # would be the probation, not the poll or the doorbell), then 1 s without a message.
                    _wait_probations(fleet, version - 1)
                    while time.time() - max((m[0] for m in traffic.since(time.time() - 5)), default=0) < 1.0:
                        time.sleep(0.1)
                    log_offset = broker.log_path.stat().st_size
                    device_offsets = _device_log_offsets(fleet)
                    t0 = time.time()
                    repo.set_channel(ChannelFile(channel="stable", model="tiny", version=version))
                    if mode == "doorbell":
                        ring_doorbell(broker.url, BrokerCredentials(), FLEET,
                                      Doorbell(repo_timestamp_version=repo.timestamp().version, channels=["stable"]))
                    done = _wait_all(traffic, n, version, 600 + poll_s, fleet)
                    r = _analyse(traffic, t0, done, n, version)
                    sent = _deliveries_to_devices(broker.log_path, log_offset, device_ids)
                    r["to_devices_per_device"] = sent / n
                    r.update(_checks_per_device(fleet, device_offsets))
                    r["messages_per_device"] = float(r["messages_per_device"]) + sent / n
                    print(f"n={n}: v{version} by {mode}: last device ACTIVE after {r['last_active_s']:.1f} s",
                          file=sys.stderr)
                    results[mode].append(r)
                return results
            finally:
                fleet.close()
    finally:
        sub.disconnect()
        sub.loop_stop()
        broker.kill()


def _device_log_offsets(fleet: Fleet) -> dict[Path, int]:
    logs = [a.state_dir.parent / f"{a.device_id}.log" for a in fleet.agents]
    return {log: log.stat().st_size if log.exists() else 0 for log in logs}


def _checks_per_device(fleet: Fleet, offsets: dict[Path, int]) -> dict[str, float]:
    """Update passes each device ran since `offsets`, counted from its own log, and what asked for them
    (a pass asked for by two triggers at once counts for each)."""
    passes, triggers = 0, {t: 0 for t in ("doorbell", "poll", "check_now", "startup", "other")}
    for log, offset in offsets.items():
        with open(log, "rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                if "event=check_requested triggers=" in line:
                    passes += 1
                    for trigger in line.rsplit("triggers=", 1)[1].strip().split(","):
                        triggers[trigger if trigger in triggers else "other"] += 1
    n = len(offsets) or 1
    return {"checks_per_device": passes / n, **{f"checks_by_{t}_per_device": c / n for t, c in triggers.items()}}


def _wait_probations(fleet: Fleet, passed: int, timeout_s: float = 300.0) -> None:
    """Until every agent's log shows `passed` probation windows ended."""
    deadline = time.monotonic() + timeout_s
    for a in fleet.agents:
        log = a.state_dir.parent / f"{a.device_id}.log"
        while log.read_text(errors="replace").count("event=probation_passed") < passed:
            if time.monotonic() > deadline:
                raise SystemExit(f"{a.device_id}: probation {passed} never ended:\n{fleet.log_tail(a.device_id)}")
            time.sleep(0.1)


def _median_of(results: list[dict[str, object]], key: str) -> object:
    values = [r[key] for r in results]
    if all(isinstance(v, (int, float)) for v in values):
        return statistics.median(float(v) for v in values)  # type: ignore[arg-type]
    return values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, action="append", help="fleet size (repeatable); default 20")
    parser.add_argument("--poll", type=int, default=20, help="poll_interval_s of the agents (the baseline)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of updates, poll and doorbell, in swapped order")
    parser.add_argument("--cache", default="/work/cache", help="where the tiny builds are cached")
    args = parser.parse_args()
    cache = Path(args.cache)
    tokenizer_dir = cache / "smollm2-hf"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        from builder.build.convert import gguf_to_hf_dir
        from builder.build.sources import smollm2_gguf_path
        gguf_to_hf_dir(smollm2_gguf_path(), tokenizer_dir)
    print(f"python {platform.python_version()}, onnxruntime-genai {onnxruntime_genai.__version__}, "
          f"paho-mqtt {paho.mqtt.__version__}, {platform.machine()}, {psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; baseline = poll every {args.poll} s, "
          "candidate = doorbell")
    rows = []
    for n in args.agents or [20]:
        with tempfile.TemporaryDirectory(prefix=f"bench-fleet-{n}-") as tmp:
            results = run_one(n, args.poll, args.rounds, cache, tokenizer_dir, Path(tmp))
        rows.append((n, results["poll"], results["doorbell"]))
    print(f"medians of {args.rounds} update(s) per mode")
    print("| agents | metric | poll (baseline) | doorbell (candidate) | doorbell/poll |")
    print("| --- | --- | --- | --- | --- |")
    for n, base, cand in rows:
        for key, fmt in (("last_active_s", "{:.1f}"), ("device_median_s", "{:.1f}"), ("device_p90_s", "{:.1f}"),
                         ("share_wait_check", "{:.0%}"), ("share_check", "{:.0%}"),
                         ("share_download_verify_install", "{:.0%}"), ("share_activate", "{:.0%}"),
                         ("messages_per_device", "{:.1f}"), ("to_devices_per_device", "{:.1f}"),
                         ("events_per_device", "{:.1f}"), ("checks_per_device", "{:.1f}"),
                         ("checks_by_doorbell_per_device", "{:.1f}"), ("checks_by_poll_per_device", "{:.1f}"),
                         ("checks_by_other_per_device", "{:.1f}"),
                         ("status_per_device", "{:.1f}"), ("telemetry_per_device", "{:.1f}"),
                         ("timed_devices", "{}")):
            b, c = _median_of(base, key), _median_of(cand, key)
            ratio = f"{float(c) / float(b):.2f}" if isinstance(b, float) and b else ""
            print(f"| {n} | {key} | {fmt.format(b)} | {fmt.format(c)} | {ratio} |")


if __name__ == "__main__":
    main()

"""Cost of durable events: a raw paho QoS 1 publish (baseline) against
MqttLink.publish_event, which fsyncs the event into the outbox first and
removes it on PUBACK (candidate). Both against the same local Mosquitto, the
latency from the publish call until a subscriber has the message.

Then the footprint of an idle, connected link process (testkit/link_process.py)
against a bare Python interpreter: RSS and CPU seconds over an idle window.

    python bench/mqtt_link.py [-n 200]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.config import AgentConfig  # noqa: E402
from agent.link.backoff import Backoff  # noqa: E402
from agent.link.mqtt import MqttLink  # noqa: E402
from agent.link.outbox import Outbox  # noqa: E402
from testkit.brokers import Mosquitto, mosquitto_binary  # noqa: E402


class Arrivals:
    def __init__(self, port: int, topic: str) -> None:
        self.cond = threading.Condition()
        self.count = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit(f"no SUBACK for {topic} from the broker on port {port}")

    def _on_message(self, *args: object) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def wait(self, n: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.count >= n, timeout=10):
                raise SystemExit(f"message {n} never arrived")


def measure(publish: object, arrivals: Arrivals, n: int) -> list[float]:
    out = []
    for _ in range(n):
        target = arrivals.count + 1
        t0 = time.perf_counter()
        publish()  # type: ignore[operator]
        arrivals.wait(target)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[int(0.9 * (len(xs) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "broker")
        broker.start()
        try:
            topic = "edgefleet/bench/devices/dev-1/events"
            arrivals = Arrivals(broker.port, topic)
            raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw")
            raw.connect("127.0.0.1", broker.port)
            raw.loop_start()
            baseline = measure(lambda: raw.publish(topic, b'{"seq": 1}', qos=1), arrivals, args.n)
            raw.disconnect()
            raw.loop_stop()

            config = AgentConfig(device_id="dev-1", fleet="bench", repo_url="http://127.0.0.1:9",
                                 state_dir=Path(tmp) / "state", broker_url=broker.url)
            link = MqttLink(config, Outbox(config.state_dir / "outbox"), backoff=Backoff(0.05, 0.5))
            link.start()
            link.wait_connected(10)
            candidate = measure(lambda: link.publish_event("transition", from_state="A", to_state="B"),
                                arrivals, args.n)
            link.stop()
        finally:
            broker.kill()
        fs_type = subprocess.run(["stat", "-f", "-c", "%T", tmp], capture_output=True, text=True).stdout.strip()
        footprint = idle_footprint(Path(tmp))
    version = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    b, c = stats(baseline), stats(candidate)
    print(f"n={args.n}  python {platform.python_version()}  paho-mqtt {paho.mqtt.__version__}  {version}")
    print(f"outbox on a {fs_type} filesystem ({tmp})")
    print("metric (ms, publish -> subscriber has it) | paho QoS1 direct | link+outbox (fsync) | candidate/baseline")
    print(f"median                                    | {b[0]:16.3f} | {c[0]:19.3f} | {c[0] / b[0]:.2f}")
    print(f"p90                                       | {b[1]:16.3f} | {c[1]:19.3f} | {c[1] / b[1]:.2f}")
    print()
    print(f"idle footprint over {IDLE_S:.0f} s | bare python | connected link process | link/bare")
    (b_rss, b_cpu), (l_rss, l_cpu) = footprint
    print(f"RSS MiB                  | {b_rss:11.1f} | {l_rss:22.1f} | {l_rss / b_rss:.2f}")
    print(f"CPU s                    | {b_cpu:11.3f} | {l_cpu:22.3f} | -")
    return 0


IDLE_S = 10.0


def _footprint(cmd: list[str], ready: str) -> tuple[float, float]:
    import psutil

    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if ready not in line:
            raise SystemExit(f"{cmd[:3]} did not start: {line!r}")
        p = psutil.Process(proc.pid)
        time.sleep(1.0)  # settle after the connect
        cpu0 = sum(p.cpu_times()[:2])
        time.sleep(IDLE_S)
        cpu = sum(p.cpu_times()[:2]) - cpu0
        return p.memory_info().rss / 2**20, cpu
    finally:
        proc.kill()
        proc.wait()


def idle_footprint(tmp: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    broker = Mosquitto(tmp / "broker2")
    broker.start()
    try:
        env_root = str(Path(__file__).resolve().parent.parent)
        bare = _footprint([sys.executable, "-c", "import sys, time; print('ready', flush=True); time.sleep(3600)"],
                          "ready")
        link = _footprint([sys.executable, "-c", f"import sys; sys.path.insert(0, {env_root!r}); "
                           "sys.argv[0] = 'link_process'; import runpy; "
                           f"runpy.run_path({env_root + '/testkit/link_process.py'!r}, run_name='__main__')",
                           "--broker", broker.url, "--device", "bench-idle", "--state-dir", str(tmp / "idle")],
                          "ready")
        return bare, link
    finally:
        broker.kill()


if __name__ == "__main__":
    sys.exit(main())

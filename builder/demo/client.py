"""The demo's two observers: an OpenAI-API client and a fleet watcher.

`stream_chat` is a plain HTTP client of the agent's OpenAI-compatible API
(`POST /v1/chat/completions`, `stream: true`, SSE), as any existing client
would be. `PromptLoop` keeps asking every device during a rollout and counts
what failed: a model switch must never fail a request (design section 7).
`FleetWatcher` subscribes to the fleet's retained statuses, folds them with
`builder.fleet.view.FleetView` (what `edge-builder fleet status` shows) and
records each device's (state, version) changes as a timeline.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import requests
from paho.mqtt.enums import CallbackAPIVersion

from agent.wire.base import StrictModel
from agent.wire.broker import parse_broker_url
from agent.wire.errors import DemoError
from agent.wire.mqtt import all_devices_topic
from builder.fleet.view import FleetReport, FleetView

_TIMEOUT_S = (5.0, 120.0)  # connect, read


class Answer(StrictModel):
    text: str
    model: str | None
    finish_reason: str | None
    ttft_ms: float
    duration_s: float


def stream_chat(base_url: str, question: str, *, max_tokens: int,
                on_text: Callable[[str], None] | None = None) -> Answer:
    """One streamed chat completion; `on_text` gets each piece as it arrives.

    Raises:
        DemoError: unreachable, a non-200 answer, an error inside the stream, or no [DONE].
    """
    body: dict[str, Any] = {"model": "default", "messages": [{"role": "user", "content": question}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    t0 = time.monotonic()
    ttft_ms: float | None = None
    parts: list[str] = []
    model: str | None = None
    finish: str | None = None
    try:
        with requests.post(f"{base_url}/v1/chat/completions", json=body, stream=True, timeout=_TIMEOUT_S) as r:
            if r.status_code != 200:
                raise DemoError(f"{base_url} answered {r.status_code}: {r.text[:200]}")
            for raw in r.iter_lines():
                line = raw.decode("utf-8", "replace")
                if not line or not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return Answer(text="".join(parts), model=model, finish_reason=finish,
                                  ttft_ms=ttft_ms if ttft_ms is not None else 0.0,
                                  duration_s=time.monotonic() - t0)
                chunk = json.loads(data)
                if "error" in chunk:
                    raise DemoError(f"{base_url}: error in the stream: {chunk['error'].get('message')}")
                model = chunk.get("model", model)
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    text = choice.get("delta", {}).get("content")
                    if text:
                        if ttft_ms is None:
                            ttft_ms = (time.monotonic() - t0) * 1000
                        parts.append(text)
                        if on_text is not None:
                            on_text(text)
    except requests.RequestException as e:
        raise DemoError(f"request to {base_url} failed: {e}") from e
    raise DemoError(f"{base_url}: the stream ended without [DONE] after {len(parts)} pieces")


@dataclass
class DeviceLoad:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class PromptLoop:
    """One thread per device, each sending streamed requests back to back until stopped."""

    QUESTIONS = ("Give me one tip for saving energy at home.", "What is a lighthouse for?",
                 "Name a fruit that is yellow.", "Why is the sky blue?")

    def __init__(self, urls: dict[str, str], max_tokens: int) -> None:
        self.urls = urls
        self.max_tokens = max_tokens
        self.load = {device: DeviceLoad() for device in urls}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(d,), name=f"prompt-{d}", daemon=True)
                         for d in urls]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _run(self, device: str) -> None:
        i = 0
        while not self._stop.is_set():
            question = self.QUESTIONS[i % len(self.QUESTIONS)]
            i += 1
            try:
                answer = stream_chat(self.urls[device], question, max_tokens=self.max_tokens)
                ok = bool(answer.text)
                error = None if ok else "empty answer"
            except DemoError as e:
                ok, error = False, str(e)
            with self._lock:
                if ok:
                    self.load[device].ok += 1
                else:
                    self.load[device].failed += 1
                    self.load[device].errors.append(error or "")

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return sum(x.ok for x in self.load.values()), sum(x.failed for x in self.load.values())

    def wait_for_requests(self, n_per_device: int, timeout_s: float) -> None:
        """Bounded wait until every device answered `n_per_device` more requests than now."""
        with self._lock:
            target = {d: x.ok + x.failed + n_per_device for d, x in self.load.items()}
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if all(self.load[d].ok + self.load[d].failed >= n for d, n in target.items()):
                    return
            if time.monotonic() > deadline:
                raise DemoError(f"the prompt loop did not complete {n_per_device} request(s) per device "
                                f"within {timeout_s:.0f}s")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 120.0) -> None:
        """Let the requests in flight finish (they count), then stop."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)


class StatusChange(StrictModel):
    t_s: float
    device_id: str
    state: str
    version: int | None
    online: bool


class FleetWatcher:
    """Live view of a fleet's retained statuses (and telemetry) from one MQTT subscription."""

    def __init__(self, broker_url: str, fleet: str) -> None:
        self.fleet = fleet
        self.view = FleetView(fleet)
        self.timeline: list[StatusChange] = []
        self._t0 = time.monotonic()
        self._cond = threading.Condition()
        self._last: dict[str, tuple[str, int | None, bool]] = {}
        # Called (on the MQTT thread) with each new StatusChange; the demo prints them.
        self.listener: Callable[[StatusChange], None] | None = None
        address = parse_broker_url(broker_url)
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-watch-{uuid.uuid4().hex[:8]}",
                                   protocol=mqtt.MQTTv311, clean_session=True)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        try:
            self._client.connect(address.host, address.port, keepalive=30)
        except OSError as e:
            raise DemoError(f"cannot connect to the demo broker {broker_url}: {e}") from e
        self._client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise DemoError(f"no SUBACK from the demo broker {broker_url} within 10s")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:  # subscribe here so a reconnect renews it
            client.subscribe([(all_devices_topic(self.fleet, "status"), 1),
                              (all_devices_topic(self.fleet, "telemetry"), 0)])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            if not self.view.apply(message.topic, message.payload):
                return
            for row in self.view.rows():
                now = (row.state, row.version, row.online)
                if self._last.get(row.device_id) != now:
                    self._last[row.device_id] = now
                    change = StatusChange(t_s=round(time.monotonic() - self._t0, 2), device_id=row.device_id,
                                          state=row.state, version=row.version, online=row.online)
                    self.timeline.append(change)
                    if self.listener is not None:
                        self.listener(change)
            self._cond.notify_all()

    def report(self) -> FleetReport:
        with self._cond:
            return self.view.report()

    def wait_for(self, predicate: Callable[[FleetReport], bool], timeout_s: float, what: str,
                 on_change: Callable[[FleetReport], None] | None = None,
                 check: Callable[[], None] | None = None) -> FleetReport:
        """Bounded wait on the fleet's statuses; `check` may raise (a process died) to end it early.

        Raises:
            DemoError: `timeout_s` ran out.
        """
        deadline = time.monotonic() + timeout_s
        seen = -1
        with self._cond:
            while True:
                report = self.view.report()
                if len(self.timeline) != seen:
                    seen = len(self.timeline)
                    if on_change is not None:
                        on_change(report)
                if predicate(report):
                    return report
                left = deadline - time.monotonic()
                if left <= 0:
                    states = ", ".join(f"{r.device_id}={r.state} v{r.version}" for r in report.devices) or "none"
                    raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what} (devices: {states})")
                if check is not None:
                    self._cond.release()
                    try:
                        check()
                    finally:
                        self._cond.acquire()
                self._cond.wait(min(left, 1.0))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

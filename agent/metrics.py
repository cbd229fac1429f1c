"""Serving metrics: counters kept by the API process, rendered as Prometheus text
for `GET /metrics` and as a pydantic snapshot for MQTT telemetry.

Pure bookkeeping: no clock, no I/O; callers pass the measured durations.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Literal

from pydantic import BaseModel, ConfigDict

# Upper bounds in seconds: TTFT on a small CPU box ranges from ~10 ms to seconds.
_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_RECENT = 64  # requests the tokens/s and TTFT medians are taken over


class MetricsSnapshot(BaseModel):
    """What telemetry reports (design section 6): recent medians and totals."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    requests_total: int
    requests_failed_total: int
    prompt_tokens_total: int
    completion_tokens_total: int
    ttft_ms_median: float | None
    decode_tokens_per_s_median: float | None
    queue_depth: int
    active_requests: int


def _median(values: deque[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class ServingMetrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> n
        self.errors: Counter[str] = Counter()  # kind -> n
        self.prompt_tokens_total = 0
        self.completion_tokens_total = 0
        self.ttft_bucket_counts = [0] * len(_TTFT_BUCKETS_S)
        self.ttft_sum_s = 0.0
        self.ttft_count = 0
        self.recent_ttft_s: deque[float] = deque(maxlen=_RECENT)
        self.recent_decode_tps: deque[float] = deque(maxlen=_RECENT)
        self.queue_depth = 0
        self.active_requests = 0
        self.model_switches_total = 0
        self.worker_restarts_total = 0

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def observe_error(self, kind: str) -> None:
        self.errors[kind] += 1

    def observe_ttft(self, ttft_s: float) -> None:
        self.ttft_sum_s += ttft_s
        self.ttft_count += 1
        self.recent_ttft_s.append(ttft_s)
        for i, bound in enumerate(_TTFT_BUCKETS_S):
            if ttft_s <= bound:
                self.ttft_bucket_counts[i] += 1

    def observe_generation(self, prompt_tokens: int, completion_tokens: int, decode_s: float) -> None:
        self.prompt_tokens_total += prompt_tokens
        self.completion_tokens_total += completion_tokens
        # tokens after the first over the time after the first: decode speed without prefill
        if completion_tokens > 1 and decode_s > 0:
            self.recent_decode_tps.append((completion_tokens - 1) / decode_s)

    def snapshot(self) -> MetricsSnapshot:
        ttft = _median(self.recent_ttft_s)
        return MetricsSnapshot(
            requests_total=sum(self.requests.values()),
            requests_failed_total=sum(n for (_, status), n in self.requests.items() if status >= 400),
            prompt_tokens_total=self.prompt_tokens_total,
            completion_tokens_total=self.completion_tokens_total,
            ttft_ms_median=None if ttft is None else ttft * 1000.0,
            decode_tokens_per_s_median=_median(self.recent_decode_tps),
            queue_depth=self.queue_depth,
            active_requests=self.active_requests,
        )

    def render_prometheus(self, model_name: str | None, model_version: int | None) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        metric("edgefleet_requests_total", "counter", "HTTP requests by endpoint and status code",
               [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
        metric("edgefleet_errors_total", "counter", "failed requests by error kind",
               [(f'{{kind="{k}"}}', n) for k, n in sorted(self.errors.items())])
        metric("edgefleet_prompt_tokens_total", "counter", "prompt tokens processed", [("", self.prompt_tokens_total)])
        metric("edgefleet_completion_tokens_total", "counter", "tokens generated",
               [("", self.completion_tokens_total)])
        buckets = [(f'{{le="{b:g}"}}', c) for b, c in zip(_TTFT_BUCKETS_S, self.ttft_bucket_counts, strict=True)]
        buckets.append(('{le="+Inf"}', self.ttft_count))
        lines.append("# HELP edgefleet_ttft_seconds time from request admission to the first token")
        lines.append("# TYPE edgefleet_ttft_seconds histogram")
        lines.extend(f"edgefleet_ttft_seconds_bucket{labels} {value:g}" for labels, value in buckets)
        lines.append(f"edgefleet_ttft_seconds_sum {self.ttft_sum_s:g}")
        lines.append(f"edgefleet_ttft_seconds_count {self.ttft_count:g}")
        tps = _median(self.recent_decode_tps)
        metric("edgefleet_decode_tokens_per_second", "gauge",
               f"median decode speed of the last {_RECENT} requests", [("", tps or 0.0)])
        metric("edgefleet_queue_depth", "gauge", "requests waiting for a slot", [("", self.queue_depth)])
        metric("edgefleet_active_requests", "gauge", "requests generating now", [("", self.active_requests)])
        metric("edgefleet_model_switches_total", "counter", "hot model switches", [("", self.model_switches_total)])
        metric("edgefleet_worker_restarts_total", "counter", "model workers restarted after dying",
               [("", self.worker_restarts_total)])
        if model_name is not None:
            metric("edgefleet_model_info", "gauge", "the model serving new requests",
                   [(f'{{name="{model_name}",version="{model_version or ""}"}}', 1)])
        return "\n".join(lines) + "\n"

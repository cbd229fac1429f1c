"""Serving metrics: counters kept by the API process, rendered as Prometheus text
for `GET /metrics` and as a pydantic snapshot for MQTT telemetry.

Pure bookkeeping: no clock, no I/O; callers pass the measured durations.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.wire.base import StrictModel

# Upper bounds in seconds: TTFT on a small CPU box ranges from ~10 ms to seconds.
_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_RECENT = 64  # requests the tokens/s and TTFT medians are taken over


class MetricsSnapshot(StrictModel):
    """What telemetry reports (design section 6): recent medians and totals."""

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
        self.cached_prompt_tokens_total = 0  # /metrics only: telemetry's snapshot keeps its schema
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

    def observe_generation(self, prompt_tokens: int, completion_tokens: int, decode_s: float,
                           cached_tokens: int = 0) -> None:
        self.prompt_tokens_total += prompt_tokens
        self.completion_tokens_total += completion_tokens
        self.cached_prompt_tokens_total += cached_tokens
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
        """The Prometheus text format, rendered by prometheus-client (number formatting without loss
        of digits, escaped label values) with this process's own metrics (RSS, CPU, open fds)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, model_name, model_version))
        ProcessCollector(registry=registry)
        return generate_latest(registry).decode()


class _Collector(Collector):
    """The current values of one `ServingMetrics`, as metric families."""

    def __init__(self, metrics: ServingMetrics, model_name: str | None, model_version: int | None) -> None:
        self.m, self.model_name, self.model_version = metrics, model_name, model_version

    def collect(self) -> Iterator[Metric]:
        m = self.m
        requests = CounterMetricFamily("edgefleet_requests", "HTTP requests by endpoint and status code",
                                       labels=["endpoint", "status"])
        for (endpoint, status), n in sorted(m.requests.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        errors = CounterMetricFamily("edgefleet_errors", "failed requests by error kind", labels=["kind"])
        for kind, n in sorted(m.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        yield CounterMetricFamily("edgefleet_prompt_tokens", "prompt tokens processed", value=m.prompt_tokens_total)
        yield CounterMetricFamily("edgefleet_completion_tokens", "tokens generated", value=m.completion_tokens_total)
        yield CounterMetricFamily("edgefleet_cached_prompt_tokens",
                                  "prompt tokens the prefix cache held (not prefilled)",
                                  value=m.cached_prompt_tokens_total)
        buckets = [(f"{bound:g}", count) for bound, count in zip(_TTFT_BUCKETS_S, m.ttft_bucket_counts, strict=True)]
        yield HistogramMetricFamily("edgefleet_ttft_seconds", "time from request admission to the first token",
                                    buckets=[*buckets, ("+Inf", m.ttft_count)], sum_value=m.ttft_sum_s)
        yield GaugeMetricFamily("edgefleet_decode_tokens_per_second",
                                f"median decode speed of the last {_RECENT} requests",
                                value=_median(m.recent_decode_tps) or 0.0)
        yield GaugeMetricFamily("edgefleet_queue_depth", "requests waiting for a slot", value=m.queue_depth)
        yield GaugeMetricFamily("edgefleet_active_requests", "requests generating now", value=m.active_requests)
        yield CounterMetricFamily("edgefleet_model_switches", "hot model switches", value=m.model_switches_total)
        yield CounterMetricFamily("edgefleet_worker_restarts", "model workers restarted after dying",
                                  value=m.worker_restarts_total)
        if self.model_name is not None:
            info = GaugeMetricFamily("edgefleet_model_info", "the model serving new requests",
                                     labels=["name", "version"])
            info.add_metric([self.model_name, str(self.model_version or "")], 1)
            yield info

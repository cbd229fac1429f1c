"""/metrics text: exact large counters, escaped labels, process metrics; the telemetry snapshot."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from agent.serving.metrics import ServingMetrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_large_counters_keep_every_digit_and_labels_are_escaped() -> None:
    m = ServingMetrics()
    m.completion_tokens_total = 123_456_789
    for _ in range(3):
        m.observe_request("/v1/completions", 429)
    m.observe_error('odd "kind"\nwith a newline')
    text = m.render_prometheus('model "x"', 7)
    samples = _samples(text)  # parsed back by Prometheus's own parser: the escaping holds
    assert samples[("edgefleet_completion_tokens_total", ())] == 123_456_789
    assert samples[("edgefleet_requests_total", (("endpoint", "/v1/completions"), ("status", "429")))] == 3
    assert samples[("edgefleet_errors_total", (("kind", 'odd "kind"\nwith a newline'),))] == 1
    assert samples[("edgefleet_model_info", (("name", 'model "x"'), ("version", "7")))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 1 << 20


def test_ttft_histogram_is_cumulative_and_the_snapshot_takes_medians() -> None:
    m = ServingMetrics()
    for ttft_s in (0.02, 0.2, 3.0):
        m.observe_ttft(ttft_s)
    m.observe_generation(prompt_tokens=10, completion_tokens=11, decode_s=0.5)
    samples = _samples(m.render_prometheus(None, None))
    assert samples[("edgefleet_ttft_seconds_bucket", (("le", "0.025"),))] == 1
    assert samples[("edgefleet_ttft_seconds_bucket", (("le", "0.25"),))] == 2
    assert samples[("edgefleet_ttft_seconds_bucket", (("le", "+Inf"),))] == 3
    assert samples[("edgefleet_ttft_seconds_count", ())] == 3
    assert not any(name == "edgefleet_model_info" for name, _ in samples)
    snapshot = m.snapshot()
    assert snapshot.ttft_ms_median == 200.0 and snapshot.decode_tokens_per_s_median == 20.0
    assert (snapshot.prompt_tokens_total, snapshot.completion_tokens_total) == (10, 11)

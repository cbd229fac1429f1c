"""One telemetry sample: host metrics from psutil merged with serving metrics.

The serving layer supplies its numbers through a callable returning
`ServingMetrics`, so this module knows nothing about the API server; the link
adds its own counters (outbox, dropped payloads) before publishing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import psutil
from pydantic import Field

from agent.wire.base import StrictModel
from agent.wire.mqtt import Telemetry

log = logging.getLogger(__name__)


class ServingMetrics(StrictModel):
    """What the serving layer reports; all optional because no model may be loaded."""

    model: str | None = None
    version: int | None = None
    tokens_per_s: float | None = Field(default=None, ge=0)
    ttft_ms: float | None = Field(default=None, ge=0)
    queue_depth: int = Field(default=0, ge=0)
    requests_total: int = Field(default=0, ge=0)
    errors_total: int = Field(default=0, ge=0)


def hottest_temperature_c() -> float | None:
    """The highest current reading of any sensor, or None where the OS shows none."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError) as e:  # psutil raises these on odd sysfs contents
        log.debug("event=temperature_unreadable error=%s", e)
        return None
    readings = [t.current for entries in sensors.values() for t in entries if t.current is not None]
    return max(readings) if readings else None


class TelemetryCollector:
    """Samples CPU (since the previous sample), RAM, disk of `disk_path`, temperature."""

    def __init__(self, device_id: str, disk_path: Path,
                 serving_metrics: Callable[[], ServingMetrics] | None = None) -> None:
        self.device_id = device_id
        self.disk_path = disk_path
        self.serving_metrics = serving_metrics
        psutil.cpu_percent(interval=None)  # primes the counter: the first real sample covers the interval

    def sample(self) -> Telemetry:
        vm = psutil.virtual_memory()
        disk = psutil.disk_usage(str(self.disk_path))
        serving = ServingMetrics()
        if self.serving_metrics is not None:
            try:
                serving = self.serving_metrics()
            except Exception:  # a broken metrics source must not stop telemetry
                log.exception("event=serving_metrics_failed")
        return Telemetry(
            device_id=self.device_id,
            cpu_percent=psutil.cpu_percent(interval=None),
            ram_used_bytes=vm.total - vm.available,
            ram_total_bytes=vm.total,
            disk_used_bytes=disk.used,
            disk_total_bytes=disk.total,
            temperature_c=hottest_temperature_c(),
            **serving.model_dump(),
        )

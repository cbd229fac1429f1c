"""What `make demo` did, as one JSON object (`--json` on stdout, and `<workdir>/summary.json`).

The test of the demo reads this file instead of scraping its text: every step
leaves its outcome here, and `leftover_pids` says whether anything the demo
started was still running when it ended.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.wire.base import StrictModel


class BrokerInfo(StrictModel):
    kind: Literal["mosquitto", "amqtt"]
    url: str
    pid: int


class ArtifactFigures(StrictModel):
    """The quality gate's figures, from the artifact's manifest."""

    name: str
    version: int
    out_dir: str
    is_reused: bool
    recipe: str
    build_s: float
    perplexity: float
    reference_perplexity: float
    perplexity_ratio: float
    max_perplexity_ratio: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    total_file_bytes: int
    peak_rss_bytes: int
    min_ram_bytes: int
    context_length: int


class RepoInfo(StrictModel):
    repo_dir: str
    url: str
    root_json: str
    channel: str
    published_versions: list[int]


class DeviceInfo(StrictModel):
    device_id: str
    api_url: str
    state_dir: str
    config_file: str
    log_file: str
    pid: int
    first_active_version: int | None = None
    final_state: str | None = None
    final_version: int | None = None
    question: str | None = None
    answer: str | None = None
    answer_ttft_ms: float | None = None


class StatusChangeInfo(StrictModel):
    t_s: float
    device_id: str
    state: str
    version: int | None
    online: bool


class RolloutInfo(StrictModel):
    version: int
    waves: list[int]
    salt: str
    first_wave_devices: list[str]
    phase: str
    requests_ok: int
    requests_failed: int
    failures: list[str]
    requests_by_device: dict[str, int]
    timeline: list[StatusChangeInfo]


class ProcessInfo(StrictModel):
    name: str
    pid: int
    pgid: int


class DemoSummary(StrictModel):
    schema_version: Literal[1] = 1
    ok: bool = False
    error: str | None = None
    is_interrupted: bool = Field(default=False, description="Ctrl-C, SIGTERM or SIGHUP before every step was done")
    quick: bool
    workdir: str
    steps_done: list[str] = Field(default_factory=list)
    step_durations_s: dict[str, float] = Field(default_factory=dict)
    duration_s: float = 0.0
    broker: BrokerInfo | None = None
    artifacts: list[ArtifactFigures] = Field(default_factory=list)
    repo: RepoInfo | None = None
    devices: list[DeviceInfo] = Field(default_factory=list)
    fleet_status_table: str | None = None
    rollout: RolloutInfo | None = None
    processes: list[ProcessInfo] = Field(default_factory=list)
    is_fleet_up: bool = Field(default=False, description="--keep-running: every step done, the fleet left up")
    leftover_pids: list[int] = Field(default_factory=list)

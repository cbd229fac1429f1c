"""The rollout controller's own record: `REPO/rollouts/<channel>.json`.

It lives in the repository dir next to `keys/` and `state/`, outside `www/`,
so it is never served. It is written with tmp + fsync + rename before the
action it announces (signing a wave, signing the rollback), as the device
journal is: after `kill -9` at any instant a restarted `edge-builder rollout`
reads which wave it was in, when that wave started, and which signed channel
file it had already produced, and continues from there. The salt is chosen once
per rollout and kept here, so every wave's cohort contains the previous one's.

It also remembers the channel file the rollout replaced (`previous`), which is
what `edge-builder rollback` signs back.
"""

from __future__ import annotations

import datetime as dt
import enum
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from agent.wire.base import StrictModel
from agent.wire.channel import ChannelFile
from agent.wire.durable import atomic_write_bytes
from agent.wire.errors import RepositoryError

ROLLOUTS_DIRNAME = "rollouts"


class RolloutPhase(str, enum.Enum):
    RUNNING = "RUNNING"              # waves being signed and watched
    ROLLING_BACK = "ROLLING_BACK"    # decided to roll back; the rollback channel file may not be signed yet
    SUCCEEDED = "SUCCEEDED"          # the last wave (100%) passed
    ROLLED_BACK = "ROLLED_BACK"      # the previous version is signed back at 100% with allow_downgrade
    HALTED = "HALTED"                # failed with no previous version to go back to: new version held at 0%


FINISHED: frozenset[RolloutPhase] = frozenset({RolloutPhase.SUCCEEDED, RolloutPhase.ROLLED_BACK,
                                               RolloutPhase.HALTED})


class WaveRecord(StrictModel):
    """The verdict of one finished wave."""

    percent: int = Field(ge=1, le=100)
    started_at: dt.datetime
    finished_at: dt.datetime
    outcome: Literal["passed", "failed"]
    expected: int = Field(ge=0)
    active: int = Field(ge=0)
    failed: int = Field(ge=0)
    reason: str


class RolloutState(StrictModel):
    """One rollout of `model` v`version` on `channel` (schema_version 1)."""

    schema_version: Literal[1] = 1
    channel: str
    model: str
    version: int = Field(gt=0)
    salt: str = Field(max_length=128, description="cohort salt, fixed for the whole rollout")
    waves: list[int] = Field(min_length=1)
    min_success: float = Field(gt=0, le=1)
    wait_s: float = Field(gt=0)
    previous: ChannelFile | None = Field(description="the channel file this rollout replaced; rollback signs it")
    phase: RolloutPhase = RolloutPhase.RUNNING
    wave_index: int = Field(default=0, ge=0, description="index into `waves` of the wave under way")
    wave_started_at: dt.datetime | None = Field(
        default=None, description="when the current wave's channel file was signed; None: not signed yet")
    history: list[WaveRecord] = Field(default_factory=list)
    reason: str | None = None
    started_at: dt.datetime
    updated_at: dt.datetime
    store_count: int = Field(default=0, ge=0, description="times this file was written")

    @property
    def percent(self) -> int:
        return self.waves[min(self.wave_index, len(self.waves) - 1)]

    @property
    def is_finished(self) -> bool:
        return self.phase in FINISHED

    def wave_channel(self) -> ChannelFile:
        """The signed channel file of the wave under way."""
        return ChannelFile(channel=self.channel, model=self.model, version=self.version,
                           rollout={"percent": self.percent, "salt": self.salt})  # type: ignore[arg-type]


def state_path(repo_dir: Path, channel: str) -> Path:
    return repo_dir / ROLLOUTS_DIRNAME / f"{channel}.json"


def load_state(repo_dir: Path, channel: str) -> RolloutState | None:
    """Raises: RepositoryError: the file exists but does not validate."""
    path = state_path(repo_dir, channel)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return RolloutState.model_validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise RepositoryError(
            f"rollout state {path} is invalid at {'.'.join(map(str, first['loc']))}: {first['msg']}; "
            "inspect it, then move it away to start a new rollout") from e


def save_state(repo_dir: Path, state: RolloutState, now: dt.datetime) -> RolloutState:
    """Write atomically (tmp + fsync + rename + fsync dir); returns the state as written."""
    saved = state.model_copy(update={"updated_at": now, "store_count": state.store_count + 1})
    path = state_path(repo_dir, state.channel)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(path, saved.model_dump_json(indent=2).encode())
    return saved

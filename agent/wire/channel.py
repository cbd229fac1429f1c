"""The signed channel file (`channels/<channel>.json`) and the rollout cohort rule.

Pure: no I/O. The channel file is trusted only after TUF verified its bytes.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from agent.wire.base import FrozenModel
from agent.wire.manifest import ModelName


class Rollout(FrozenModel):
    percent: int = Field(ge=0, le=100)
    salt: str = Field(default="", max_length=128)


class ChannelFile(FrozenModel):
    schema_version: Literal[1] = 1
    channel: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelName
    version: int = Field(gt=0)
    rollout: Rollout = Rollout(percent=100)
    allow_downgrade: bool = False


def channel_target_path(channel: str) -> str:
    return f"channels/{channel}.json"


def cohort_bucket(salt: str, device_id: str) -> int:
    """The device's bucket in [0, 100): stable for a (salt, device) pair (design section 2)."""
    return int(hashlib.sha256((salt + device_id).encode()).hexdigest()[:8], 16) % 100


def is_in_cohort(rollout: Rollout, device_id: str) -> bool:
    return cohort_bucket(rollout.salt, device_id) < rollout.percent

"""The one base of our own wire and file formats: an unknown key is an error, not a silent drop.

OpenAI's request and message shapes (`agent.wire.openai`) are the exception: real clients
send extras there (its option objects, `response_format` and `tools`, are strict).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A format of ours: unknown keys are refused where the data comes in."""

    model_config = ConfigDict(extra="forbid")


class FrozenModel(StrictModel):
    """A strict format whose values never change once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

"""The pure decisions of a staged rollout: which devices a wave covers and
whether a wave passed, must wait, or failed. No clock, file or socket here:
the controller (builder/fleet/rollout.py) feeds in what it observed.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from agent.wire.channel import cohort_bucket


class WaveOutcome(str, enum.Enum):
    PASSED = "passed"
    WAITING = "waiting"
    FAILED = "failed"


@dataclass(frozen=True)
class WaveVerdict:
    outcome: WaveOutcome
    expected: int
    active: int
    failed: int
    reason: str


def parse_waves(text: str) -> list[int]:
    """`"5,25,100"` -> `[5, 25, 100]`; strictly increasing, ending at 100."""
    try:
        waves = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise ValueError(f"--waves {text!r}: use comma-separated integer percents, e.g. 5,25,100") from e
    if not waves or any(not 0 < w <= 100 for w in waves):
        raise ValueError(f"--waves {text!r}: every wave must be a percent in 1..100")
    if any(b <= a for a, b in itertools.pairwise(waves)):
        raise ValueError(f"--waves {text!r}: waves must strictly increase")
    if waves[-1] != 100:
        raise ValueError(f"--waves {text!r}: the last wave must be 100")
    return waves


def devices_in_wave(device_ids: Iterable[str], salt: str, percent: int) -> set[str]:
    """The devices whose cohort bucket is below `percent` (the rule the agents apply)."""
    return {d for d in device_ids if cohort_bucket(salt, d) < percent}


def judge_wave(
    expected: set[str],
    active: set[str],
    failed: set[str],
    *,
    known_on_channel: int,
    min_success: float,
    elapsed_s: float,
    wait_s: float,
    blind_reason: str | None = None,
) -> WaveVerdict:
    """Decide a wave from what the devices reported. Fails closed: what cannot be seen fails.

    A wave passes once the share of expected devices ACTIVE on the new version
    reaches `min_success`. It fails as soon as so many devices failed that
    `min_success` can no longer be reached, or when `wait_s` ran out first.
    A wave that covers none of the channel's known devices passes at once (nothing
    to wait for), but only while some device of the channel is known at all: a
    controller that sees no device, or lost its view (`blind_reason`), cannot tell
    a good wave from a bad one, so the wave fails and the rollout rolls back.
    """
    n = len(expected)
    n_active = len(active & expected)
    n_failed = len(failed & expected)
    if blind_reason is not None:
        return WaveVerdict(WaveOutcome.FAILED, n, n_active, n_failed,
                           f"the controller cannot see the fleet ({blind_reason}): a wave it cannot watch fails")
    if n == 0 and known_on_channel == 0:
        return WaveVerdict(WaveOutcome.FAILED, 0, 0, 0,
                           "no device following the channel was observed (broker ACL, fleet name, or no devices):"
                           " a wave nobody can watch fails")
    if n == 0:
        return WaveVerdict(WaveOutcome.PASSED, 0, 0, 0, "no known device in this wave")
    if n_active / n >= min_success:
        return WaveVerdict(WaveOutcome.PASSED, n, n_active, n_failed,
                           f"{n_active}/{n} devices active (>= {min_success:.0%})")
    if (n - n_failed) / n < min_success:
        return WaveVerdict(WaveOutcome.FAILED, n, n_active, n_failed,
                           f"{n_failed}/{n} devices failed: {min_success:.0%} success is out of reach")
    if elapsed_s >= wait_s:
        return WaveVerdict(WaveOutcome.FAILED, n, n_active, n_failed,
                           f"timed out after {wait_s:.0f} s with {n_active}/{n} devices active")
    return WaveVerdict(WaveOutcome.WAITING, n, n_active, n_failed, f"{n_active}/{n} devices active")

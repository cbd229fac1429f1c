"""The clock floor TUF's expiry checks stand on (`agent.update.trust.check_clock`)."""

from __future__ import annotations

import datetime as dt

import pytest

from agent.update.trust import BUILD_CLOCK_SKEW, CLOCK_FLOOR, check_clock
from agent.wire.errors import ClockError, VerificationError

DAY = dt.timedelta(days=1)


@pytest.mark.parametrize("now", [dt.datetime(1970, 1, 1, tzinfo=dt.UTC), CLOCK_FLOOR - dt.timedelta(seconds=1)])
def test_a_clock_before_the_agents_release_was_never_set(now: dt.datetime) -> None:
    with pytest.raises(ClockError, match=f"reads {now:%Y-%m-%d}.*before this agent's release"):
        check_clock(now)
    assert issubclass(ClockError, VerificationError)  # the CLI's exit code: verification failed


def test_the_running_models_build_time_raises_the_floor_less_the_allowed_skew() -> None:
    built = CLOCK_FLOOR + 30 * DAY
    check_clock(built - BUILD_CLOCK_SKEW, built)  # a build host a little ahead of the device
    check_clock(CLOCK_FLOOR, None)
    with pytest.raises(ClockError, match="before the build of the model it runs"):
        check_clock(built - BUILD_CLOCK_SKEW - dt.timedelta(seconds=1), built)
    # A model built before the agent's release does not lower the floor.
    with pytest.raises(ClockError, match="this agent's release"):
        check_clock(CLOCK_FLOOR - DAY, CLOCK_FLOOR - 100 * DAY)

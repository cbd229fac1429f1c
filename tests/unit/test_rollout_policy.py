from __future__ import annotations

import pytest

from builder.fleet.policy import WaveOutcome, devices_in_wave, judge_wave, parse_waves


def test_parse_waves() -> None:
    assert parse_waves("5,25,100") == [5, 25, 100]
    assert parse_waves("100") == [100]
    for bad in ["", "5,x", "0,100", "50,25,100", "5,25", "5,5,100", "5,101"]:
        with pytest.raises(ValueError, match="--waves"):
            parse_waves(bad)


def test_waves_grow_monotonically() -> None:
    ids = [f"d{i}" for i in range(200)]
    w1, w2, w3 = (devices_in_wave(ids, "s", p) for p in (5, 25, 100))
    assert w1 <= w2 <= w3 and w3 == set(ids)
    assert 0 < len(w1) < len(w2) < 200


@pytest.mark.parametrize(
    ("active", "failed", "elapsed", "outcome"),
    [
        ({"a", "b", "c", "d"}, set(), 1, WaveOutcome.PASSED),
        ({"a", "b"}, set(), 1, WaveOutcome.WAITING),
        ({"a", "b"}, set(), 99, WaveOutcome.FAILED),  # timed out
        ({"a"}, {"b"}, 1, WaveOutcome.FAILED),  # 3/4 < 0.9 can no longer be reached
        ({"a", "b", "c", "x"}, set(), 1, WaveOutcome.WAITING),  # x is not in this wave
    ],
)
def test_judge_wave(active: set[str], failed: set[str], elapsed: float, outcome: WaveOutcome) -> None:
    verdict = judge_wave({"a", "b", "c", "d"}, active, failed, known_on_channel=6, min_success=0.9,
                         elapsed_s=elapsed, wait_s=60)
    assert verdict.outcome is outcome, verdict.reason


def test_a_wave_of_none_of_the_known_devices_passes() -> None:
    verdict = judge_wave(set(), set(), set(), known_on_channel=10, min_success=0.95, elapsed_s=0, wait_s=1)
    assert verdict.outcome is WaveOutcome.PASSED


def test_a_controller_that_sees_no_device_fails_closed() -> None:
    """A device that blinded the observer, a wrong fleet name or an ACL that hides the statuses
    all look like an empty fleet: the wave cannot be watched, so it fails (and rolls back)."""
    verdict = judge_wave(set(), set(), set(), known_on_channel=0, min_success=0.95, elapsed_s=0, wait_s=60)
    assert verdict.outcome is WaveOutcome.FAILED and "no device following the channel" in verdict.reason


def test_a_controller_that_lost_the_broker_fails_closed_even_when_all_looked_well() -> None:
    verdict = judge_wave({"a", "b"}, {"a", "b"}, set(), known_on_channel=2, min_success=0.5, elapsed_s=0, wait_s=60,
                         blind_reason="disconnected from mqtt://b:1883 for 31 s")
    assert verdict.outcome is WaveOutcome.FAILED and "cannot see the fleet" in verdict.reason

"""Reconnect backoff for the MQTT link: exponential, capped, with jitter."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with jitter: the n-th consecutive failure waits
    min(max_s, initial_s * 2**n) scaled by a random factor in [0.5, 1.0], so a
    fleet that lost its broker at the same instant does not return in lockstep.
    `reset()` after a successful CONNACK, as paho's reconnect_delay_set does."""

    def __init__(self, initial_s: float = 1.0, max_s: float = 60.0, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay_s(self) -> float:
        base = min(self.max_s, self.initial_s * (2 ** min(self.failures, 32)))
        self.failures += 1
        return base * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0

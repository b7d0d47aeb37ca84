"""A peer's own clock: when its next local step is due.

Each peer steps every `period_s` seconds, each gap stretched or shrunk by up to
`jitter` of the period (seeded, so a seed gives the same schedule). The schedule is
absolute: a peer that falls behind (a slow step, a busy core) catches up by not
sleeping, instead of drifting further each step.
"""

from __future__ import annotations

import random


class PeerClock:
    """Due times of steps 1, 2, ... from a start time, with seeded jitter."""

    def __init__(self, period_s: float, jitter: float, seed: int, start: float) -> None:
        if period_s < 0:
            raise ValueError(f"period must be >= 0 seconds, got {period_s}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.period_s = period_s
        self.jitter = jitter
        self._rng = random.Random(seed)
        self._due = start

    def next_due(self) -> float:
        """The time (same clock as `start`) the next step is due; advances the schedule."""
        due = self._due
        self._due += self.period_s * (1.0 + self.jitter * self._rng.uniform(-1.0, 1.0))
        return due

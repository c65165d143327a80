"""Capped exponential backoff with jitter: never a tight loop, and reconnecting clients spread out."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` returns a delay drawn from ``[initial / 2, min(cap, initial * 2**attempt)]``; ``reset()`` after a
    success. The floor keeps even the luckiest draw from retrying at once."""

    def __init__(self, *, initial: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"backoff needs 0 < initial <= cap, got initial={initial} cap={cap}")
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        return min(self.cap, self.initial * float(2 ** min(self.attempt, 32)))

    def next(self) -> float:
        delay = self._rng.uniform(self.initial / 2, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0

"""Delays between retries: exponential, capped, optionally jittered; sans-IO.

Nothing here sleeps or reads a clock: the caller asks for the next delay and waits itself, so
the numbers are testable without an event loop.
"""

from __future__ import annotations

import random
from typing import Callable


class Backoff:
    """``initial * factor**n`` seconds before the n-th retry (n from 0), at most ``cap``,
    scaled by a factor drawn uniformly from ``jitter`` so that many clients that failed
    together do not retry together. ``rand`` returns a float in [0, 1)."""

    def __init__(
        self,
        initial: float,
        factor: float = 2.0,
        cap: float = float("inf"),
        jitter: tuple[float, float] = (1.0, 1.0),
        rand: Callable[[], float] = random.random,
    ) -> None:
        low, high = jitter
        if initial < 0 or factor < 1 or cap < 0 or not 0 <= low <= high:
            raise ValueError("backoff needs initial >= 0, factor >= 1, cap >= 0, 0 <= low <= high")
        self.initial = initial
        self.factor = factor
        self.cap = cap
        self.jitter = (low, high)
        self._rand = rand
        self._base = initial
        self.attempts = 0
        """Delays handed out since the last reset."""

    def next(self) -> float:
        """The delay before the next retry; each call grows the one after it."""
        base = min(self.cap, self._base)
        if self._base < self.cap:
            # Stops growing at the cap: the exponent never overflows however long it fails.
            self._base *= self.factor
        self.attempts += 1
        low, high = self.jitter
        return base * (low + (high - low) * self._rand())

    def reset(self) -> None:
        """After a success: the next delay is ``initial`` again."""
        self._base = self.initial
        self.attempts = 0

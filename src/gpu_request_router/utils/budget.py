"""A share of the event loop's time for work that may be skipped when it runs short."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["TimeBudget"]

T = TypeVar("T")


class TimeBudget:
    """A token bucket of seconds, for work that may be skipped.

    Credit grows by ``share`` of the time that passes, up to ``burst_s``, and each piece of work
    spends the time it took. :meth:`spend` runs work with ``allowed`` true while credit is left,
    so optional work (an ETA projection) stays within ``share`` of the process's time on
    average, however often it is asked for. ``timer`` is a monotonic clock in seconds.
    """

    def __init__(
        self, share: float, burst_s: float, timer: Callable[[], float] = time.perf_counter
    ) -> None:
        if not 0 < share <= 1 or burst_s <= 0:
            raise ValueError("share must be in (0, 1] and burst_s positive")
        self._share = share
        self._burst = burst_s
        self._timer = timer
        self._credit = burst_s
        self._at = timer()

    def spend(self, work: Callable[[bool], T]) -> T:
        """``work(allowed)``, ``allowed`` while credit is left; the time it takes is charged."""
        start = self._timer()
        self._credit = min(self._burst, self._credit + (start - self._at) * self._share)
        self._at = start
        result = work(self._credit > 0)
        self._credit -= self._timer() - start
        return result

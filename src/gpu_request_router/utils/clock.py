"""Clocks: the one place time comes from, so the same core runs in real and in virtual time."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock", "VirtualClock"]


class Clock(Protocol):
    """A source of the current time as Unix epoch seconds."""

    def now(self) -> float:
        """The current time (epoch seconds)."""
        ...


class SystemClock:
    """Wall-clock time of this machine."""

    def now(self) -> float:
        """The current wall-clock time (epoch seconds)."""
        return time.time()


class VirtualClock:
    """Time that only moves when told to: for simulation, trace replay and tests.

    Example::

        clock = VirtualClock(start=1_000.0)
        clock.advance(2.5)
        clock.now()  # 1002.5
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        """The current virtual time."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (never backward); return the new time."""
        if seconds < 0:
            raise ValueError("virtual time cannot go backward")
        self._now += seconds
        return self._now

    def set(self, when: float) -> None:
        """Move time forward to ``when`` (a time in the past is an error)."""
        if when < self._now:
            raise ValueError(f"virtual time cannot go backward ({when} < {self._now})")
        self._now = when

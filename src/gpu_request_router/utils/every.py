"""Something done at most once every so often, on a clock its caller passes in."""

from __future__ import annotations

__all__ = ["Every"]


class Every:
    """Says whether work done at most every ``interval_s`` is due at ``now``.

    ``now`` comes from the caller (any clock); a clock that went backwards makes the work due,
    so it is never held off for good. :meth:`again` makes it due at the next call (a prune that
    left work behind).
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: float | None = None

    def due(self, now: float) -> bool:
        """Whether the work is due at ``now``; if so, it counts as done at ``now``."""
        if self._last is not None and 0 <= now - self._last < self.interval_s:
            return False
        self._last = now
        return True

    def again(self) -> None:
        """Make the work due at the next call, whenever it comes."""
        self._last = None

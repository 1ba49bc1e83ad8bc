"""Bad-key throttling: failures counted per bucket over a sliding window, in bounded memory.

A bucket (a client address, a key prefix) that had ``limit`` failures within the last
``window_s`` waits until the oldest of them leaves the window. Failures are not recorded while a
bucket waits, so a bucket is free again exactly when :meth:`FailureLimiter.retry_after` said.

Memory is bounded: a bucket keeps at most ``limit`` times, and at most ``max_buckets`` buckets
are kept; past that, the bucket whose last failure is the oldest is forgotten first (it is the
least likely to be still waiting).
"""

from __future__ import annotations

from collections import deque

__all__ = ["FailureLimiter"]


class FailureLimiter:
    """Failures per bucket in the last ``window_s`` seconds; ``limit`` of them make it wait.

    Example::

        limiter = FailureLimiter(limit=10)
        if (wait := limiter.retry_after("203.0.113.7", now)) is None:
            limiter.record("203.0.113.7", now)
    """

    def __init__(self, limit: int, *, window_s: float = 60.0, max_buckets: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_buckets = max_buckets
        # In the order of each bucket's last failure, oldest first.
        self._failures: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        """How many buckets are tracked."""
        return len(self._failures)

    def retry_after(self, bucket: str, now: float) -> float | None:
        """Seconds until ``bucket`` may fail again, or ``None`` if it is not waiting."""
        times = self._failures.get(bucket)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[bucket]
            return None
        if len(times) < self.limit:
            return None
        return times[0] + self.window_s - now

    def record(self, bucket: str, now: float) -> None:
        """Count one failure of ``bucket`` at ``now``."""
        times = self._failures.pop(bucket, None)
        if times is None:
            if len(self._failures) >= self.max_buckets:
                del self._failures[next(iter(self._failures))]
            times = deque(maxlen=self.limit)
        times.append(now)
        self._failures[bucket] = times

"""The bad-key limiter: a sliding window per bucket, exact waits, bounded memory."""

from __future__ import annotations

import pytest

from gpu_request_router.api.middleware.failure_limiter import FailureLimiter

T0 = 1000.0


def fail(limiter: FailureLimiter, bucket: str, times: list[float]) -> None:
    """Record a failure of ``bucket`` at each of ``times``."""
    for now in times:
        assert limiter.retry_after(bucket, now) is None
        limiter.record(bucket, now)


def test_a_bucket_waits_once_it_reaches_the_limit_until_its_oldest_failure_leaves() -> None:
    """Three failures (limit 3) make the bucket wait exactly until the first is 60 s old."""
    limiter = FailureLimiter(3)
    fail(limiter, "a", [T0, T0 + 10, T0 + 20])
    assert limiter.retry_after("a", T0 + 20) == pytest.approx(40.0)
    assert limiter.retry_after("a", T0 + 59.5) == pytest.approx(0.5)
    assert limiter.retry_after("a", T0 + 60) is None
    limiter.record("a", T0 + 60)  # two left in the window, one more: the limit again
    assert limiter.retry_after("a", T0 + 60) == pytest.approx(10.0)


def test_buckets_are_counted_apart() -> None:
    """Failures of one bucket never make another wait."""
    limiter = FailureLimiter(2)
    fail(limiter, "a", [T0, T0 + 1])
    assert limiter.retry_after("a", T0 + 1) is not None
    assert limiter.retry_after("b", T0 + 1) is None


def test_a_bucket_whose_failures_all_left_the_window_is_forgotten() -> None:
    """Once every failure is older than the window, the bucket is no longer tracked."""
    limiter = FailureLimiter(5, window_s=10.0)
    fail(limiter, "a", [T0, T0 + 1])
    assert len(limiter) == 1
    assert limiter.retry_after("a", T0 + 11) is None
    assert len(limiter) == 0


def test_memory_is_bounded_and_the_least_recently_failed_bucket_goes_first() -> None:
    """With max_buckets 3, a fourth bucket evicts the one whose last failure is the oldest."""
    limiter = FailureLimiter(2, max_buckets=3)
    fail(limiter, "a", [T0])
    fail(limiter, "b", [T0 + 1])
    fail(limiter, "c", [T0 + 2])
    fail(limiter, "a", [T0 + 3])  # a failed again: b is now the least recent
    fail(limiter, "d", [T0 + 4])
    assert len(limiter) == 3
    assert limiter.retry_after("a", T0 + 4) is not None  # kept: two failures, waiting
    fail(limiter, "b", [T0 + 5])  # forgotten, so counted afresh
    assert limiter.retry_after("b", T0 + 5) is None


def test_a_bucket_keeps_at_most_limit_failure_times() -> None:
    """However many failures are recorded, a bucket holds only the last ``limit`` times."""
    limiter = FailureLimiter(3)
    for i in range(1000):
        limiter.record("a", T0 + i * 0.001)
    assert len(limiter._failures["a"]) == 3
    assert limiter.retry_after("a", T0 + 1) == pytest.approx(59.997)  # the 998th is the oldest

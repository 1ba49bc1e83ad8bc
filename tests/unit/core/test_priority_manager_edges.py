"""Fair-share counters of users the queue has never seen."""

from __future__ import annotations

from gpu_request_router.core.priority_manager import PriorityManager


def test_the_counter_of_a_user_never_seen_is_zero() -> None:
    """A user who has submitted nothing has been charged nothing."""
    queue = PriorityManager(["high", "normal"], aging_s=60)
    assert queue.counter("nobody") == 0.0

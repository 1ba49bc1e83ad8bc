"""Quota counters written as the router writes them: each with a request, in one store step.

An admission rides with the request it admits (``add_request``), a GPU-seconds charge with the
status change of its execution (``transition``); these helpers make a throwaway request of
``user`` to carry each one.
"""

from __future__ import annotations

import itertools

from gpu_request_router.core.request_router import transition_of
from gpu_request_router.core.state_store import Charge, RateAdmission, RateRefused, StateStore
from gpu_request_router.models.request import Estimate, Request, RequestStatus, Task

_ESTIMATE = Estimate(gpu_memory_mb=1, weights_mb=0, kv_cache_mb=1, activations_mb=0, duration_s={})
_ids = itertools.count()


def _carrier(user: str, at: float) -> Request:
    return Request(
        id=f"carrier_{next(_ids)}",
        user=user,
        model="llama-3-8b",
        task=Task.CHAT,
        priority="normal",
        estimate=_ESTIMATE,
        created_at=at,
    )


def admit(
    store: StateStore, user: str, now: float, window_s: float, limit: int | None
) -> float | None:
    """Add a request of ``user`` at ``now`` with its admission; ``None``, or the retry-after."""
    request = _carrier(user, now)
    created = transition_of(request, None, user, now)
    try:
        store.add_request(request, created, RateAdmission(now, window_s, limit))
    except RateRefused as refused:
        assert store.get_request(request.id) is None  # refused: the request is not written
        return refused.retry_after_s
    return None


def charge(store: StateStore, user: str, charge_id: str, at: float, gpu_seconds: float) -> None:
    """Charge ``gpu_seconds`` under ``charge_id`` at ``at``, with a request's cancellation.

    Raises:
        ValueError: the amount is negative or not finite (the cancellation is not written).
    """
    request = _carrier(user, at)
    store.add_request(request, transition_of(request, None, user, at))
    ended = request.snapshot()
    ended.transition(RequestStatus.CANCELLED, at)
    change = transition_of(ended, RequestStatus.QUEUED, user, at)
    assert store.transition(
        ended, RequestStatus.QUEUED, 0, change, Charge(user, charge_id, at, gpu_seconds)
    )

"""Rate admissions as the receiver makes them: each with a new request, in one store step."""

from __future__ import annotations

import itertools

from gpu_request_router.core.request_router import transition_of
from gpu_request_router.models.request import Estimate, Request, Task
from gpu_request_router.store.base import RateAdmission, RateRefused, StateStore

_ESTIMATE = Estimate(gpu_memory_mb=1, weights_mb=0, kv_cache_mb=1, activations_mb=0, duration_s={})
_ids = itertools.count()


def admit(
    store: StateStore, user: str, now: float, window_s: float, limit: int | None
) -> float | None:
    """Add a request of ``user`` at ``now`` with its admission; ``None``, or the retry-after."""
    request = Request(
        id=f"rate_{next(_ids)}",
        user=user,
        model="llama-3-8b",
        task=Task.CHAT,
        priority="normal",
        estimate=_ESTIMATE,
        created_at=now,
    )
    created = transition_of(request, None, user, now)
    try:
        store.add_request(request, created, RateAdmission(now, window_s, limit))
    except RateRefused as refused:
        assert store.get_request(request.id) is None  # refused: nothing written
        return refused.retry_after_s
    return None

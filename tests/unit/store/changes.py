"""Requests and the changes the core hands to a store, made as the core makes them.

A request is changed through ``Request.transition``; the change handed over is its snapshot with
the audit entry ``transition_of`` gives (and, for an execution, its GPU-seconds charge).
"""

from __future__ import annotations

from gpu_request_router.core.request_router import transition_of
from gpu_request_router.core.state_store import Charge, StateChange, StateStore
from gpu_request_router.models.request import (
    ErrorInfo,
    Estimate,
    Placement,
    Request,
    RequestStatus,
    Task,
)

T0 = 1000.0
PLACEMENT = Placement("w", ("w:0",))
ESTIMATE = Estimate(
    gpu_memory_mb=1000, weights_mb=500, kv_cache_mb=500, activations_mb=0, duration_s={"a": 1.0}
)


def make_request(
    rid: str,
    *,
    user: str = "alice",
    created_at: float = T0,
    model: str = "llama-3-8b",
    priority: str = "normal",
    key: str | None = None,
    prompt: str = "hello",
) -> Request:
    """A queued request."""
    return Request(
        id=rid,
        user=user,
        model=model,
        task=Task.CHAT,
        priority=priority,
        estimate=ESTIMATE,
        created_at=created_at,
        input={"prompt": prompt},
        idempotency_key=key,
    )


def created(request: Request) -> StateChange:
    """The change that creates ``request`` (with its rate admission at its creation time)."""
    entry = transition_of(request, None, request.user, request.created_at)
    return StateChange(request.snapshot(), entry)


def moved(
    request: Request,
    to: RequestStatus,
    at: float,
    *,
    charge: Charge | None = None,
    error: ErrorInfo | None = None,
    placement: Placement = PLACEMENT,
) -> StateChange:
    """Move ``request`` (in place) to ``to`` at ``at``; the change that persists the move."""
    dispatch = to is RequestStatus.DISPATCHING
    before = request.transition(to, at, placement=placement if dispatch else None, error=error)
    return StateChange(request.snapshot(), transition_of(request, before, "router", at), charge)


def add(store: StateStore, request: Request) -> Request:
    """Store a new request in a batch of its own; the request."""
    store.write([created(request)])
    return request

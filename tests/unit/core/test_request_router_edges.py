"""Request-router cases that mutation testing found unchecked: audit actors, charges, expiry."""

from __future__ import annotations

import pytest
from core_harness import Harness

from gpu_request_router.core.events import ExecutionResult
from gpu_request_router.models.request import Request
from gpu_request_router.testing import chat


def trail(h: Harness, request: Request) -> list[tuple[str, str]]:
    """The (status, actor) pairs of ``request``'s audit trail, oldest first."""
    return [(t.to_status.value, t.actor) for t in h.store.transitions(request.id)]


def test_the_audit_trail_names_the_backend_for_the_start_and_the_end(harness_for) -> None:
    """Running and succeeded are recorded as the backend's doing, with or without a start report."""
    h: Harness = harness_for(gpus=[("H100-80GB", 2)])
    reported, unreported = h.submit(chat()), h.submit(chat())
    h.finish(reported)
    h.apply(h.router.finished(h.dispatch_of(unreported).execution_id, ExecutionResult(), h.now))
    for request in (reported, unreported):
        assert trail(h, request) == [
            ("queued", "alice"),
            ("dispatching", "router"),
            ("running", "backend:sim"),
            ("succeeded", "backend:sim"),
        ]


def test_a_cancel_is_recorded_as_the_users_doing(harness_for) -> None:
    """A cancelled request's last step names the user as its actor."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    request = h.submit(chat())
    h.apply(h.router.cancel(request.id, h.now))
    assert trail(h, request)[-1] == ("cancelled", "user")


def test_a_backend_reporting_zero_gpu_seconds_is_charged_zero(harness_for) -> None:
    """Zero is a usage figure like any other: it is charged, not replaced by the running time."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    request = h.submit(chat())
    execution_id = h.dispatch_of(request).execution_id
    h.apply(h.router.started(execution_id, h.now))
    h.now += 7.0
    h.apply(h.router.finished(execution_id, ExecutionResult(gpu_seconds=0.0), h.now))
    assert h.status(request) == "succeeded"
    assert h.charged("alice") == pytest.approx(0.0)


def test_an_expired_request_says_how_long_it_was_given(harness_for) -> None:
    """A request past its timeout expires with a timeout error naming the timeout."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    request = h.submit(chat(timeout_s=5))
    h.advance(6.0)
    stored = h.store.get_request(request.id)
    assert stored is not None
    assert stored.status.value == "expired"
    assert stored.error is not None
    assert (stored.error.type, stored.error.message) == ("timeout", "not finished within 5 s")


def test_cancelling_a_running_request_tells_its_backend_which_request_and_execution(
    harness_for,
) -> None:
    """The stop decision for a cancelled running request names its request, execution, backend."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    request = h.submit(chat())
    dispatch = h.dispatch_of(request)
    h.apply(h.router.started(dispatch.execution_id, h.now))
    h.apply(h.router.cancel(request.id, h.now))
    assert [(c.request_id, c.execution_id, c.backend) for c in h.cancelled] == [
        (request.id, dispatch.execution_id, "sim")
    ]

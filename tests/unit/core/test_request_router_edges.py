"""Request-router cases that mutation testing found unchecked: audit, charges, expiry, holds."""

from __future__ import annotations

from typing import Any

import pytest
from core_harness import Harness

from gpu_request_router.core.events import ExecutionResult, FailureKind
from gpu_request_router.core.request_receiver import Submission
from gpu_request_router.models.request import Request, ResourceHints
from gpu_request_router.testing import chat, make_settings, reading


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
    assert trail(h, request)[-1] == ("expired", "router"), "the router's doing, not the user's"


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


def test_forgetting_a_queued_request_takes_it_out_of_the_queue_counts_once(harness_for) -> None:
    """A queued request whose creation the store refused leaves the user's and the total count.

    Only it: the other request waiting stays counted, and the global bound sees one place free.
    """
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1)
    h.submit(chat())
    refused, kept = h.submit(chat(), user="bob"), h.submit(chat(), user="bob")
    assert (h.status(refused), h.status(kept)) == ("queued", "queued")
    assert h.router.queued_total() == 2
    h.apply(h.router.forget(refused.id, h.now))
    assert h.router.queued_total() == 1
    assert h.router.queued_count("bob") == 1


def test_requests_on_names_the_requests_running_on_a_gpu(harness_for) -> None:
    """What runs on each GPU, by request id; nothing for an idle GPU or one never reported."""
    h: Harness = harness_for(gpus=[("H100-80GB", 2)], slots=2)
    first, second = h.submit(chat()), h.submit(chat(), user="bob")
    placed = {request.id: h.dispatch_of(request).placement.gpu_ids for request in (first, second)}
    for gpu_id in ("sim:0", "sim:1"):
        expected = sorted(rid for rid, gpu_ids in placed.items() if gpu_id in gpu_ids)
        assert sorted(h.router.requests_on(gpu_id)) == expected
    assert sorted(h.router.requests_on("sim:0") + h.router.requests_on("sim:1")) == sorted(placed)
    assert h.router.requests_on("nowhere:0") == []
    h.finish(first)
    assert first.id not in h.router.requests_on("sim:0") + h.router.requests_on("sim:1")


STARVING_AFTER_5_S = {"starvation_bound_s": 5}


def _pinned(memory_mb: int, gpu_type: str | None = None, **kwargs: Any) -> Submission:
    """A chat asking for exactly ``memory_mb`` per GPU (above its weights), on ``gpu_type``."""
    return chat(resources=ResourceHints(gpu_memory_mb=memory_mb, gpu_type=gpu_type), **kwargs)


def _starving_beside(h: Harness, starts: dict[str, float]) -> Request:
    """Start each running request at its time, then a 45 GB request starves 6 s past it.

    A request that fits nowhere either arrives then: its pass makes the hold.
    """
    for request_id, at in sorted(starts.items(), key=lambda item: item[1]):
        execution_id = h.router.execution_of(request_id)
        assert execution_id is not None
        h.apply(h.router.started(execution_id, at))
    large = h.submit(_pinned(45_000), user="b")
    h.now += 6
    assert h.status(h.submit(_pinned(40_000), user="c")) == "queued"
    return large


def test_a_hold_counts_running_work_from_its_start_not_its_dispatch() -> None:
    """Work that waited on its worker before starting ends that much later.

    sim:0's work was dispatched first but started 40 s later; sim:1's, dispatched 5 s after
    it, started at once. Both are estimated alike, so sim:1 frees its memory first.
    """
    h = Harness(make_settings(gpus=[("H100-80GB", 2)], placement=STARVING_AFTER_5_S))
    early = h.submit(_pinned(60_000, max_tokens=8_000), user="a")
    h.now += 5
    prompt = h.submit(_pinned(60_000, max_tokens=8_000), user="a")
    assert [h.dispatch_of(r).placement.gpu_ids for r in (early, prompt)] == [
        ("sim:0",),
        ("sim:1",),
    ]
    h.now = 1_040.0
    large = _starving_beside(h, {prompt.id: 1_005.0, early.id: 1_040.0})
    assert h.router.holds == {large.id: ("sim:1",)}


def test_a_hold_counts_running_work_at_the_speed_of_its_gpu_type() -> None:
    """The same work ends sooner on an H100 than on an A100, though it started 5 s later there."""
    settings = make_settings(
        gpus=[("A100-80GB", 1), ("H100-80GB", 1)], placement=STARVING_AFTER_5_S
    )
    h = Harness(settings)
    slow = h.submit(_pinned(60_000, "A100-80GB", max_tokens=8_000), user="a")
    h.now += 5
    fast = h.submit(_pinned(60_000, "H100-80GB", max_tokens=8_000), user="a")
    estimate = h.dispatch_of(fast).request.estimate
    assert estimate.duration_on("A100-80GB") > estimate.duration_on("H100-80GB") + 5
    assert [h.dispatch_of(r).placement.gpu_ids for r in (slow, fast)] == [("sim:0",), ("sim:1",)]
    large = _starving_beside(h, {slow.id: 1_000.0, fast.id: 1_005.0})
    assert h.router.holds == {large.id: ("sim:1",)}


def test_a_hold_on_a_gpu_taken_out_of_service_moves_to_one_in_service() -> None:
    """Cordoning the held GPU drops the hold there; the starving request holds another."""
    h = Harness(make_settings(gpus=[("H100-80GB", 2)], placement=STARVING_AFTER_5_S))
    h.submit(_pinned(60_000), user="a")  # sim:0: 20.5 GB room
    h.submit(_pinned(50_000), user="a")  # sim:1: 30.5 GB room, the closest for 45 GB
    large = _starving_beside(h, {})
    assert h.router.holds == {large.id: ("sim:1",)}
    h.apply(h.router.cordon("sim:1", h.now))
    assert h.router.holds == {large.id: ("sim:0",)}


def test_a_backends_circuit_blocks_every_gpu_of_it_and_shows_on_its_gauge() -> None:
    """Failures spread over a backend's GPUs open its circuit though no GPU's own circuit opens.

    Three 60 GB requests fail on three different GPUs: each GPU has one failure (threshold 3),
    the backend three. All its GPUs are then blocked, and the backend's gauge says open.
    """
    settings = make_settings(
        gpus=[("H100-80GB", 3)],
        retries={"max_attempts": 1, "circuit_breaker": {"failure_threshold": 3, "reset_s": 30}},
    )
    h = Harness(settings)
    requests = [h.submit(_pinned(60_000), user=user) for user in ("a", "b", "c")]
    placed = {h.dispatch_of(r).placement.gpu_ids[0] for r in requests}
    assert placed == {"sim:0", "sim:1", "sim:2"}
    for request in requests:
        h.fail(request, FailureKind.BACKEND_ERROR)
    assert all(h.router.monitor.gpus[g].circuit_open for g in placed)
    assert h.engine.registry.get_sample_value("gpurouter_circuit_open", {"backend": "sim"}) == 1
    assert h.status(h.submit(chat())) == "queued"


def test_an_ended_execution_beside_its_resident_weights_counts_its_full_size() -> None:
    """The hidden excess of an execution that ends is its full size less its peak.

    The model is resident on sim:0, so the request reserves only its working memory (its size
    less the weights). It ends having used 2 GB less than its size, weights included: until the
    next reading, those 2 GB count as used by others, not the size of its reservation less peak.
    """
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    loaded = reading("sim", 0, models_loaded=("llama-3-8b",))
    h.apply(h.router.readings([loaded], h.now, worker="sim"))
    request = h.submit(_pinned(40_000))
    dispatch = h.dispatch_of(request)
    size = dispatch.request.estimate.gpu_memory_mb
    reserved = dispatch.reservations["sim:0"]
    assert reserved == size - dispatch.request.estimate.weights_mb
    h.now += 1
    h.apply(h.router.readings([loaded], h.now, worker="sim"))  # it has seen the execution
    gpu = h.router.monitor.gpus["sim:0"]
    limit = h.router.monitor.limit_mb(gpu)
    h.apply(
        h.router.finished(
            dispatch.execution_id, ExecutionResult(peak_memory_mb=size - 2_000), h.now
        )
    )
    assert gpu.room_mb == limit - 2_000

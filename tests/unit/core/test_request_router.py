"""Scenario tests of the dispatch loop: fairness, aging, backfill, retries, expiry, cancel."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
from core_harness import Harness
from structlog.testing import capture_logs

from gpu_request_router.core.engine import fleet_gpu_types
from gpu_request_router.core.events import (
    CancelExecution,
    Dispatch,
    ExecutionResult,
    FailureKind,
    StateChange,
)
from gpu_request_router.core.fit import need_of
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.core.request_router import gpu_seconds
from gpu_request_router.core.resource_estimator import ResourceEstimator
from gpu_request_router.exceptions import NotFound
from gpu_request_router.models.gpu_state import GPUHealth
from gpu_request_router.models.request import Request, RequestStatus, ResourceHints, Shape
from gpu_request_router.models.user_quota import QuotaUsage
from gpu_request_router.testing import chat, make_settings, reading, readings_for


def _sized(memory_mb: int, **kwargs: Any) -> Submission:
    """A chat submission that asks for exactly ``memory_mb`` per GPU (a hint above its weights)."""
    return chat(resources=ResourceHints(gpu_memory_mb=memory_mb), **kwargs)


def test_light_user_is_served_among_the_first_two_once_a_slot_frees(harness_for) -> None:
    """A user with one request is not starved by a user with 100 queued at the same priority."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1)
    blocker = h.submit(chat(), user="carol")
    heavy = [h.submit(chat(), user="heavy") for _ in range(100)]
    h.now += 1
    light = h.submit(chat(), user="light")
    assert h.dispatched_ids() == [blocker.id]
    h.finish(blocker)
    h.finish(h.router.get(h.dispatched_ids()[-1]) or heavy[0])
    first_two = h.dispatched_ids()[1:3]
    # heavy and light wait at counter 0 (light was lifted to it): heavy[0]'s earlier key goes
    # first, then heavy has been charged and light is next.
    assert first_two == [heavy[0].id, light.id]


def test_fair_share_alternates_between_backlogged_users(harness_for) -> None:
    """Two backlogged users of equal requests take turns rather than first come, first served."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1)
    blocker = h.submit(chat(), user="carol")
    for _ in range(5):
        h.submit(chat(), user="ann")
    for _ in range(5):
        h.submit(chat(), user="bob")
    h.finish(blocker)
    for _ in range(6):
        h.finish(h.router.get(h.dispatched_ids()[-1]))
    users = [h.store.get_request(rid).user for rid in h.dispatched_ids()[1:7]]
    assert users.count("ann") == 3 and users.count("bob") == 3
    assert all(a != b for a, b in itertools.pairwise(users))


def test_higher_priority_goes_first(harness_for) -> None:
    """Among queued requests the higher class is dispatched first when a slot frees."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1)
    blocker = h.submit(chat())
    low = h.submit(chat(priority="low"), user="ann")
    high = h.submit(chat(priority="high"), user="bob")
    h.finish(blocker)
    assert h.dispatched_ids()[1] == high.id
    h.finish(high)
    assert h.dispatched_ids()[2] == low.id


def test_batch_request_is_dispatched_within_its_aging_bound_under_continuous_high_load() -> None:
    """A batch request ages one class per aging period and starts before fresher high ones."""
    settings = make_settings(gpus=[("H100-80GB", 1)], slots=1, priorities={"aging_seconds": 60})
    h = Harness(settings)
    blocker = h.submit(chat(priority="high"), user="hog")
    batch = h.submit(chat(priority="batch"), user="patient")
    running = blocker
    started_at = None
    # A new high request arrives every 10 s and each runs for 10 s: the GPU is never idle.
    for _ in range(40):
        h.submit(chat(priority="high"), user="hog")
        h.now += 10
        h.finish(running)
        running = h.router.get(h.dispatched_ids()[-1])
        if running.id == batch.id:
            started_at = h.now
            break
    assert started_at is not None, "the batch request starved"
    waited = started_at - batch.created_at
    bound = (4 - 1) * 60  # from class batch (rank 4) up to class high (rank 1)
    assert bound - 10 < waited <= bound + 10


def test_small_request_backfills_while_a_large_one_waits_and_the_large_one_still_starts() -> None:
    """Backfill places what fits, and after the starvation bound the large one's GPU is held."""
    settings = make_settings(gpus=[("H100-80GB", 1)], placement={"starvation_bound_s": 30})
    h = Harness(settings)
    running = h.submit(_sized(40_000), user="a")
    large = h.submit(_sized(60_000), user="b")
    small = h.submit(_sized(20_000), user="c")
    assert h.dispatched_ids() == [running.id, small.id], "the small one backfills at once"
    h.finish(small)
    h.now += 31  # the large one is now past the starvation bound
    late_small = h.submit(_sized(30_000), user="c")
    assert late_small.id not in h.dispatched_ids(), "the GPU is held for the starving request"
    h.finish(running)
    assert h.dispatched_ids()[2] == large.id
    assert h.status(late_small) == "queued"
    h.finish(large)
    assert h.dispatched_ids()[-1] == late_small.id


def _starving_on_two_gpus() -> tuple[Harness, Request, Request, Request]:
    """sim:0 runs 60 GB (20.5 GB room), sim:1 50 GB (30.5 GB room); 45 GB has starved 31 s."""
    settings = make_settings(gpus=[("H100-80GB", 2)], placement={"starvation_bound_s": 30})
    h = Harness(settings)
    on_0 = h.submit(_sized(60_000), user="a")
    on_1 = h.submit(_sized(50_000), user="a")
    assert [h.dispatch_of(r).placement.gpu_ids for r in (on_0, on_1)] == [("sim:0",), ("sim:1",)]
    large = h.submit(_sized(45_000), user="b")
    h.now += 31
    return h, on_0, on_1, large


def test_a_starving_request_holds_the_gpu_closest_to_fitting_it_until_it_starts() -> None:
    """The hold outlasts the pass that made it: freed memory there waits for the large request."""
    h, _, on_1, large = _starving_on_two_gpus()
    medium = h.submit(_sized(25_000), user="c")  # would fit sim:1 only, which is held
    assert h.status(medium) == "queued"
    h.now += 1
    later = h.submit(_sized(25_000), user="d")
    assert h.status(later) == "queued", "the hold lasts into later passes"
    small = h.submit(_sized(15_000), user="e")
    assert h.dispatch_of(small).placement.gpu_ids == ("sim:0",), "other GPUs stay open"
    assert h.engine.registry.get_sample_value("gpurouter_gpus_held") == 1
    h.finish(on_1)
    assert h.dispatch_of(large).placement.gpu_ids == ("sim:1",)
    assert h.engine.registry.get_sample_value("gpurouter_gpus_held") == 0
    # The hold ends when it starts: the 35.5 GB left there take one of the 25 GB requests.
    started = [r for r in (medium, later) if h.status(r) != "queued"]
    assert len(started) == 1
    assert h.dispatch_of(started[0]).placement.gpu_ids == ("sim:1",)


def test_a_starving_request_holds_the_gpu_expected_to_fit_it_soonest() -> None:
    """Closer in memory is not sooner: the hold goes where the running work is expected to end.

    sim:0 runs 60 GB of a short answer (0.2 s estimated, overrun: expected to need half as long
    again as its 31 s), sim:1 50 GB of a long one (89 s estimated); 45 GB is 24.5 GB short on
    sim:0 and 14.5 GB on sim:1, yet sim:0 is expected to free first.
    """
    settings = make_settings(gpus=[("H100-80GB", 2)], placement={"starvation_bound_s": 30})
    h = Harness(settings)
    brief = h.submit(_sized(60_000, max_tokens=16), user="a")
    lengthy = h.submit(_sized(50_000, max_tokens=8_000), user="a")
    assert [h.dispatch_of(r).placement.gpu_ids for r in (brief, lengthy)] == [
        ("sim:0",),
        ("sim:1",),
    ]
    large = h.submit(_sized(45_000), user="b")
    h.now += 31
    small = h.submit(_sized(15_000), user="c")  # fits sim:0 tightest, but sim:0 is held
    assert h.router.holds == {large.id: ("sim:0",)}
    assert h.dispatch_of(small).placement.gpu_ids == ("sim:1",)
    h.finish(brief)
    assert h.dispatch_of(large).placement.gpu_ids == ("sim:0",)
    assert h.status(lengthy) == "dispatching"


def test_a_higher_priority_request_may_use_a_held_gpu() -> None:
    """A hold binds its own priority level and below; priority order still comes first."""
    h, _, _, large = _starving_on_two_gpus()
    normal = h.submit(_sized(25_000), user="c")
    urgent = h.submit(_sized(25_000, priority="high"), user="c")
    assert h.status(normal) == "queued"
    assert h.dispatch_of(urgent).placement.gpu_ids == ("sim:1",)
    assert h.status(large) == "queued"


def test_two_starving_requests_hold_different_gpus() -> None:
    """Holds never overlap: the second starving request takes the next closest GPU."""
    h, on_0, on_1, large = _starving_on_two_gpus()
    h.now -= 31
    second = h.submit(_sized(45_000), user="c")
    h.now += 31
    small = h.submit(_sized(15_000), user="d")  # fits sim:0, now held for the second one
    assert h.status(small) == "queued"
    h.finish(on_0)
    assert h.dispatch_of(second).placement.gpu_ids == ("sim:0",)
    assert h.status(large) == "queued", "sim:1 is still 14.5 GB short"
    h.finish(on_1)
    assert h.dispatch_of(large).placement.gpu_ids == ("sim:1",)


def test_a_hold_outlasts_a_pass_that_stops_at_the_backfill_depth() -> None:
    """Holds made in a pass that stops at ``backfill_depth`` survive it: one hold, not one each."""
    settings = make_settings(
        gpus=[("H100-80GB", 2)], placement={"starvation_bound_s": 30, "backfill_depth": 2}
    )
    h = Harness(settings)
    h.submit(_sized(60_000), user="a")
    h.submit(_sized(50_000), user="a")
    large = h.submit(_sized(45_000), user="b")
    for user in ("c", "d", "e"):
        h.submit(_sized(35_000), user=user)  # fit nowhere either
    h.now += 31
    with capture_logs() as logs:
        for user in ("f", "g", "h"):  # each pass: two misses (both held), then it stops
            h.submit(_sized(35_000), user=user)
            h.now += 1
    holds = [log["gpu_ids"] for log in logs if log.get("request_id") == large.id]
    assert holds == [["sim:1"]]


def test_a_hold_is_moved_when_memory_used_by_others_leaves_too_little_for_it() -> None:
    """A hold on a GPU where the request no longer fits even drained moves to one where it does."""
    settings = make_settings(gpus=[("H100-80GB", 2)], placement={"starvation_bound_s": 30})
    h = Harness(settings)
    h.submit(_sized(60_000), user="a")  # sim:0: 20.5 GB room
    h.submit(_sized(40_000), user="a")  # sim:1: 40.5 GB room, the closest for 45 GB
    large = h.submit(_sized(45_000), user="b")
    h.now += 31
    with capture_logs() as logs:
        h.submit(_sized(30_000), user="c")  # fits only sim:1, held: waits
        # Something outside the router takes 36 GB of sim:1: 45 GB no longer fits there.
        grown = [
            dataclasses.replace(r, memory_used_mb=76_000, memory_reserved_mb=40_000)
            if r.gpu_id == "sim:1"
            else r
            for r in readings_for(settings)
        ]
        h.apply(h.router.readings(grown, h.now))
        small = h.submit(_sized(15_000), user="d")  # would fit sim:0, now held
    holds = [(log["request_id"], log["gpu_ids"]) for log in logs if log["event"] == "gpus_held"]
    assert holds == [(large.id, ["sim:1"]), (large.id, ["sim:0"])]
    assert h.status(small) == "queued"


def test_a_hold_ends_when_its_request_leaves_the_queue() -> None:
    """Cancelling the starving request frees its held GPU for the others at once."""
    h, _, _, large = _starving_on_two_gpus()
    medium = h.submit(_sized(25_000), user="c")
    assert h.status(medium) == "queued"
    h.apply(h.router.cancel(large.id, h.now))
    assert h.status(large) == "cancelled"
    h.now += 1
    h.apply(h.router.tick(h.now))
    assert h.dispatch_of(medium).placement.gpu_ids == ("sim:1",)


def test_an_out_of_memory_failure_cuts_the_gpus_room_until_the_next_reading(harness_for) -> None:
    """The failure proves the GPU had less free than the execution needed; the view follows."""
    h: Harness = harness_for(gpus=[("H100-80GB", 2)])
    request = h.submit(_sized(30_000))
    dispatch = h.dispatch_of(request)
    gpu_id = dispatch.placement.gpu_ids[0]
    resident = request.estimate.gpu_memory_mb - dispatch.reservations[gpu_id]  # loaded weights
    h.fail(request, FailureKind.OUT_OF_MEMORY, peak_memory_mb=36_000)
    gpu = h.router.monitor.gpus[gpu_id]
    # It needed 36 GB in all, weights included: fewer than 36 GB − weights were free.
    assert gpu.room_mb == 36_000 - resident - h.settings.placement.memory_safety_margin_mb - 1
    h.advance(1.0)  # a fresh reading shows the truth
    assert gpu.room_mb == gpu.memory_total_mb - h.settings.placement.memory_safety_margin_mb


def test_request_that_fits_nowhere_now_does_not_block_others_behind_it(harness_for) -> None:
    """Head-of-line blocking is avoided: a big request waiting leaves room for later small ones."""
    h: Harness = harness_for(gpus=[("H100-80GB", 2)])
    first = h.submit(_sized(45_000), user="a")
    second = h.submit(_sized(45_000), user="a")
    big = h.submit(_sized(70_000, priority="high"), user="b")
    small = [h.submit(_sized(16_000), user="c") for _ in range(4)]
    assert set(h.dispatched_ids()) == {first.id, second.id, *(r.id for r in small)}
    assert h.status(big) == "queued"


def test_out_of_memory_raises_the_estimate_and_retries_on_another_gpu(harness_for) -> None:
    """An OOM puts the request back with a bigger estimate, retried after a backoff elsewhere."""
    h: Harness = harness_for(gpus=[("H100-80GB", 2)])
    request = h.submit(chat())
    first = h.dispatch_of(request)
    h.fail(request, FailureKind.OUT_OF_MEMORY, message="CUDA out of memory", peak_memory_mb=None)
    assert h.status(request) == "queued"
    assert h.store.get_request(request.id).error.type == "gpu_out_of_memory"
    h.advance(2.0)
    second = h.dispatch_of(request)
    assert second.attempt == 2
    grown = second.request.estimate.gpu_memory_mb
    assert grown >= int(first.request.estimate.gpu_memory_mb * 1.5)
    assert second.placement.gpu_ids != first.placement.gpu_ids
    assert sum(second.reservations.values()) == grown


def test_oom_estimate_growing_past_every_gpu_fails_the_request(harness_for) -> None:
    """When the grown estimate fits no GPU of the fleet the request fails instead of waiting."""
    h: Harness = harness_for(gpus=[("L4-24GB", 2)])
    request = h.submit(_sized(20_000))
    h.fail(request, FailureKind.OUT_OF_MEMORY, peak_memory_mb=None)
    stored = h.store.get_request(request.id)
    assert stored.status is RequestStatus.FAILED
    assert "fits no GPU" in stored.error.message


def test_failing_every_attempt_fails_after_max_attempts(harness_for) -> None:
    """A poison pill fails with max_attempts after exactly retries.max_attempts attempts."""
    h: Harness = harness_for(gpus=[("H100-80GB", 3)])
    request = h.submit(chat())
    for attempt in range(1, 4):
        assert h.dispatch_of(request).attempt == attempt
        h.fail(request, FailureKind.BACKEND_ERROR, message="boom")
        h.advance(5.0)
    stored = h.store.get_request(request.id)
    assert stored.status is RequestStatus.FAILED
    assert stored.attempts == 3
    assert "max attempts" in stored.error.message


def test_client_error_fails_without_retry(harness_for) -> None:
    """A client error is final: no second attempt."""
    h: Harness = harness_for()
    request = h.submit(chat())
    h.fail(request, FailureKind.CLIENT_ERROR, message="bad prompt")
    h.advance(5.0)
    assert h.status(request) == "failed"
    assert len([d for d in h.dispatches if d.request.id == request.id]) == 1


def test_queued_request_expires_at_its_deadline(harness_for) -> None:
    """A request still waiting when its timeout passes expires with a timeout error."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1)
    h.submit(chat())
    waiting = h.submit(chat(timeout_s=5))
    h.advance(4.0)
    assert h.status(waiting) == "queued"
    h.advance(2.0)
    stored = h.store.get_request(waiting.id)
    assert stored.status is RequestStatus.EXPIRED
    assert stored.error.type == "timeout"
    assert h.router.queue.depths()["normal"] == 0


def test_running_request_expires_and_its_execution_is_cancelled(harness_for) -> None:
    """A hanging execution is stopped at the deadline and its reservation released."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    request = h.submit(chat(timeout_s=3))
    dispatch = h.dispatch_of(request)
    h.apply(h.router.started(dispatch.execution_id, h.now))
    h.advance(4.0)
    assert h.status(request) == "expired"
    assert [c.execution_id for c in h.cancelled] == [dispatch.execution_id]
    assert h.router.monitor.gpus["sim:0"].reserved_mb == 0


def test_cancel_queued_request_removes_it_from_the_queue(harness_for) -> None:
    """Cancelling a queued request ends it and leaves nothing behind in the queue."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1)
    h.submit(chat())
    queued = h.submit(chat())
    assert h.router.queue.depths()["normal"] == 1
    decisions = h.apply(h.router.cancel(queued.id, h.now))
    assert [(d.entry.from_status, d.entry.to_status, d.entry.actor) for d in decisions] == [
        (RequestStatus.QUEUED, RequestStatus.CANCELLED, "user")
    ], "the status change alone: nothing to start or stop"
    assert h.status(queued) == "cancelled"
    assert h.router.queue.depths()["normal"] == 0
    assert h.router.queued_count("alice") == 0


def test_cancel_running_request_releases_its_reservation_and_stops_the_execution(
    harness_for,
) -> None:
    """Cancelling running work tells the backend, frees the GPU at once, ignores late results."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1)
    running = h.submit(chat())
    waiting = h.submit(chat())
    dispatch = h.dispatch_of(running)
    gpu = h.router.monitor.gpus["sim:0"]
    assert gpu.reserved_mb > 0
    decisions = h.apply(h.router.cancel(running.id, h.now))
    changes = [(d.request.id, d.entry.to_status) for d in decisions[:2]]
    assert changes == [
        (running.id, RequestStatus.CANCELLED),
        (waiting.id, RequestStatus.DISPATCHING),
    ], "the status changes come first, to be persisted before they are acted on"
    assert isinstance(decisions[2], CancelExecution)
    assert decisions[2].execution_id == dispatch.execution_id
    assert isinstance(decisions[3], Dispatch) and decisions[3].request.id == waiting.id
    assert len(decisions) == 4
    assert gpu.reserved_mb == decisions[3].reservations["sim:0"]
    assert gpu.running == {decisions[3].execution_id: gpu.reserved_mb}
    h.finish(running)  # a late answer of the cancelled execution
    assert h.status(running) == "cancelled"


def test_cancel_twice_and_unknown_ids(harness_for) -> None:
    """A finished request leaves the core (the store says how it ended); unknown ids are not found.

    Cancelling it again changes nothing: the core knows only live requests, and the driver answers
    from the store that it has finished.
    """
    h: Harness = harness_for()
    request = h.submit(chat())
    h.apply(h.router.cancel(request.id, h.now))
    assert h.router.get(request.id) is None
    with pytest.raises(NotFound):
        h.router.cancel(request.id, h.now)
    assert h.status(request) == "cancelled"
    assert [t.to_status for t in h.store.transitions(request.id)][-1] is RequestStatus.CANCELLED
    assert len(h.store.transitions(request.id)) == 3, "queued, dispatching, cancelled: once"
    with pytest.raises(NotFound):
        h.router.cancel("req_nope", h.now)


def test_multi_gpu_request_takes_gpus_of_one_worker_or_waits() -> None:
    """gpu_count 2 gets two GPUs of one worker at once; two workers of one GPU each do not do."""
    settings = make_settings(
        backends=[
            {"name": "w1", "kind": "simulated", "gpus": [{"type": "H100-80GB", "count": 1}]},
            {"name": "w2", "kind": "simulated", "gpus": [{"type": "H100-80GB", "count": 1}]},
            {"name": "w3", "kind": "simulated", "gpus": [{"type": "H100-80GB", "count": 2}]},
        ]
    )
    h = Harness(settings)
    big_pair = ResourceHints(gpu_count=2, gpu_memory_mb=60_000)
    blocker = h.submit(chat(resources=big_pair), user="a")
    assert h.dispatch_of(blocker).placement.gpu_ids == ("w3:0", "w3:1")
    pair = h.submit(chat(resources=big_pair), user="b")
    single = h.submit(chat(), user="c")
    assert h.status(single) == "dispatching"
    h.finish(single)
    assert h.status(pair) == "queued", "one GPU on each of two workers is not a pair"
    h.finish(blocker)
    assert h.dispatch_of(pair).placement.worker == "w3"


def test_max_concurrent_keeps_extra_requests_queued(harness_for) -> None:
    """A user at max_concurrent waits in the queue while others' work is placed."""
    h: Harness = harness_for(quota={"max_concurrent": 1})
    first = h.submit(chat(), user="ann")
    second = h.submit(chat(), user="ann")
    other = h.submit(chat(), user="bob")
    assert h.dispatched_ids() == [first.id, other.id]
    h.finish(first)
    assert h.dispatched_ids()[-1] == second.id


def test_lost_gpu_work_is_retried_elsewhere_and_late_results_are_ignored() -> None:
    """A GPU missing from its worker's report loses its work, which runs again on another GPU."""
    settings = make_settings(gpus=[("H100-80GB", 2)])
    h = Harness(settings)
    request = h.submit(chat())
    first = h.dispatch_of(request)
    lost_gpu = first.placement.gpu_id
    remaining = [r for r in (reading("sim", 0), reading("sim", 1)) if r.gpu_id != lost_gpu]
    decisions = h.apply(h.router.readings(remaining, h.now, worker="sim"))
    assert any(isinstance(d, CancelExecution) for d in decisions)
    assert h.router.monitor.gpus[lost_gpu].health is GPUHealth.UNHEALTHY
    failed_over = h.store.transitions(request.id)[-1]
    assert (failed_over.to_status.value, failed_over.actor) == ("queued", "router")
    h.now += 2
    h.apply(h.router.readings(remaining, h.now, worker="sim"))
    h.apply(h.router.tick(h.now))
    second = h.dispatch_of(request)
    assert second.attempt == 2 and second.placement.gpu_id != lost_gpu
    h.apply(h.router.finished(first.execution_id, ExecutionResult(output="stale"), h.now))
    assert h.status(request) == "dispatching", "the lost execution's result changes nothing"
    h.finish(request, output="fresh")
    assert h.store.get_request(request.id).result == "fresh"


def test_circuit_opens_after_repeated_backend_failures_and_half_opens_after_reset() -> None:
    """Five backend errors open the GPU's circuit; after reset_s one probe is let through."""
    settings = make_settings(
        gpus=[("H100-80GB", 1)],
        retries={"max_attempts": 1, "circuit_breaker": {"failure_threshold": 5, "reset_s": 30}},
    )
    h = Harness(settings)
    for _ in range(5):
        request = h.submit(chat())
        h.fail(request, FailureKind.BACKEND_ERROR)
    gpu = h.router.monitor.gpus["sim:0"]
    assert gpu.circuit_open and not gpu.schedulable
    waiting = [h.submit(chat()) for _ in range(2)]
    assert all(h.status(r) == "queued" for r in waiting)
    h.advance(31)
    assert h.status(waiting[0]) == "dispatching", "the probe"
    assert h.status(waiting[1]) == "queued", "only one probe while half-open"
    h.finish(waiting[0])
    assert not gpu.circuit_open
    assert h.status(waiting[1]) == "dispatching"


def test_drain_lets_running_work_finish_and_places_nothing_new(harness_for) -> None:
    """A drained GPU keeps its running work, takes no new work, and stops draining when empty."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    running = h.submit(chat())
    h.apply(h.router.drain("sim:0", h.now))
    gpu = h.router.monitor.gpus["sim:0"]
    assert gpu.cordoned and gpu.draining
    waiting = h.submit(chat())
    assert h.status(waiting) == "queued"
    h.finish(running)
    assert not gpu.draining and gpu.cordoned
    assert h.status(waiting) == "queued"
    h.apply(h.router.uncordon("sim:0", h.now))
    assert h.status(waiting) == "dispatching"


def test_restart_recovers_queued_and_retries_in_flight_work() -> None:
    """A new router on the same store queues again what waited and retries what was in flight."""
    settings = make_settings(gpus=[("H100-80GB", 1)], slots=1)
    h = Harness(settings)
    running = h.submit(chat())
    waiting = h.submit(chat())
    done = h.submit(chat(), user="bob")
    h.apply(h.router.cancel(done.id, h.now))
    restarted = Harness(settings, store=h.store)
    restarted.recover()
    again = restarted.dispatch_of(running)
    assert again.attempt == 2
    assert restarted.store.get_request(running.id).error.type == "router_restarted"
    assert restarted.router.get(waiting.id) is not None
    assert restarted.status(done) == "cancelled"
    restarted.finish(running)
    assert restarted.dispatch_of(waiting).attempt == 1


def test_gpu_type_request_only_lands_on_that_type() -> None:
    """resources.gpu_type restricts placement to GPUs of that type."""
    settings = make_settings(gpus=[("H100-80GB", 1), ("L4-24GB", 1)])
    h = Harness(settings)
    request = h.submit(chat(resources=ResourceHints(gpu_type="L4-24GB")))
    assert h.router.monitor.gpus[h.dispatch_of(request).placement.gpu_id].type == "L4-24GB"


def test_model_loaded_gpu_reserves_no_weights() -> None:
    """A GPU whose backend has the model resident needs only the KV cache and activations."""
    settings = make_settings(gpus=[("H100-80GB", 1)])
    h = Harness(settings)
    resident = reading("sim", 0, models_loaded=("llama-3-8b",), used_mb=15317)
    h.apply(h.router.readings([resident], h.now, worker="sim"))
    request = h.submit(chat(shape=Shape(1, 1000, 1000)))
    dispatch = h.dispatch_of(request)
    estimate = dispatch.request.estimate
    assert dispatch.reservations["sim:0"] == estimate.gpu_memory_mb - estimate.weights_mb
    assert "model loaded" in dispatch.placement.reason


def test_balanced_packs_sized_requests_and_spreads_estimated_ones(harness_for) -> None:
    """A memory hint is a known size, packed; a chat request's size is a guess, spread.

    The guess (the answer's length) goes to the idle GPU, where its error has room. (Two known
    sizes of 10 GB on one H100 leave its hole usable to a third: packing them fragments nothing.)
    """
    h: Harness = harness_for(gpus=[("H100-80GB", 2)], slots=4)
    first = h.submit(_sized(10_000), user="ann")
    gpu = h.dispatch_of(first).placement.gpu_id
    sized = h.submit(_sized(10_000), user="bob")
    assert h.dispatch_of(sized).placement.gpu_id == gpu
    guessed = h.submit(chat(), user="carol")
    assert h.dispatch_of(guessed).placement.gpu_id != gpu
    assert need_of(sized).exact and not need_of(guessed).exact
    # An out-of-memory failure proves the hint short: the grown size is a guess from then on.
    h.fail(sized, FailureKind.OUT_OF_MEMORY, message="CUDA out of memory", peak_memory_mb=None)
    grown = h.router.get(sized.id)
    assert grown is not None
    assert grown.estimate.gpu_memory_mb > 10_000
    assert not need_of(grown).exact


def test_a_finished_execution_below_its_reservation_keeps_the_others_excess_counted(
    harness_for,
) -> None:
    """An execution ending below its reservation uncovers its neighbour's excess.

    Until the next reading the GPU's room shrinks by that excess instead of growing by the
    whole reservation.
    """
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=4)
    a = h.submit(_sized(20_000), user="ann")
    b = h.submit(_sized(20_000), user="bob")
    gpu_id = h.dispatch_of(a).placement.gpu_id
    state = h.router.monitor.gpus[gpu_id]
    total = state.memory_total_mb
    # a uses 26,000 and b 14,000: the reading nets them to exactly the reservations.
    seen = reading("sim", 0, used_mb=40_000, reserved_mb=40_000)
    h.apply(h.router.readings([seen], h.now, worker="sim"))
    h.finish(b, peak_memory_mb=14_000)
    margin = h.settings.placement.memory_safety_margin_mb
    assert state.room_mb == total - margin - 26_000


@pytest.mark.parametrize("reported", [float("inf"), float("nan"), -5.0])
def test_a_backend_reporting_impossible_gpu_seconds_is_charged_its_measured_time(
    harness_for, reported: float
) -> None:
    """A usage figure no window could hold is ignored: the running time is charged instead."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    request = h.submit(chat())
    dispatch = h.dispatch_of(request)
    h.apply(h.router.started(dispatch.execution_id, h.now))
    h.now += 7.0
    h.apply(h.router.finished(dispatch.execution_id, ExecutionResult(gpu_seconds=reported), h.now))
    assert h.status(request) == "succeeded"
    assert h.charged("alice") == pytest.approx(7.0)


def test_each_execution_is_charged_its_estimate_when_claimed_and_its_time_when_it_ends(
    harness_for,
) -> None:
    """The claim charges the estimate; a failure, a cancel and a success settle what ran."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])

    def charged() -> float:
        return h.charged("alice")

    request = h.submit(chat())
    first = h.dispatch_of(request)
    estimate = gpu_seconds(first.request)
    assert estimate > 0
    assert charged() == pytest.approx(estimate)
    h.apply(h.router.started(first.execution_id, h.now))
    h.now += 3.0
    h.fail(request, FailureKind.BACKEND_ERROR, message="boom")  # retried
    assert charged() == pytest.approx(3.0)
    h.advance(1.0)
    second = h.dispatch_of(request)
    assert second.attempt == 2
    assert charged() == pytest.approx(3.0 + estimate)
    h.apply(h.router.started(second.execution_id, h.now))
    h.now += 2.0
    h.apply(h.router.cancel(request.id, h.now))
    assert charged() == pytest.approx(5.0)
    other = h.submit(chat())
    third = h.dispatch_of(other)
    h.apply(h.router.started(third.execution_id, h.now))
    h.now += 4.0
    h.apply(h.router.finished(third.execution_id, ExecutionResult(), h.now))
    assert charged() == pytest.approx(9.0)


def test_a_request_whose_creation_the_store_refused_is_taken_back_entirely(harness_for) -> None:
    """Forgetting a request undoes all the core decided for it: dispatch, memory, charge, rate.

    Its changes are never written (the store refused their batch); the GPU it held goes to the
    next request waiting, and its idempotency key is free again.
    """
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1)
    admission = h.engine.receiver.submit(chat(idempotency_key="k1"), Caller("alice"), h.now)
    refused = admission.request
    assert [type(d) for d in admission.decisions] == [StateChange, StateChange, Dispatch]
    gpu = h.router.monitor.gpus["sim:0"]
    assert gpu.reserved_mb > 0
    waiting = h.submit(chat(), user="bob")
    assert h.status(waiting) == "queued"
    assert h.router.quotas.usage("alice", queued=0, concurrent=0, now=h.now) == QuotaUsage(
        "alice", 1, 0, 0, gpu_seconds(refused)
    )
    decisions = h.apply(h.router.forget(refused.id, h.now))
    assert [type(d) for d in decisions] == [StateChange, Dispatch]
    assert h.dispatched_ids() == [waiting.id]
    assert gpu.running == {h.dispatch_of(waiting).execution_id: gpu.reserved_mb}
    assert h.router.get(refused.id) is None
    assert h.router.find_live("alice", "k1") is None
    assert h.router.active_count("alice") == 0 and h.router.queued_count("alice") == 0
    assert h.router.queued_total() == 0
    assert h.charged("alice") == 0.0 and h.admitted("alice") == 0
    assert h.store.get_request(refused.id) is None
    assert h.router.forget(refused.id, h.now) == [], "a second time (or an unknown id) is ignored"
    again = h.submit(chat(idempotency_key="k1"))
    assert again.id != refused.id and h.status(again) == "queued"


def _intrude_at_first_reservation(h: Harness, memory_mb: int) -> list[str]:
    """Another execution takes ``memory_mb`` on the GPU just before the core's next reservation.

    Returns the list that will name the execution whose reservation met the intruder.
    """
    monitor = h.router.monitor
    reserve = monitor.reserve
    intruded: list[str] = []

    def reserve_after_an_intruder(gpu_id: str, holder: str, size_mb: int) -> bool:
        if not intruded:
            intruded.append(holder)
            monitor.adopt(gpu_id, "exe_intruder", memory_mb)
        return reserve(gpu_id, holder, size_mb)

    monitor.reserve = reserve_after_an_intruder  # type: ignore[method-assign]
    return intruded


def test_a_dispatch_conflict_counts_toward_the_backfill_depth_after_other_misses() -> None:
    """Held by its quota, then refused by its GPU: two misses, so a depth of two ends the pass.

    The request behind them would fit beside the intruder, but waits for the next pass.
    """
    settings = make_settings(
        gpus=[("H100-80GB", 1)],
        slots=4,
        placement={"backfill_depth": 2},
        quota={"max_concurrent": 1},
    )
    h = Harness(settings)
    h.submit(_sized(16_000), user="ann")
    h.apply(h.router.cordon("sim:0", h.now))
    held = h.submit(_sized(10_000, priority="critical"), user="ann")  # at her quota: a miss
    refused = h.submit(_sized(40_000, priority="high"), user="bob")
    behind = h.submit(_sized(10_000), user="cat")
    intruded = _intrude_at_first_reservation(h, 45_000)
    h.apply(h.router.uncordon("sim:0", h.now))
    assert intruded == [f"exe_{refused.id}_1"]
    assert len(h.dispatched_ids()) == 1, "only ann's first request, from before the cordon"
    assert {h.status(r) for r in (held, refused, behind)} == {"queued"}


def test_a_refused_reservation_leaves_the_request_queued_uncharged_and_the_pass_going() -> None:
    """A GPU whose room changed under the choice refuses the memory: the request stays queued.

    Another execution takes room on the GPU between the choice and the reservation. The refused
    request is not charged, and the next one in the pass, which fits beside it, still starts: the
    conflict counts as one request passed over, within a backfill depth of two.
    """
    h = Harness(make_settings(gpus=[("H100-80GB", 1)], slots=3, placement={"backfill_depth": 2}))
    h.apply(h.router.cordon("sim:0", h.now))
    first = h.submit(_sized(40_000), user="ann")
    second = h.submit(_sized(20_000), user="bob")
    monitor = h.router.monitor
    intruded = _intrude_at_first_reservation(h, 50_000)
    with capture_logs() as logs:
        h.apply(h.router.uncordon("sim:0", h.now))  # one pass over both
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
        "dispatch_conflict"
    ]
    assert intruded == [f"exe_{first.id}_1"]
    assert h.dispatched_ids() == [second.id]
    assert h.status(first) == "queued"
    assert h.charged("ann") == 0.0
    assert h.charged("bob") > 0.0
    gpu = monitor.gpus["sim:0"]
    assert gpu.running == {"exe_intruder": 50_000, h.dispatch_of(second).execution_id: 20_000}
    assert gpu.reserved_mb == 70_000
    monitor.release("exe_intruder")
    h.advance(1.0)
    assert h.dispatch_of(first).attempt == 1
    assert h.status(first) == "dispatching"


def test_the_time_a_cold_start_spent_loading_is_not_learned_as_work() -> None:
    """The time a cold start spent loading weights is not learned as work.

    An execution that loaded its weights for 10 s of its 12 teaches the estimator 2 s of work:
    exactly what a twin estimator learns from a 2 s execution without a load.
    """
    harness = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    request = harness.submit(chat(max_tokens=200))
    twin = ResourceEstimator(harness.settings.models, fleet_gpu_types(harness.settings))
    twin.observe(
        request.model,
        "H100-80GB",
        request.estimate,
        2.0,
        20_000,
        shape=request.shape,
        hints=request.resources,
    )
    harness.now += 12.0
    harness.finish(request, gpu_seconds=12.0, peak_memory_mb=20_000, load_s=10.0)
    learned = harness.router.estimator.estimate(request.model, request.shape, request.resources)
    expected = twin.estimate(request.model, request.shape, request.resources)
    assert learned.duration_s == expected.duration_s
    untaught = ResourceEstimator(harness.settings.models, fleet_gpu_types(harness.settings))
    assert learned.duration_s != untaught.estimate(request.model, request.shape).duration_s

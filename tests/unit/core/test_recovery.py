"""Recovery after a restart: executions in flight are re-attached, collected or retried (I3)."""

from __future__ import annotations

import itertools
from typing import Any

from core_harness import Harness

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.events import (
    CancelExecution,
    ExecutionResult,
    Failure,
    FailureKind,
    InFlight,
    NotKnown,
    StateChange,
    StillRunning,
)
from gpu_request_router.models.gpu_state import GPUHealth
from gpu_request_router.models.request import Request, ResourceHints
from gpu_request_router.testing import chat, make_settings, reading


def _sized(memory_mb: int, **kwargs: Any) -> Any:
    """A chat submission that asks for exactly ``memory_mb`` per GPU."""
    return chat(resources=ResourceHints(gpu_memory_mb=memory_mb), **kwargs)


def _restart(h: Harness, settings: Settings | None = None) -> Harness:
    """A new core on the same store, five seconds later, with fresh readings (a restart)."""
    return Harness(settings or h.settings, store=h.store, now=h.now + 5)


def _running(h: Harness, request: Request) -> str:
    """Mark ``request``'s dispatch started; return its execution id."""
    execution_id = h.dispatch_of(request).execution_id
    h.apply(h.router.started(execution_id, h.now))
    return execution_id


def _statuses(h: Harness, request: Request) -> list[str]:
    return [entry.to_status.value for entry in h.store.transitions(request.id)]


def test_in_flight_names_each_execution_and_the_backend_to_ask() -> None:
    """Dispatching and running requests are listed with their backend; queued ones are not."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)], slots=2))
    running = h.submit(chat())
    dispatching = h.submit(chat())
    h.submit(chat())  # no slot left: queued
    execution_id = _running(h, running)
    restarted = _restart(h)
    asks = restarted.router.in_flight(h.store.unfinished_requests())
    assert sorted(asks, key=lambda ask: ask.request_id) == sorted(
        [
            InFlight(running.id, execution_id, "sim", "sim"),
            InFlight(dispatching.id, h.dispatch_of(dispatching).execution_id, "sim", "sim"),
        ],
        key=lambda ask: ask.request_id,
    )


def test_a_still_running_execution_is_reattached_not_run_again() -> None:
    """Same attempt and execution, status running, memory reserved again; its result is taken."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    request = h.submit(_sized(30_000))
    execution_id = _running(h, request)
    restarted = _restart(h)
    recovery = restarted.recover({execution_id: StillRunning()})
    assert restarted.dispatches == [] and restarted.cancelled == []
    assert [d.execution_id for d in recovery.reattached] == [execution_id]
    assert recovery.reattached[0].attempt == 1
    assert recovery.reattached[0].reservations == {"sim:0": 30_000}
    assert restarted.router.execution_of(request.id) == execution_id
    assert restarted.status(request) == "running"
    assert restarted.router.active_count("alice") == 1
    gpu = restarted.router.monitor.gpus["sim:0"]
    assert gpu.running == {execution_id: 30_000} and gpu.reserved_mb == 30_000
    output = {"text": "the first and only answer"}
    restarted.apply(
        restarted.router.finished(
            execution_id, ExecutionResult(output, gpu_seconds=9.0), restarted.now
        )
    )
    done = restarted.store.get_request(request.id)
    assert done is not None
    assert done.status.value == "succeeded" and done.attempts == 1 and done.result == output
    assert gpu.reserved_mb == 0 and restarted.router.active_count("alice") == 0
    # The charge of the dispatch is settled by its own id: replaced, not added to.
    assert restarted.charged("alice") == 9.0


def test_a_reattached_dispatching_request_is_marked_running_by_its_backend() -> None:
    """A request stored as dispatching whose worker runs it goes on to running, once."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    request = h.submit(chat())
    execution_id = h.dispatch_of(request).execution_id
    restarted = _restart(h)
    restarted.recover({execution_id: StillRunning()})
    assert _statuses(restarted, request) == ["queued", "dispatching", "running"]
    assert restarted.store.transitions(request.id)[-1].actor == "backend:sim"


def test_reattached_memory_keeps_out_work_that_would_not_fit_beside_it() -> None:
    """Queued work does not take the room a re-attached execution still uses (I2)."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    big = h.submit(_sized(60_000))
    execution_id = _running(h, big)
    waiting = h.submit(_sized(40_000), user="bob")
    assert h.status(waiting) == "queued"
    restarted = _restart(h)
    restarted.recover({execution_id: StillRunning()})
    assert restarted.status(waiting) == "queued"
    restarted.apply(restarted.router.finished(execution_id, ExecutionResult(), restarted.now))
    assert restarted.dispatched_ids() == [waiting.id]


def test_an_execution_that_finished_while_the_router_was_down_gets_its_result() -> None:
    """A worker's stored outcome ends the request with attempts 1; nothing runs again."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    request = h.submit(chat())  # dispatching: the start was never reported
    execution_id = h.dispatch_of(request).execution_id
    restarted = _restart(h)
    output = {"text": "finished while nobody listened"}
    recovery = restarted.recover(
        {execution_id: ExecutionResult(output, gpu_seconds=2.5, peak_memory_mb=16_000)}
    )
    assert recovery.reattached == [] and restarted.dispatches == []
    done = restarted.store.get_request(request.id)
    assert done is not None
    assert done.status.value == "succeeded" and done.attempts == 1 and done.result == output
    assert _statuses(restarted, request) == ["queued", "dispatching", "running", "succeeded"]
    assert restarted.router.get(request.id) is None
    assert restarted.router.monitor.gpus["sim:0"].reserved_mb == 0
    assert restarted.charged("alice") == 2.5


def test_an_execution_that_failed_while_the_router_was_down_is_handled_as_a_failure() -> None:
    """A retryable failure is retried as attempt 2; a client error fails the request."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)], retries={"backoff_s": 0}))
    flaky = h.submit(chat())
    refused = h.submit(chat(), user="bob")
    flaky_id, refused_id = _running(h, flaky), _running(h, refused)
    restarted = _restart(h)
    restarted.recover(
        {
            flaky_id: Failure(FailureKind.BACKEND_ERROR, "backend error (500): boom"),
            refused_id: Failure(FailureKind.CLIENT_ERROR, "backend refused (422): bad input"),
        }
    )
    assert [d.request.id for d in restarted.dispatches] == [flaky.id]
    assert restarted.dispatches[0].attempt == 2
    requeued = restarted.store.transitions(flaky.id)[-2]
    assert requeued.to_status.value == "queued" and requeued.detail.startswith("backend_error")
    failed = restarted.store.get_request(refused.id)
    assert failed is not None and failed.status.value == "failed" and failed.attempts == 1
    assert failed.error is not None and failed.error.type == "client_error"
    assert restarted.cancelled == []


def test_an_execution_its_worker_does_not_know_is_retried_and_not_cancelled() -> None:
    """A 404 from the worker means it never ran there (or was forgotten): retry as attempt 2."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    request = h.submit(chat())
    execution_id = _running(h, request)
    restarted = _restart(h)
    recovery = restarted.recover({execution_id: NotKnown()})
    assert recovery.reattached == []
    assert restarted.dispatch_of(request).attempt == 2
    assert restarted.cancelled == []
    retried = restarted.store.transitions(request.id)[-2]
    assert retried.to_status.value == "queued" and retried.detail.startswith("router_restarted")


def test_an_execution_nobody_answered_for_is_retried_and_its_backend_told_to_stop() -> None:
    """No answer (not asked, or no reply in time): retried, and the old execution cancelled."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    request = h.submit(chat())
    execution_id = _running(h, request)
    restarted = _restart(h)
    restarted.recover({})
    assert restarted.dispatch_of(request).attempt == 2
    assert restarted.cancelled == [
        CancelExecution(request.id, execution_id, "sim", "sim", "router_restarted")
    ]
    gpu = restarted.router.monitor.gpus["sim:0"]
    assert list(gpu.running) == [restarted.dispatch_of(request).execution_id]


def test_an_answer_about_gpus_no_longer_known_counts_as_no_answer() -> None:
    """A worker's word about an execution on GPUs the new fleet lacks is not taken: retry."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    request = h.submit(chat())
    execution_id = _running(h, request)
    restarted = _restart(h, make_settings(gpus=[("H100-80GB", 1)], worker="other"))
    assert restarted.router.in_flight(h.store.unfinished_requests()) == [
        InFlight(request.id, execution_id, "sim", "sim")
    ]
    recovery = restarted.recover({execution_id: StillRunning()})
    assert recovery.reattached == []
    again = restarted.dispatch_of(request)
    assert again.attempt == 2 and again.placement.gpu_ids == ("other:0",)
    assert [c.execution_id for c in restarted.cancelled] == [execution_id]


def test_a_reattached_execution_expires_at_its_deadline_and_is_told_to_stop() -> None:
    """The deadline still holds for re-attached work: it expires and its execution is cancelled."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    request = h.submit(chat(timeout_s=30))
    execution_id = _running(h, request)
    restarted = _restart(h)
    restarted.recover({execution_id: StillRunning()})
    restarted.advance(30)
    assert restarted.status(request) == "expired"
    assert [(c.execution_id, c.reason) for c in restarted.cancelled] == [(execution_id, "expired")]
    assert restarted.router.monitor.gpus["sim:0"].reserved_mb == 0


def test_a_reattached_execution_on_a_lost_gpu_fails_over_elsewhere() -> None:
    """Re-attached work on a GPU that turns unhealthy is retried on another and told to stop."""
    h = Harness(make_settings(gpus=[("H100-80GB", 2)], retries={"backoff_s": 0}))
    request = h.submit(chat())
    execution_id = _running(h, request)
    placed_on = h.dispatch_of(request).placement.gpu_ids[0]
    restarted = _restart(h)
    restarted.recover({execution_id: StillRunning()})
    other = "sim:1" if placed_on == "sim:0" else "sim:0"
    lost = reading("sim", int(placed_on[-1]), health=GPUHealth.UNHEALTHY)
    fine = reading("sim", int(other[-1]))
    restarted.apply(restarted.router.readings([lost, fine], restarted.now, worker="sim"))
    again = restarted.dispatch_of(request)
    assert again.attempt == 2 and again.placement.gpu_ids == (other,)
    assert [(c.execution_id, c.reason) for c in restarted.cancelled] == [(execution_id, "gpu_lost")]


def test_a_recovery_hands_out_every_status_change_first_in_the_order_made() -> None:
    """Outcomes taken and work retried in one recovery: all status changes lead, each in order.

    Each request's changes follow one another (each from the status the one before left), ahead
    of the cancel and the dispatch that depend on them, so the store ends as the core is.
    """
    h = Harness(make_settings(gpus=[("H100-80GB", 1)], slots=2, retries={"backoff_s": 0}))
    silent, done = h.submit(chat()), h.submit(chat(), user="bob")
    silent_id, done_id = _running(h, silent), _running(h, done)
    restarted = _restart(h)
    recovery = restarted.recover({done_id: ExecutionResult({"text": "done"})})
    leading = [isinstance(d, StateChange) for d in recovery.decisions]
    assert leading == sorted(leading, reverse=True), recovery.decisions
    assert [c.execution_id for c in restarted.cancelled] == [silent_id]
    assert restarted.dispatch_of(silent).attempt == 2
    changes = [d for d in recovery.decisions if isinstance(d, StateChange)]
    for request in (silent, done):
        entries = [c.entry for c in changes if c.request.id == request.id]
        for before, after in itertools.pairwise(entries):
            assert after.from_status is before.to_status and after.seq > before.seq
    assert _statuses(restarted, silent)[-2:] == ["queued", "dispatching"]
    assert _statuses(restarted, done)[-1] == "succeeded"


def test_in_flight_asks_the_gpus_backend_where_it_differs_from_the_worker() -> None:
    """A worker named unlike its backend (host-port) is asked through the backend of its GPU."""
    agent = reading("host-9001", 0, backend="sim")
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    h.apply(h.router.readings([agent], h.now, worker="sim"))
    h.apply(h.router.cordon("sim:0", h.now))
    request = h.submit(chat())
    execution_id = _running(h, request)
    assert h.dispatch_of(request).placement.worker == "host-9001"
    restarted = _restart(h)
    restarted.apply(restarted.router.readings([agent], restarted.now, worker="sim"))
    assert restarted.router.in_flight(h.store.unfinished_requests()) == [
        InFlight(request.id, execution_id, "sim", "host-9001")
    ]


def test_work_that_ended_while_down_is_all_taken_before_the_queue_moves() -> None:
    """The first pass after a restart sees every ended execution gone (I6 across a restart).

    Bob's request and Ann's two fill the three slots, so Ann's critical request waits (at her
    concurrency of two) beside Bob's low one. All three end while the router is down, Bob's
    first. Were a pass to run once Bob's outcome is taken, before Ann's, she would still count
    two running and Bob's low request would start ahead of her critical one.
    """
    settings = make_settings(gpus=[("H100-80GB", 1)], slots=3, quota={"max_concurrent": 2})
    h = Harness(settings)
    running = [h.submit(chat(), user="bob"), *(h.submit(chat(), user="ann") for _ in range(2))]
    executions = [_running(h, request) for request in running]
    h.now += 1
    urgent = h.submit(chat(priority="critical"), user="ann")
    low = h.submit(chat(priority="low"), user="bob")
    assert (h.status(urgent), h.status(low)) == ("queued", "queued")
    restarted = _restart(h)
    restarted.recover({e: ExecutionResult({"ok": True}) for e in executions})
    assert [d.request.id for d in restarted.dispatches] == [urgent.id, low.id]

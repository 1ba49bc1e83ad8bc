"""Tests for the asyncio runtime in real time against the in-process simulated backend."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.engine import Engine
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.exceptions import AlreadyTerminal, InvalidRequest, NotFound
from gpu_request_router.models.request import Request, RequestStatus
from gpu_request_router.runtime import Runtime
from gpu_request_router.services.ai_orchestrator import SimulatedBackend
from gpu_request_router.services.gpu_monitoring import SimulatedSource
from gpu_request_router.services.simulator import SimulatedFleet
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.testing import chat, make_settings
from gpu_request_router.utils.clock import SystemClock

ALICE = Caller("alice")
FAST_MONITOR = {"poll_interval_s": 0.05, "stale_after_s": 1.0}
FAST_RETRIES = {"backoff_s": 0.02, "max_backoff_s": 0.1}


def fast_settings(**sections: Any) -> Settings:
    """Two H100s polled every 50 ms, with short retry backoffs."""
    sections.setdefault("monitor", FAST_MONITOR)
    sections.setdefault("retries", FAST_RETRIES)
    return make_settings(gpus=[("H100-80GB", 2)], **sections)


def reserved(runtime: Runtime) -> dict[str, int]:
    """The router's reservations on each GPU."""
    return {gpu_id: gpu.reserved_mb for gpu_id, gpu in runtime.router.monitor.gpus.items()}


def fleet_used(runtime: Runtime) -> dict[str, int]:
    """Memory in use on each simulated GPU as the latest reading reported it."""
    return {
        gpu_id: gpu.reading.memory_used_mb for gpu_id, gpu in runtime.router.monitor.gpus.items()
    }


async def until(predicate: Any, timeout_s: float = 2.0) -> None:
    """Yield to the event loop until ``predicate()`` holds (fail after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_submit_then_wait_succeeds_with_an_openai_result() -> None:
    """A submitted chat runs on a GPU and ends succeeded with a chat.completion result."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        submitted = await runtime.submit(chat(max_tokens=8, duration_s=0.05), ALICE)
        assert submitted.status is RequestStatus.DISPATCHING  # the pass after admission placed it
        done = await runtime.wait(submitted.id, timeout_s=5)
    assert done.status is RequestStatus.SUCCEEDED
    assert done.attempts == 1
    assert done.placement is not None
    assert done.placement.worker == "sim"
    assert done.placement.gpu_ids[0] in ("sim:0", "sim:1")
    assert done.result["object"] == "chat.completion"
    assert done.result["id"] == f"chatcmpl-{done.id}"
    (choice,) = done.result["choices"]
    assert len(choice["message"]["content"].split()) == 8
    assert done.started_at is not None and done.finished_at is not None
    assert done.finished_at - done.started_at >= 0.04
    assert done.error is None


async def test_get_returns_terminal_requests_from_the_store() -> None:
    """After a request ends, get() still returns it (from the store) with its result."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        submitted = await runtime.submit(chat(duration_s=0.02), ALICE)
        await runtime.wait(submitted.id, timeout_s=5)
        assert runtime.router.get(submitted.id) is None
        stored = runtime.get(submitted.id)
    assert stored.status is RequestStatus.SUCCEEDED
    assert stored.result["object"] == "chat.completion"


async def test_wait_returns_the_request_as_its_end_stored_it_without_reading_the_store() -> None:
    """A waiter gets the terminal request from its last transition, equal to the stored one."""
    store = MemoryStore()
    async with Runtime.from_settings(fast_settings(), store=store, seed=1) as runtime:
        submitted = await runtime.submit(chat(duration_s=0.02), ALICE)
        reads: list[str] = []
        real_get = store.get_request

        def counted_get(request_id: str) -> Request | None:
            reads.append(request_id)
            return real_get(request_id)

        store.get_request = counted_get  # type: ignore[method-assign]
        done = await runtime.wait(submitted.id, timeout_s=5)
        assert reads == []
        stored = real_get(submitted.id)
    assert done.status is RequestStatus.SUCCEEDED
    assert stored is not None
    for name in Request.__dataclass_fields__:
        assert getattr(done, name) == getattr(stored, name), name


async def test_wait_returns_the_live_request_when_its_timeout_passes() -> None:
    """wait() with a short timeout returns the request still running."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        submitted = await runtime.submit(chat(duration_s=1.0), ALICE)
        started = time.monotonic()
        current = await runtime.wait(submitted.id, timeout_s=0.1)
        assert time.monotonic() - started < 0.9
        assert not current.status.terminal
        assert runtime.get(submitted.id).status is RequestStatus.RUNNING
        cancelled = await runtime.cancel(submitted.id)
    assert cancelled.status is RequestStatus.CANCELLED


async def test_many_concurrent_requests_all_finish_and_free_their_reservations() -> None:
    """Sixty concurrent submissions from three users all succeed and leave no reservation."""
    async with Runtime.from_settings(fast_settings(), seed=3) as runtime:
        submissions = [
            runtime.submit(chat(duration_s=0.05 + 0.01 * (i % 10)), Caller(f"user{i % 3}"))
            for i in range(60)
        ]
        requests = await asyncio.gather(*submissions)
        assert len({request.id for request in requests}) == 60
        done = await asyncio.gather(*(runtime.wait(r.id, timeout_s=20) for r in requests))
        assert runtime.router.live == {}
        assert reserved(runtime) == {"sim:0": 0, "sim:1": 0}
        await until(lambda: set(fleet_used(runtime).values()) == {0})
    assert {request.status for request in done} == {RequestStatus.SUCCEEDED}
    assert all(request.result["object"] == "chat.completion" for request in done)
    assert {request.placement.gpu_ids[0] for request in done if request.placement} == {
        "sim:0",
        "sim:1",
    }


async def test_cancel_running_request_frees_its_reservation_and_stops_the_execution() -> None:
    """Cancelling a running request ends it cancelled, frees its reservation at once, stops work."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        before = asyncio.all_tasks()
        submitted = await runtime.submit(chat(duration_s=30.0, peak_memory_mb=20_000), ALICE)
        spawned = asyncio.all_tasks() - before
        assert spawned, "the dispatch must have started an execution task"
        await until(lambda: runtime.get(submitted.id).status is RequestStatus.RUNNING)
        request = runtime.get(submitted.id)
        assert request.placement is not None
        (gpu_id,) = request.placement.gpu_ids
        assert reserved(runtime)[gpu_id] > 0
        await until(lambda: fleet_used(runtime)[gpu_id] == 20_000)

        cancelled = await runtime.cancel(submitted.id)

        assert cancelled.status is RequestStatus.CANCELLED
        assert reserved(runtime)[gpu_id] == 0
        assert runtime.router.execution_of(submitted.id) is None
        await until(lambda: all(task.done() for task in spawned), timeout_s=1.0)
        assert any(task.cancelled() for task in spawned)
        await until(lambda: fleet_used(runtime)[gpu_id] == 0)
        assert (await runtime.wait(submitted.id, timeout_s=1)).status is RequestStatus.CANCELLED


async def test_cancel_of_a_terminal_request_raises_already_terminal() -> None:
    """Cancelling a request that has succeeded raises AlreadyTerminal and changes nothing."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        submitted = await runtime.submit(chat(duration_s=0.02), ALICE)
        done = await runtime.wait(submitted.id, timeout_s=5)
        assert done.status is RequestStatus.SUCCEEDED
        with pytest.raises(AlreadyTerminal):
            await runtime.cancel(submitted.id)
        assert runtime.get(submitted.id).status is RequestStatus.SUCCEEDED


async def test_cancel_of_a_queued_request_never_runs_it() -> None:
    """A request cancelled while queued behind a full GPU ends cancelled without a placement."""
    settings = make_settings(gpus=[("H100-80GB", 1)], slots=1, monitor=FAST_MONITOR)
    async with Runtime.from_settings(settings, seed=1) as runtime:
        blocker = await runtime.submit(chat(duration_s=0.5), ALICE)
        waiting = await runtime.submit(chat(duration_s=0.05), ALICE)
        assert waiting.status is RequestStatus.QUEUED
        cancelled = await runtime.cancel(waiting.id)
        assert cancelled.status is RequestStatus.CANCELLED
        assert cancelled.attempts == 0
        assert (await runtime.wait(blocker.id, timeout_s=5)).status is RequestStatus.SUCCEEDED


async def test_hanging_request_expires_at_its_timeout() -> None:
    """A hanging execution with timeout_s=0.3 expires with a timeout error within about a second."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        started = time.monotonic()
        submitted = await runtime.submit(chat(timeout_s=0.3, failure="hang"), ALICE)
        done = await runtime.wait(submitted.id, timeout_s=3)
        elapsed = time.monotonic() - started
        assert done.status is RequestStatus.EXPIRED
        assert done.error is not None and done.error.type == "timeout"
        assert 0.25 <= elapsed < 1.5
        assert reserved(runtime) == {"sim:0": 0, "sim:1": 0}
        await until(lambda: set(fleet_used(runtime).values()) == {0})


async def test_oom_on_first_attempt_succeeds_on_the_second_with_a_larger_estimate() -> None:
    """An out-of-memory first attempt is retried with a grown estimate and succeeds."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        submitted = await runtime.submit(
            chat(duration_s=0.1, failure="oom", fail_attempts=1), ALICE
        )
        done = await runtime.wait(submitted.id, timeout_s=5)
    assert done.status is RequestStatus.SUCCEEDED
    assert done.attempts == 2
    assert done.estimate.gpu_memory_mb > submitted.estimate.gpu_memory_mb
    assert done.result["object"] == "chat.completion"


async def test_error_on_every_attempt_fails_after_max_attempts() -> None:
    """A backend error on every attempt ends failed after retries.max_attempts attempts."""
    settings = fast_settings(retries={**FAST_RETRIES, "max_attempts": 3})
    async with Runtime.from_settings(settings, seed=1) as runtime:
        submitted = await runtime.submit(chat(duration_s=0.05, failure="error"), ALICE)
        done = await runtime.wait(submitted.id, timeout_s=5)
        assert reserved(runtime) == {"sim:0": 0, "sim:1": 0}
    assert done.status is RequestStatus.FAILED
    assert done.attempts == 3
    assert done.error is not None
    assert done.error.type == "backend_error"
    assert "max attempts" in done.error.message


async def test_malformed_simulate_fails_at_once_without_retry() -> None:
    """A malformed simulate object is a client error: failed on the first attempt."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        submitted = await runtime.submit(chat(failure="explode"), ALICE)
        done = await runtime.wait(submitted.id, timeout_s=5)
    assert done.status is RequestStatus.FAILED
    assert done.attempts == 1
    assert done.error is not None and done.error.type == "client_error"


async def test_unknown_ids_raise_not_found() -> None:
    """wait(), get() and cancel() on an id nobody submitted raise NotFound."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        with pytest.raises(NotFound):
            await runtime.wait("req_nope", timeout_s=1)
        with pytest.raises(NotFound):
            runtime.get("req_nope")
        with pytest.raises(NotFound):
            await runtime.cancel("req_nope")


async def test_leaving_the_context_cancels_running_executions() -> None:
    """Leaving the context stops every loop and execution: no task it started is left."""
    before = asyncio.all_tasks()
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        running: list[Request] = [
            await runtime.submit(chat(duration_s=30.0), ALICE),
            await runtime.submit(chat(failure="hang"), ALICE),
        ]
        await until(lambda: all(runtime.get(r.id).status is RequestStatus.RUNNING for r in running))
        assert len(asyncio.all_tasks()) > len(before)
    assert asyncio.all_tasks() == before
    # The store keeps their state: they were running when the runtime stopped.
    assert {runtime.get(r.id).status for r in running} == {RequestStatus.RUNNING}


async def test_gpu_readings_flow_into_the_monitor() -> None:
    """The polling loop keeps every simulated GPU healthy and fresh in the router's monitor."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        monitor = runtime.router.monitor
        assert sorted(monitor.gpus) == ["sim:0", "sim:1"]
        first_seen = {gpu_id: gpu.last_seen for gpu_id, gpu in monitor.gpus.items()}
        await asyncio.sleep(0.2)
        assert all(monitor.gpus[g].last_seen > first_seen[g] for g in first_seen)
        assert sorted(monitor.schedulable) == ["sim:0", "sim:1"]
        assert {gpu.reading.memory_total_mb for gpu in monitor.gpus.values()} == {81559}


@pytest.mark.parametrize("yields", [0, 1, 2])
async def test_leaving_right_after_a_wakeup_does_not_hang(yields: int) -> None:
    """Leaving the context just after a submission woke the timer loop still stops it."""
    async with asyncio.timeout(3):
        async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
            await asyncio.sleep(0.01)
            await runtime.submit(chat(duration_s=0.02), ALICE)
            for _ in range(yields):
                await asyncio.sleep(0)


async def test_a_waiter_cancelled_as_its_request_finishes_is_cancelled() -> None:
    """Cancelling a wait() in the same instant its request ends still cancels the waiter."""
    async with Runtime.from_settings(fast_settings(), seed=1) as runtime:
        submitted = await runtime.submit(chat(duration_s=0.05), ALICE)
        waiter = asyncio.create_task(runtime.wait(submitted.id, timeout_s=5))

        def cancel_waiter(request: Request, before: RequestStatus) -> None:
            if request.id == submitted.id and request.status.terminal:
                waiter.cancel()

        runtime.listeners.append(cancel_waiter)
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert waiter.cancelled()
        assert runtime.get(submitted.id).status is RequestStatus.SUCCEEDED


def runtime_on(settings: Settings, store: MemoryStore) -> Runtime:
    """A runtime on ``store`` with a fresh simulated fleet (as after a process restart)."""
    engine = Engine.build(settings)
    fleet = SimulatedFleet(settings.backends)
    clock = SystemClock()
    clients = {"sim": SimulatedBackend("sim", fleet, clock)}
    return Runtime(
        engine, store=store, clients=clients, sources=[SimulatedSource(fleet, "sim")], clock=clock
    )


async def test_a_restarted_runtime_retries_work_that_was_running() -> None:
    """Work running when a runtime stopped is retried (attempt 2) by the next one on its store."""
    settings = make_settings(gpus=[("H100-80GB", 1)], monitor=FAST_MONITOR)
    store = MemoryStore()
    async with runtime_on(settings, store) as first:
        submitted = await first.submit(chat(duration_s=0.3), ALICE)
        await until(lambda: first.get(submitted.id).status is RequestStatus.RUNNING)
    async with runtime_on(settings, store) as second:
        recovered = second.get(submitted.id)
        assert recovered.attempts == 2
        # Dispatched again on recovery; the backend has not been called yet.
        assert recovered.status is RequestStatus.DISPATCHING
        done = await second.wait(submitted.id, timeout_s=5)
    assert done.status is RequestStatus.SUCCEEDED
    assert done.attempts == 2
    assert done.result["object"] == "chat.completion"


async def test_a_restarted_runtime_frees_the_reservation_of_the_dead_execution() -> None:
    """After recovery and success of restarted work, no memory stays reserved on the GPU."""
    settings = make_settings(gpus=[("H100-80GB", 1)], monitor=FAST_MONITOR)
    store = MemoryStore()
    async with runtime_on(settings, store) as first:
        submitted = await first.submit(chat(duration_s=0.3), ALICE)
        await until(lambda: first.get(submitted.id).status is RequestStatus.RUNNING)
    async with runtime_on(settings, store) as second:
        done = await second.wait(submitted.id, timeout_s=5)
        assert done.status is RequestStatus.SUCCEEDED
        assert second.router.monitor.gpus["sim:0"].reserved_mb == 0


async def test_a_quota_override_is_committed_before_it_is_answered_and_survives_a_restart() -> None:
    """set_quota returns once the override is stored; the next runtime on the store applies it."""
    settings = make_settings(gpus=[("H100-80GB", 1)], monitor=FAST_MONITOR)
    store = MemoryStore()
    async with runtime_on(settings, store) as first:
        quota = await first.set_quota("alice", {"max_queued": 3})
        assert quota.max_queued == 3
        assert store.quota_overrides() == {"alice": {"max_queued": 3}}
    async with runtime_on(settings, store) as second:
        assert second.quota("alice").max_queued == 3
        with pytest.raises(InvalidRequest):
            await second.set_quota("alice", {"max_queue": 1})
        assert store.quota_overrides() == {"alice": {"max_queued": 3}}, "a bad key changes nothing"

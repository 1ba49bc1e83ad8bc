"""The writer's contract on a real SQLite file: group commit, durable before visible, refusal.

A :class:`GatedStore` is the real SQLite store with two faults a test can set: a gate that holds
the next commit (so that work piles up behind it, as under load) and a failure of the next commit
(a disk I/O error). Everything else is the router as it runs: the runtime, its writer thread, the
core, a simulated fleet.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.engine import Engine
from gpu_request_router.core.quota import HOUR_S, MINUTE_S
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.core.state_store import Change, OverrideChange, RequestQuery
from gpu_request_router.exceptions import NotFound, StoreUnavailable
from gpu_request_router.models.request import RequestStatus
from gpu_request_router.runtime import Runtime
from gpu_request_router.services.ai_orchestrator import SimulatedBackend
from gpu_request_router.services.gpu_monitoring import SimulatedSource
from gpu_request_router.services.simulator import SimulatedFleet
from gpu_request_router.store.sqlite import SQLiteStore
from gpu_request_router.testing import chat, make_settings
from gpu_request_router.utils.clock import SystemClock
from gpu_request_router.writer import BEHIND_S, Writer

ALICE = Caller("alice")
SETTINGS = make_settings(monitor={"poll_interval_s": 0.05, "stale_after_s": 2.0})


class GatedStore(SQLiteStore):
    """A real SQLite store whose next commit can be held (``gate``) or failed (``fail``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = threading.Event()
        self.held = threading.Event()  # a commit waits at the gate
        self.batches: list[int] = []

    def write(self, changes: Sequence[Change]) -> None:
        if not self.gate.is_set():
            self.held.set()
            assert self.gate.wait(10), "the test never opened the gate"
        if self.fail.is_set():
            self.fail.clear()
            raise StoreUnavailable("disk I/O error (injected)", retry_after_s=2.0)
        super().write(changes)
        self.batches.append(len(changes))


def runtime_on(store: GatedStore, settings: Settings = SETTINGS) -> tuple[Runtime, SimulatedFleet]:
    """A runtime on ``store`` with a simulated fleet the test can look at."""
    engine = Engine.build(settings, seed=1)
    fleet = SimulatedFleet(settings.backends)
    clock = SystemClock()
    clients = {"sim": SimulatedBackend("sim", fleet, clock)}
    runtime = Runtime(
        engine, store=store, clients=clients, sources=[SimulatedSource(fleet, "sim")], clock=clock
    )
    return runtime, fleet


async def until(predicate: Any, timeout_s: float = 5.0) -> None:
    """Yield to the event loop until ``predicate()`` holds (fail after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def _held(store: GatedStore) -> None:
    """Wait (off the event loop's thread) until a commit is held at the gate."""
    assert await asyncio.to_thread(store.held.wait, 5), "no commit reached the gate"


async def test_submits_behind_a_slow_commit_share_the_next_one(tmp_path: Path) -> None:
    """Group commit: what arrives while a commit runs goes in the next one, all together."""
    store = GatedStore(tmp_path / "state.db")
    runtime, _ = runtime_on(store)
    async with runtime:
        store.batches.clear()
        store.gate.clear()
        first = asyncio.create_task(runtime.submit(chat(failure="hang"), ALICE))
        await _held(store)
        others = [
            asyncio.create_task(runtime.submit(chat(failure="hang"), Caller(f"user{n}")))
            for n in range(30)
        ]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in [first, *others]), "answered before their commit"
        commits = runtime.writer.commits
        store.gate.set()
        accepted = await asyncio.gather(first, *others)
        # The first commit, then one for the 30 creations that waited behind it (with whatever
        # the dispatch passes changed meanwhile); later ones carry only status changes.
        assert store.batches[1] >= 30
        assert runtime.writer.commits - commits >= 2
    assert len({request.id for request in accepted}) == 31
    for request in accepted:
        assert store.get_request(request.id) is not None


async def test_a_failed_commit_refuses_every_request_in_it_and_keeps_none(tmp_path: Path) -> None:
    """Each waiter of a failed commit gets StoreUnavailable (503); none exists afterwards."""
    store = GatedStore(tmp_path / "state.db")
    runtime, _ = runtime_on(store)
    async with runtime:
        kept = await runtime.submit(chat(duration_s=0.05), ALICE)
        store.gate.clear()
        blocker = asyncio.create_task(runtime.submit(chat(duration_s=0.05), ALICE))
        await _held(store)
        doomed = [
            asyncio.create_task(runtime.submit(chat(duration_s=0.05), ALICE)) for _ in range(10)
        ]
        await asyncio.sleep(0.05)
        store.fail.set()  # the blocked commit fails; the 10 behind it go in the next one
        store.held.clear()
        store.gate.set()
        results = await asyncio.gather(blocker, *doomed, return_exceptions=True)
        refused = [r for r in results if isinstance(r, StoreUnavailable)]
        assert len(refused) == 1, "only the batch that failed is refused"
        assert all(r.retry_after_s > 0 for r in refused)
        accepted = [r for r in results if not isinstance(r, BaseException)]
        assert len(accepted) == 10
        # None of the refused exists: not in memory, not in the store, not in the usage.
        live_ids = set(runtime.router.live)
        for request in accepted:
            await runtime.wait(request.id, 5)
        assert runtime.router.queued_total() == 0
        _, usage = runtime.quota_usage("alice")
        assert usage.requests_last_minute == 1 + 10
        stored = store.list_requests(RequestQuery(limit=500)).items
        assert {r.id for r in stored} == {kept.id, *(r.id for r in accepted)}
        assert not live_ids - {r.id for r in accepted}
        # The store works again: the next submit is taken.
        after = await runtime.submit(chat(duration_s=0.05), ALICE)
        assert (await runtime.wait(after.id, 5)).status is RequestStatus.SUCCEEDED
    assert store.get_request(after.id) is not None


async def test_a_dispatch_waits_for_its_commit_and_is_visible_only_then(tmp_path: Path) -> None:
    """Durable before visible: while the dispatching change is held, nothing shows or runs."""
    store = GatedStore(tmp_path / "state.db")
    runtime, fleet = runtime_on(store)
    async with runtime:
        request = await runtime.submit(chat(duration_s=0.05), ALICE)
        done = await runtime.wait(request.id, 5)
        assert done.status is RequestStatus.SUCCEEDED
        store.gate.clear()
        held = asyncio.create_task(runtime.submit(chat(failure="hang"), ALICE))
        await _held(store)
        # The creation is held: not answered, not visible, not started anywhere.
        assert not held.done()
        assert runtime.router.live, "the core has it"
        (request_id,) = runtime.router.live
        with pytest.raises(NotFound):
            runtime.get(request_id)
        execution_id = runtime.router.execution_of(request_id)
        assert execution_id is not None, "the core dispatched it in memory"
        await asyncio.sleep(0.1)
        assert not fleet.running(execution_id), "an execution started before its commit"
        store.gate.set()
        admitted = await held
        await until(lambda: fleet.running(execution_id))
        assert runtime.get(admitted.id).status in (RequestStatus.DISPATCHING, RequestStatus.RUNNING)


async def test_the_writer_refuses_new_work_while_behind_or_failing(tmp_path: Path) -> None:
    """Back-pressure: past max_pending waiting changes, or after a failed commit, 503.

    A change that is no creation (here quota overrides) is kept through a failed commit and
    written, in order, by the next one.
    """
    store = GatedStore(tmp_path / "state.db")
    writer = Writer(store, time.monotonic, on_committed=_ignore, on_refused=_ignore, max_pending=4)
    writer.start()
    store.gate.clear()
    first = writer.add([OverrideChange("u0", {"max_queued": 1})])
    await _held(store)
    writer.admitting()  # one waits: below the bound
    writer.add([OverrideChange(f"u{n}", {"max_queued": n}) for n in range(1, 5)])
    with pytest.raises(StoreUnavailable, match="behind"):
        writer.admitting()
    store.held.clear()
    store.gate.set()
    await first
    await writer.flushed()
    writer.admitting()
    store.fail.set()
    failed = writer.add([OverrideChange("u0", {"max_queued": 7})])
    await until(lambda: writer.failure is not None)
    with pytest.raises(StoreUnavailable, match="injected"):
        writer.admitting()
    await failed  # tried again, and taken
    writer.admitting()
    assert writer.failure is None
    await writer.close()
    overrides = store.quota_overrides()
    assert overrides == {f"u{n}": {"max_queued": 7 if n == 0 else n} for n in range(5)}


def _ignore(*_: object) -> None:
    """A writer callback the test has no use for."""


async def test_synchronous_requests_are_written_behind_within_a_second(tmp_path: Path) -> None:
    """The OpenAI door's requests: answered from memory, their usage stored within 1 s."""
    store = GatedStore(tmp_path / "state.db")
    runtime, _ = runtime_on(store)
    async with runtime:
        request, created = await runtime.admit(chat(duration_s=0.05), ALICE, durable=False)
        assert created
        done = await runtime.wait(request.id, 5)
        assert done.status is RequestStatus.SUCCEEDED
        ended = time.monotonic()
        assert runtime.get(request.id).status is RequestStatus.SUCCEEDED, "visible from memory"
        await until(lambda: store.get_request(request.id) is not None, timeout_s=2 * BEHIND_S + 1)
        assert time.monotonic() - ended <= 1.0
        trail = [entry.to_status.value for entry in store.transitions(request.id)]
        assert trail == ["queued", "dispatching", "running", "succeeded"]
        history = store.quota_history(runtime.clock.now(), MINUTE_S, HOUR_S)
        assert [a[2] for a in history.admissions] == [request.id]
        assert [c.charge_id for c in history.charges] == [f"exe_{request.id}_1"]
        assert store.get_request(request.id).status is RequestStatus.SUCCEEDED

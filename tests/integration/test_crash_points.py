"""The crash-point sweep: the router dies between every pair of commits, and recovers whole.

A workload with every kind of ending (success, a retried failure, a cancel, a timeout, a
request of the OpenAI door) runs once to count the writer's commits. Then, for each commit, it
runs again on a fresh SQLite file and the store dies just before that commit: nothing from then
on reaches the file, exactly what a ``kill -9`` at that point leaves (SQLite's own atomicity
covers a kill inside a commit). A new router then opens the file and recovers, the clients retry
what was refused with the same idempotency keys, and every request must end as SPEC §2 says:

- every request acknowledged before the crash exists, and ends in exactly one terminal status,
  once (I1); nothing acknowledged is lost;
- no idempotency key has two requests (a client retry never duplicates);
- every audit trail is whole: entries numbered 0, 1, 2 ... with each one starting where the one
  before ended;
- no memory stays reserved once all is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest

from gpu_request_router.core.engine import Engine
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.core.state_store import Change, RequestQuery
from gpu_request_router.exceptions import AlreadyTerminal, StoreUnavailable
from gpu_request_router.models.request import Request
from gpu_request_router.runtime import Runtime
from gpu_request_router.services.ai_orchestrator import SimulatedBackend
from gpu_request_router.services.gpu_monitoring import SimulatedSource
from gpu_request_router.services.simulator import SimulatedFleet
from gpu_request_router.store.sqlite import SQLiteStore
from gpu_request_router.testing import chat, make_settings
from gpu_request_router.utils.clock import SystemClock

SETTINGS = make_settings(
    monitor={"poll_interval_s": 0.05, "stale_after_s": 2.0},
    retries={"backoff_s": 0.01, "max_backoff_s": 0.02},
)


class DyingStore(SQLiteStore):
    """A real SQLite store that dies before its ``dies_at``-th commit: none from then on lands."""

    def __init__(self, path: Path, dies_at: int | None) -> None:
        super().__init__(path)
        self.dies_at = dies_at
        self.commits = 0

    def write(self, changes: Sequence[Change]) -> None:
        if self.dies_at is not None and self.commits + 1 >= self.dies_at:
            raise StoreUnavailable("the process died here (crash point)")
        super().write(changes)
        self.commits += 1


def runtime_on(store: SQLiteStore) -> Runtime:
    """A router process on ``store``: a fresh engine and simulated fleet."""
    engine = Engine.build(SETTINGS, seed=None)
    fleet = SimulatedFleet(SETTINGS.backends)
    clock = SystemClock()
    clients = {"sim": SimulatedBackend("sim", fleet, clock)}
    return Runtime(
        engine, store=store, clients=clients, sources=[SimulatedSource(fleet, "sim")], clock=clock
    )


WORKLOAD: list[tuple[str, Submission]] = [
    ("ok-1", chat(duration_s=0.02, idempotency_key="ok-1")),
    ("ok-2", chat(duration_s=0.05, idempotency_key="ok-2")),
    ("retried", chat(failure="error", fail_attempts=1, duration_s=0.02, idempotency_key="retried")),
    ("cancelled", chat(failure="hang", idempotency_key="cancelled")),
    ("expired", chat(failure="hang", timeout_s=0.15, idempotency_key="expired")),
]


async def _run(runtime: Runtime) -> dict[str, str]:
    """Drive the workload; return the ids acknowledged, by key (a refused one is left out)."""
    acknowledged: dict[str, str] = {}

    async def submit(key: str, submission: Submission) -> None:
        with contextlib.suppress(StoreUnavailable):
            acknowledged[key] = (await runtime.submit(submission, Caller("alice"))).id

    await asyncio.gather(*(submit(key, submission) for key, submission in WORKLOAD))
    with contextlib.suppress(StoreUnavailable):
        request, _ = await runtime.admit(chat(duration_s=0.02), Caller("bob"), durable=False)
        await runtime.wait(request.id, 2)
    if "cancelled" in acknowledged:
        with contextlib.suppress(StoreUnavailable, AlreadyTerminal, TimeoutError):
            async with asyncio.timeout(1):
                await runtime.cancel(acknowledged["cancelled"])
    await asyncio.gather(*(runtime.wait(request_id, 0.5) for request_id in acknowledged.values()))
    return acknowledged


async def _finish(path: Path, acknowledged: dict[str, str]) -> list[Request]:
    """A new router on the file: retry what was refused, cancel the hung, wait for the end."""
    store = SQLiteStore(path)
    try:
        async with runtime_on(store) as runtime:
            ids: dict[str, str] = {}
            for key, submission in WORKLOAD:
                again = await runtime.submit(submission, Caller("alice"))
                if key in acknowledged:
                    assert again.id == acknowledged[key], f"{key}: a retry made a second request"
                ids[key] = again.id
            with contextlib.suppress(AlreadyTerminal):
                await runtime.cancel(ids["cancelled"])
            for request_id in ids.values():
                assert (await runtime.wait(request_id, 5)).status.terminal
            await runtime.writer.flushed()
            gpu = runtime.router.monitor.gpus["sim:0"]
            assert gpu.reserved_mb == 0 and not gpu.running
        return store.list_requests(RequestQuery(limit=500)).items
    finally:
        store.close()


def _check(requests: list[Request], store_path: Path) -> None:
    store = SQLiteStore(store_path)
    try:
        keys = [r.idempotency_key for r in requests if r.idempotency_key is not None]
        assert sorted(keys) == sorted(key for key, _ in WORKLOAD), "a key lost or duplicated"
        for request in requests:
            assert request.status.terminal, f"{request.id} is {request.status}"
            trail = store.transitions(request.id)
            assert [entry.seq for entry in trail] == list(range(len(trail)))
            assert trail[0].from_status is None
            for before, after in itertools.pairwise(trail):
                assert after.from_status is before.to_status
            assert sum(entry.to_status.terminal for entry in trail) == 1
            assert trail[-1].to_status is request.status
    finally:
        store.close()


async def _commits_of_a_whole_run(path: Path) -> int:
    store = DyingStore(path, None)
    try:
        async with runtime_on(store) as runtime:
            await _run(runtime)
    finally:
        store.close()
    return store.commits


@pytest.mark.slow
async def test_the_router_recovers_whole_from_a_crash_before_any_commit(tmp_path: Path) -> None:
    """Every crash point of the workload: nothing acknowledged lost, nothing duplicated."""
    points = await _commits_of_a_whole_run(tmp_path / "count.db")
    assert points >= 8, "the workload makes too few commits to sweep"
    for dies_at in range(1, points + 1):
        path = tmp_path / f"crash-{dies_at}.db"
        store = DyingStore(path, dies_at)
        try:
            async with runtime_on(store) as runtime:
                acknowledged = await _run(runtime)
        finally:
            store.close()
        assert store.commits == dies_at - 1
        requests = await _finish(path, acknowledged)
        _check(requests, path)

"""Two (or three) runtimes in one event loop sharing one Redis prefix (``state.shared``).

Each runtime has its own in-process simulated fleet, and every fleet names its GPUs alike
(``sim:0`` ...), so the store's per-GPU ledger is what keeps the routers off each other's
reservations. The tests drive the runtimes as the doors do (submit, admit, get, wait, watch,
cancel) against the real Redis of ``REDIS_URL``, under a prefix of each test's own; every store
is closed, and the prefix dropped, afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

from gpu_request_router.config.config_loader import Settings, load_settings
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.core.state_store import RequestQuery
from gpu_request_router.exceptions import AlreadyTerminal, NotFound, QuotaExceeded
from gpu_request_router.models.gpu_state import GPUState
from gpu_request_router.models.request import Request, RequestStatus, ResourceHints
from gpu_request_router.runtime import SHARED_SYNC_S, Runtime
from gpu_request_router.store import RedisStore
from gpu_request_router.testing import RedisServer, chat, make_settings
from gpu_request_router.utils.ids import IdFactory
from gpu_request_router.worker.app import create_worker_app

S = RequestStatus
ALICE = Caller("alice")
FAST_MONITOR = {"poll_interval_s": 0.05, "stale_after_s": 1.0}
FAST_RETRIES = {"backoff_s": 0.02, "max_backoff_s": 0.1}
# Two of these never fit one H100-80GB together: a GPU runs one such request at a time.
HALF_GPU = ResourceHints(gpu_memory_mb=50_000)


WORKER_TOKEN = "worker-token-for-the-shared-tests"


def agent_app() -> FastAPI:
    """A `gpurouter worker` named w1 with one simulated H100, served in-process."""
    settings = load_settings(
        overrides={
            "auth": {"worker_token": WORKER_TOKEN},
            "worker": {"name": "w1", "simulate": "1xH100-80GB"},
        }
    )
    return create_worker_app(settings)


def shared_settings(gpus: int = 1, **sections: Any) -> Settings:
    """``gpus`` H100s on one simulated worker ``sim``, polled every 50 ms, short backoffs."""
    sections.setdefault("monitor", FAST_MONITOR)
    sections.setdefault("retries", FAST_RETRIES)
    return make_settings(gpus=[("H100-80GB", gpus)], **sections)


@pytest.fixture
def open_store(redis_url: str, redis_store_prefix: str) -> Iterator[Callable[[], RedisStore]]:
    """Opens a router's client of the test's shared prefix; all are closed before it is dropped."""
    opened: list[RedisStore] = []

    def open_one() -> RedisStore:
        store = RedisStore(redis_url, prefix=redis_store_prefix, shared=True)
        opened.append(store)
        return store

    yield open_one
    for store in reversed(opened):
        store.close()


@contextlib.asynccontextmanager
async def two_runtimes(
    settings: Settings, open_store: Callable[[], RedisStore]
) -> AsyncIterator[tuple[Runtime, Runtime]]:
    """Runtimes A and B on one shared prefix, each with its own fleet (distinct id seeds)."""
    async with (
        Runtime.from_settings(settings, store=open_store(), seed=1) as a,
        Runtime.from_settings(settings, store=open_store(), seed=2) as b,
    ):
        yield a, b


async def until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Yield to the event loop until ``predicate()`` holds (fail after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def same(left: Request, right: Request) -> None:
    """Assert that two views of a request agree field by field."""
    for name in Request.__dataclass_fields__:
        assert getattr(left, name) == getattr(right, name), name


class _RecordingIds(IdFactory):
    """A real id factory that also remembers every id it made."""

    def __init__(self) -> None:
        super().__init__(random.Random())
        self.made: list[str] = []

    def new(self, prefix: str, now: float) -> str:
        """A new id, remembered."""
        made = super().new(prefix, now)
        self.made.append(made)
        return made


def record_ids(runtime: Runtime) -> list[str]:
    """The ids ``runtime``'s receiver gives from now on (refused requests' included)."""
    ids = _RecordingIds()
    runtime.engine.receiver._ids = ids
    return ids.made


def overlaps(first: Request, second: Request) -> bool:
    """Whether two finished requests' runs overlapped in time."""
    assert first.started_at is not None and first.finished_at is not None
    assert second.started_at is not None and second.finished_at is not None
    return first.started_at < second.finished_at and second.started_at < first.finished_at


# --- creations ------------------------------------------------------------------------------------


async def test_the_rate_limit_counts_the_admissions_of_both_runtimes(
    open_store: Callable[[], RedisStore],
) -> None:
    """requests_per_minute 3, submissions alternating A and B: 3 admitted in all, the rest 429.

    Neither runtime reaches the limit on its own (A admits two, B one), so the four later
    submissions are refused by the store. A refused request exists on neither runtime afterwards.
    """
    settings = shared_settings(quota={"requests_per_minute": 3})
    async with two_runtimes(settings, open_store) as (a, b):
        made = record_ids(a), record_ids(b)
        admitted: list[Request] = []
        refusals: list[QuotaExceeded] = []
        for i in range(7):
            runtime = (a, b)[i % 2]
            try:
                # Two of B's go through the OpenAI door: refused there alike.
                request, _ = await runtime.admit(
                    chat(duration_s=0.01), ALICE, durable=i not in (1, 3)
                )
                admitted.append(request)
            except QuotaExceeded as refused:
                refusals.append(refused)
        assert len(admitted) == 3
        assert len(refusals) == 4
        for refusal in refusals:
            assert refusal.quota == "requests_per_minute"
            assert 0 < refusal.retry_after_s <= 60
        admitted_ids = {request.id for request in admitted}
        assert len(admitted_ids) == 3
        refused_ids = set(made[0] + made[1]) - admitted_ids
        assert len(refused_ids) == 4
        for request_id in refused_ids:
            for runtime in (a, b):
                assert runtime.router.get(request_id) is None  # taken back by the core
                with pytest.raises(NotFound):
                    runtime.get(request_id)
                assert runtime.transitions(request_id) == []
        for runtime in (a, b):
            listed = runtime.list_requests(RequestQuery(user="alice"))
            assert {request.id for request in listed.items} == admitted_ids
        # Another user's window is their own.
        bob = await b.submit(chat(duration_s=0.01), Caller("bob"))
        done = await asyncio.gather(*(a.wait(r.id, 5) for r in [*admitted, bob]))
    assert {request.status for request in done} == {S.SUCCEEDED}


async def test_one_idempotency_key_submitted_to_both_runtimes_at_once_makes_one_request(
    open_store: Callable[[], RedisStore],
) -> None:
    """The same key at A and B concurrently: both answer the one request, one of them as new."""
    async with two_runtimes(shared_settings(), open_store) as (a, b):
        submission = chat(duration_s=0.05, idempotency_key="once")
        (first, first_new), (second, second_new) = await asyncio.gather(
            a.admit(submission, ALICE), b.admit(submission, ALICE)
        )
        assert first.id == second.id
        assert sorted([first_new, second_new]) == [False, True]
        found = a.store.find_idempotent("alice", "once")
        assert found is not None and found.id == first.id
        listed = b.list_requests(RequestQuery(user="alice"))
        assert [request.id for request in listed.items] == [first.id]
        # Later, each runtime answers the key as a replay of it.
        again = await asyncio.gather(a.admit(submission, ALICE), b.admit(submission, ALICE))
        assert [(request.id, new) for request, new in again] == [(first.id, False)] * 2
        done_a, done_b = await asyncio.gather(a.wait(first.id, 5), b.wait(first.id, 5))
    assert done_a.status is S.SUCCEEDED and done_b.status is S.SUCCEEDED
    assert done_a.attempts == 1


async def test_the_openai_door_returns_once_the_creation_is_stored(
    open_store: Callable[[], RedisStore],
) -> None:
    """admit(durable=False) on a shared store: the store has the request when admit returns."""
    async with two_runtimes(shared_settings(), open_store) as (a, b):
        request, created = await a.admit(chat(duration_s=0.3), ALICE, durable=False)
        stored = a.store.get_request(request.id)
        seen_by_b = b.store.get_request(request.id)
        assert created
        assert request.synchronous
        assert stored is not None and stored.synchronous
        assert seen_by_b is not None and seen_by_b.id == request.id
        assert b.get(request.id).synchronous
        done = await a.wait(request.id, 5)
        assert done.status is S.SUCCEEDED
        ended = await b.wait(request.id, 5)
    assert ended.status is S.SUCCEEDED
    assert ended.synchronous


# --- claims ---------------------------------------------------------------------------------------


async def test_a_claim_refused_for_the_other_runtimes_gpu_goes_back_to_its_queue(
    open_store: Callable[[], RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """A and B place a half-GPU request on the same GPU at once: one claim is refused.

    The refused request goes back to its queue (audit: dispatching -> queued with
    ``placement_conflict``) without spending its attempt, runs once the other ended, and the
    two never ran on the GPU at the same time.
    """
    async with two_runtimes(shared_settings(), open_store) as (a, b):
        first, second = await asyncio.gather(
            a.submit(chat(duration_s=0.3, resources=HALF_GPU), ALICE),
            b.submit(chat(duration_s=0.3, resources=HALF_GPU), Caller("bob")),
        )
        done_a, done_b = await asyncio.gather(a.wait(first.id, 10), b.wait(second.id, 10))
        trails = {first.id: a.transitions(first.id), second.id: b.transitions(second.id)}
    assert done_a.status is S.SUCCEEDED, done_a.error
    assert done_b.status is S.SUCCEEDED, done_b.error
    assert done_a.placement is not None and done_a.placement.gpu_ids == ("sim:0",)
    assert done_b.placement is not None and done_b.placement.gpu_ids == ("sim:0",)
    conflicted = [
        request
        for request in (done_a, done_b)
        if any(
            entry.from_status is S.DISPATCHING
            and entry.to_status is S.QUEUED
            and entry.detail.startswith("placement_conflict")
            for entry in trails[request.id]
        )
    ]
    assert conflicted, trails
    for request in conflicted:
        assert request.attempts == 1, trails[request.id]
    assert not overlaps(done_a, done_b), (done_a, done_b)
    assert raw.hgetall(f"{redis_store_prefix}:ledger:sim:0") == {}


async def test_gpu_seconds_per_hour_counts_the_charges_of_both_runtimes(
    open_store: Callable[[], RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """Alice's hour holds two estimates; two requests on A and two on B: two run, not four.

    Each runtime alone would start both of its own. The store refuses the claim that would
    pass the hour with the other runtime's charges; its runtime learns those charges from the
    refusal and keeps the request queued (held back for the quota, not claiming again and
    again).
    """
    async with two_runtimes(shared_settings(gpus=2), open_store) as (a, b):
        probe = await a.submit(chat(duration_s=0.01), Caller("probe"))
        estimate = probe.estimate.typical_duration_s
        for runtime in (a, b):
            await runtime.set_quota("alice", {"gpu_seconds_per_hour": 2.5 * estimate})
        long = chat(duration_s=30.0)
        submitted = await asyncio.gather(
            a.submit(long, ALICE),
            a.submit(long, ALICE),
            b.submit(long, ALICE),
            b.submit(long, ALICE),
        )
        active = f"{redis_store_prefix}:active:alice"
        await until(lambda: raw.scard(active) == 2)
        deadline = time.monotonic() + 8 * SHARED_SYNC_S
        while time.monotonic() < deadline:  # and it stays so
            assert raw.scard(active) == 2
            await asyncio.sleep(0.02)
        owners = {r.id: runtime for r, runtime in zip(submitted, (a, a, b, b), strict=True)}
        statuses = Counter(owners[r.id].get(r.id).status for r in submitted)
        assert statuses == {S.DISPATCHING: 2, S.QUEUED: 2} or statuses == {
            S.RUNNING: 2,
            S.QUEUED: 2,
        }, statuses
        waiting = [r.id for r in submitted if owners[r.id].get(r.id).status is S.QUEUED]
        trails = {request_id: owners[request_id].transitions(request_id) for request_id in waiting}
        refused = [
            entry
            for trail in trails.values()
            for entry in trail
            if entry.detail.startswith("placement_conflict")
        ]
        assert refused, trails
        assert all("GPU-seconds" in entry.detail for entry in refused), refused
        assert len(refused) <= 2, refused  # each learned the other's charges at once
        for runtime in {owners[request_id] for request_id in waiting}:  # held back, knowingly
            assert "alice" in runtime.router.waiting_for_gpu_seconds
            used = runtime.quota_usage("alice")[1].gpu_seconds_last_hour
            assert used >= 2 * estimate - 1e-6
        for request in submitted:
            await owners[request.id].cancel(request.id)


async def test_a_submit_is_refused_once_the_users_hour_is_spent_through_another_runtime(
    open_store: Callable[[], RedisStore],
) -> None:
    """Alice's hour holds one estimate, spent on A: B refuses her next submission (429).

    B alone knows none of her charges; the store checks the creation against every runtime's,
    and B learns the hour from the refusal, so the submissions after it are refused at once.
    """
    async with two_runtimes(shared_settings(gpus=2), open_store) as (a, b):
        probe = await a.submit(chat(duration_s=0.01), Caller("probe"))
        estimate = probe.estimate.typical_duration_s
        for runtime in (a, b):
            await runtime.set_quota("alice", {"gpu_seconds_per_hour": estimate})
        spent = await a.submit(chat(duration_s=30.0), ALICE)
        await until(lambda: a.get(spent.id).status in (S.DISPATCHING, S.RUNNING))
        assert b.quota_usage("alice")[1].gpu_seconds_last_hour == 0
        with pytest.raises(QuotaExceeded) as refused:
            await b.submit(chat(), ALICE)
        assert refused.value.reason == "quota_gpu_seconds_per_hour"
        assert 3500 < refused.value.retry_after_s <= 3600
        assert b.quota_usage("alice")[1].gpu_seconds_last_hour >= estimate - 1e-6
        with pytest.raises(QuotaExceeded):
            await b.submit(chat(), ALICE)
        await b.submit(chat(), Caller("bob"))  # bob's hour is his own
        await a.cancel(spent.id)


async def test_a_worker_registered_with_one_runtime_serves_the_other_too(
    open_store: Callable[[], RedisStore],
    serve_app: Callable[[FastAPI], str],
    raw: redis.Redis,
    redis_store_prefix: str,
) -> None:
    """A worker registered with A only is polled and used by B, and by a runtime started later.

    A `gpurouter worker` heartbeats through a balancer, to any one router: B learns it from
    Redis within a view, polls it and places its own requests there; a runtime started later
    learns it at its first view, with no heartbeat of its own.
    """
    url = serve_app(agent_app())
    settings = agent_settings()
    async with two_runtimes(settings, open_store) as (a, b):
        assert a.register_worker("w1", url) is True
        await until(lambda: "w1:0" in b.router.monitor.gpus, timeout_s=8 * SHARED_SYNC_S)
        assert raw.hgetall(f"{redis_store_prefix}:workers") == {"w1": url}
        done = await b.wait((await b.submit(chat(duration_s=0.01), ALICE)).id, 10)
        assert done.status is S.SUCCEEDED and done.placement is not None
        assert done.placement.worker == "w1"
        async with Runtime.from_settings(settings, store=open_store(), seed=3) as c:
            await until(lambda: "w1:0" in c.router.monitor.gpus, timeout_s=8 * SHARED_SYNC_S)


def count_gpu_reads(app: FastAPI) -> list[float]:
    """The times at which ``app`` (a worker, not yet started) is asked for its GPUs, from now."""
    reads: list[float] = []

    @app.middleware("http")
    async def count(request: Any, call_next: Any) -> Any:
        if request.method == "GET" and request.url.path == "/v1/gpus":
            reads.append(time.monotonic())
        return await call_next(request)

    return reads


def agent_settings(stale_after_s: float = FAST_MONITOR["stale_after_s"]) -> Settings:
    """No configured backend: the worker of the test registers; fast polls and retries."""
    return make_settings(
        auth={"enabled": False, "worker_token": WORKER_TOKEN},
        backends=[],
        monitor={**FAST_MONITOR, "stale_after_s": stale_after_s},
        retries=FAST_RETRIES,
    )


async def test_three_runtimes_read_a_worker_once_per_interval_between_them(
    open_store: Callable[[], RedisStore], serve_app: Callable[[FastAPI], str]
) -> None:
    """Readings are shared: a worker is read about once per poll interval, not once per router.

    Every router's view of it stays about as fresh as that.
    """
    app = agent_app()
    reads = count_gpu_reads(app)
    url = serve_app(app)
    settings = agent_settings()
    async with (
        two_runtimes(settings, open_store) as (a, b),
        Runtime.from_settings(settings, store=open_store(), seed=3) as c,
    ):
        a.register_worker("w1", url)
        runtimes = (a, b, c)
        await until(
            lambda: all("w1:0" in r.router.monitor.gpus for r in runtimes), 8 * SHARED_SYNC_S
        )
        start = time.monotonic()
        await asyncio.sleep(1.0)
        window = [at for at in reads if at >= start]
        for runtime in runtimes:
            seen = runtime.router.monitor.gpus["w1:0"].last_seen
            assert runtime.clock.now() - seen < 0.5
    interval = FAST_MONITOR["poll_interval_s"]
    # One router per interval (with an overlap where a read outlives its turn): about 20 reads;
    # three routers each reading it would make about 60.
    assert 0.5 / interval <= len(window) <= 1.6 / interval


async def test_while_redis_is_down_a_router_reads_its_workers_itself(
    tmp_path: Path, serve_app: Callable[[FastAPI], str]
) -> None:
    """The turns are in Redis; without it every router reads every worker, as alone."""
    app = agent_app()
    reads = count_gpu_reads(app)
    url = serve_app(app)
    with RedisServer(tmp_path) as server:
        other = RedisStore(server.url, prefix="p", shared=True)
        store = RedisStore(server.url, prefix="p", shared=True)
        try:
            # Another router holds w1's turn, and publishes nothing.
            assert other.poll_turns({"w1": 0}, 3600).mine == ["w1"]
            async with Runtime.from_settings(agent_settings(), store=store, seed=1) as b:
                b.register_worker("w1", url)
                await asyncio.sleep(0.5)
                assert reads == [] and "w1:0" not in b.router.monitor.gpus
                server.kill()
                await until(lambda: "w1:0" in b.router.monitor.gpus)
                await asyncio.sleep(0.5)
                assert len(reads) >= 5
                assert b.clock.now() - b.router.monitor.gpus["w1:0"].last_seen < 0.5
                server.start()
        finally:
            store.close()
            other.close()


async def test_a_worker_registered_while_redis_is_down_is_published_when_it_is_back(
    tmp_path: Path, serve_app: Callable[[FastAPI], str]
) -> None:
    """A registration heard during an outage reaches the other routers once Redis is back.

    The worker heartbeats only now and then; the router keeps what it heard until a shared
    view succeeds, rather than until the next heartbeat.
    """
    url = serve_app(agent_app())
    with RedisServer(tmp_path) as server:
        store = RedisStore(server.url, prefix="p", shared=True)
        raw = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            async with Runtime.from_settings(agent_settings(), store=store, seed=1) as b:
                server.kill()
                b.register_worker("w1", url)
                await asyncio.sleep(4 * SHARED_SYNC_S)  # views fail meanwhile
                server.start()
                await until(lambda: raw.hget("p:workers", "w1") == url, timeout_s=5.0)
        finally:
            raw.close()
            store.close()


@pytest.mark.parametrize("listed", [True, False], ids=["lists-executions", "lists-none"])
async def test_a_reading_taken_before_a_release_and_shared_after_it_keeps_what_it_hid(
    open_store: Callable[[], RedisStore], serve_app: Callable[[FastAPI], str], listed: bool
) -> None:
    """Another router's reading is as old as its turn, not as its arrival (SPEC §2 I2).

    A reading nets the router's executions' memory against their reservations, so when one
    ends having used less than it reserved, the memory of others it hid counts as used until a
    reading taken *after* the release. Here router B's execution ends between a publisher's
    reading of the worker and B taking that reading in: B must keep the hidden memory, and drop
    it only with a reading taken later. A worker that lists its executions says which it saw;
    for one that does not (``lists-none``), B uses its own mark of the reading's turn and
    counts all the reading's used memory as used by others.
    """
    url = serve_app(agent_app())
    publisher = open_store()  # another router that holds w1's turn for the whole test
    assert publisher.poll_turns({"w1": 0}, 3600).mine == ["w1"]
    headers = {"Authorization": f"Bearer {WORKER_TOKEN}"}

    async with (
        httpx.AsyncClient(base_url=url, headers=headers) as worker,
        # Readings up to 5 s old are taken in: the one taken before the release is 1.5 s old.
        Runtime.from_settings(agent_settings(5.0), store=open_store(), seed=1) as b,
    ):

        async def snapshot() -> tuple[int, list[dict[str, Any]]]:
            stamp = publisher.poll_turns({}, 3600).stamp  # the store's time, before reading
            items = (await worker.get("/v1/gpus")).json()["items"]
            for item in items if not listed else ():
                del item["running"]
            return stamp, items

        async def publish(stamp: int, items: list[dict[str, Any]]) -> GPUState:
            before = b.clock.now()
            publisher.publish_readings(stamp, {"w1": items}, 30.0)
            gpus = b.router.monitor.gpus
            await until(lambda: "w1:0" in gpus and gpus["w1:0"].last_seen > before)
            return gpus["w1:0"]

        b.register_worker("w1", url)
        await publish(*await snapshot())
        request = await b.submit(
            chat(duration_s=1.5, peak_memory_mb=4_000, resources=HALF_GPU), ALICE
        )
        await until(lambda: b.get(request.id).status is S.RUNNING)
        await asyncio.sleep(0.3)  # B's turns pass the dispatch: its marks count it
        state = await publish(*await snapshot())  # sees the execution
        assert state.reading.memory_reserved_mb == (50_000 if listed else 0)
        taken_before_release = await snapshot()
        assert (await b.wait(request.id, 10)).status is S.SUCCEEDED
        hidden, room = state.hidden_mb, state.room_mb
        assert hidden > 0
        state = await publish(*taken_before_release)
        assert (state.hidden_mb, state.room_mb) == (hidden, room)
        await asyncio.sleep(0.3)  # B's turns pass the release
        state = await publish(*await snapshot())
        assert state.hidden_mb == 0 and state.room_mb > room


async def test_three_runtimes_take_turns_on_one_gpu(
    open_store: Callable[[], RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """Three runtimes place a half-GPU request each on the one GPU at once: all run, in turn.

    Each refusal spends no attempt; no two runs overlap; nothing stays reserved afterwards, in
    the store or in any runtime's view of what the others hold.
    """
    settings = shared_settings()
    async with (
        Runtime.from_settings(settings, store=open_store(), seed=1) as a,
        Runtime.from_settings(settings, store=open_store(), seed=2) as b,
        Runtime.from_settings(settings, store=open_store(), seed=3) as c,
    ):
        runtimes = (a, b, c)
        submitted = await asyncio.gather(
            *(
                runtime.submit(chat(duration_s=0.2, resources=HALF_GPU), Caller(f"user{i}"))
                for i, runtime in enumerate(runtimes)
            )
        )
        done = await asyncio.gather(
            *(runtime.wait(r.id, 10) for runtime, r in zip(runtimes, submitted, strict=True))
        )
        assert raw.hgetall(f"{redis_store_prefix}:ledger:sim:0") == {}
        await until(
            lambda: all(
                (r.gpu("sim:0").elsewhere_mb, r.gpu("sim:0").elsewhere_slots) == (0, 0)
                for r in runtimes
            ),
            timeout_s=8 * SHARED_SYNC_S,
        )
        trails = [runtime.transitions(r.id) for runtime, r in zip(runtimes, done, strict=True)]
    assert [request.status for request in done] == [S.SUCCEEDED] * 3, [r.error for r in done]
    assert [request.attempts for request in done] == [1, 1, 1], trails
    conflicts = sum(
        entry.detail.startswith("placement_conflict") for trail in trails for entry in trail
    )
    assert conflicts >= 2, trails  # two of the three claims made at once were refused
    for i, first in enumerate(done):
        for second in done[i + 1 :]:
            assert not overlaps(first, second), (first, second)


# --- reads, waits, watches and cancellations across runtimes --------------------------------------


async def test_b_reads_waits_on_and_watches_a_request_a_owns_as_a_does(
    open_store: Callable[[], RedisStore],
) -> None:
    """B.get, B.wait and B.watch of A's request give what A's give; B.wait returns it ended."""
    async with two_runtimes(shared_settings(), open_store) as (a, b):
        submitted = await a.submit(chat(duration_s=0.6), ALICE)
        await until(lambda: a.get(submitted.id).status is S.RUNNING)
        same(a.get(submitted.id), b.get(submitted.id))
        trail = a.transitions(submitted.id)
        assert b.transitions(submitted.id) == trail
        last = trail[-1].seq
        assert await b.watch(submitted.id, last, timeout_s=0.05) == []
        started = time.monotonic()
        still = await b.wait(submitted.id, timeout_s=0.1)
        assert time.monotonic() - started < 0.4
        assert still.status is S.RUNNING
        watched_b, ended_b, ended_a = await asyncio.gather(
            b.watch(submitted.id, last, timeout_s=5),
            b.wait(submitted.id, timeout_s=5),
            a.wait(submitted.id, timeout_s=5),
        )
        watched_a = await a.watch(submitted.id, last, timeout_s=0)
        late_b = await b.watch(submitted.id, last, timeout_s=0)
    assert ended_a.status is S.SUCCEEDED
    assert ended_b.status is S.SUCCEEDED
    same(ended_a, ended_b)
    assert watched_b
    assert watched_b[-1].to_status is S.SUCCEEDED
    assert watched_b == watched_a[: len(watched_b)]
    assert late_b == watched_a


async def test_both_runtimes_give_queued_requests_the_same_place_in_one_order(
    open_store: Callable[[], RedisStore],
) -> None:
    """Positions are ranks among both runtimes' queued requests: class with aging, then age.

    Alice's requests wait on both while the one GPU runs a long one; A and B say the same of
    each; B explains A's request as waiting at A.
    """
    async with two_runtimes(shared_settings(), open_store) as (a, b):
        busy = await a.submit(chat(duration_s=30.0, resources=HALF_GPU), Caller("bob"))
        await until(lambda: a.get(busy.id).status is S.RUNNING)
        low_a = await a.submit(chat(resources=HALF_GPU, priority="low"), ALICE)
        normal_b = await b.submit(chat(resources=HALF_GPU), ALICE)
        high_a = await a.submit(chat(resources=HALF_GPU, priority="high"), ALICE)
        normal_a = await a.submit(chat(resources=HALF_GPU), ALICE)
        ids = [low_a.id, normal_b.id, high_a.id, normal_a.id]
        expected = {high_a.id: 0, normal_b.id: 1, normal_a.id: 2, low_a.id: 3}
        assert a.queue_positions(ids) == b.queue_positions(ids) == expected
        explained = b.explain(b.get(normal_a.id))
        assert explained.summary.startswith("It waits in the queue of another router")
        assert "position 2" in explained.summary
        assert a.explain(a.get(normal_a.id)).waiting is not None  # its router says why
        await a.cancel(high_a.id)
        assert b.queue_positions(ids) == {normal_b.id: 0, normal_a.id: 1, low_a.id: 2}
        for request_id in (busy.id, low_a.id, normal_a.id):
            await a.cancel(request_id)
        await b.cancel(normal_b.id)


async def test_b_cancels_requests_a_owns_and_not_one_that_finished(
    open_store: Callable[[], RedisStore],
) -> None:
    """B.cancel of A's queued and running requests ends them cancelled on both; finished: 409."""
    async with two_runtimes(shared_settings(), open_store) as (a, b):
        short = await a.submit(chat(duration_s=0.01), ALICE)
        finished = await a.wait(short.id, 5)
        assert finished.status is S.SUCCEEDED
        long = await a.submit(chat(duration_s=30.0, resources=HALF_GPU), ALICE)
        queued = await a.submit(chat(duration_s=0.01, resources=HALF_GPU), ALICE)
        await until(lambda: a.get(long.id).status is S.RUNNING)
        assert a.get(queued.id).status is S.QUEUED
        started = time.monotonic()
        cancelled_queued = await b.cancel(queued.id, actor="admin")
        cancelled_long = await b.cancel(long.id, actor="admin")
        assert time.monotonic() - started < 3
        assert cancelled_queued.status is S.CANCELLED
        assert cancelled_long.status is S.CANCELLED
        await until(lambda: a.router.get(long.id) is None and a.router.get(queued.id) is None)
        for request in (long, queued):
            on_a = a.get(request.id)
            assert on_a.status is S.CANCELLED
            assert on_a.attempts == (1 if request is long else 0)
            assert a.transitions(request.id)[-1].actor == "admin"
        assert a.requests_on("sim:0") == []
        for request in (short, long, queued):
            with pytest.raises(AlreadyTerminal):
                await b.cancel(request.id)
        with pytest.raises(NotFound):
            await b.cancel("req_nobody")


# --- adoption -------------------------------------------------------------------------------------


async def test_b_adopts_the_requests_of_a_runtime_that_stopped(
    open_store: Callable[[], RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """A stops with two requests running and two queued, then gives its lease up; B adopts.

    A's async requests become B's and succeed (the one that was running runs again: A's fleet
    died with it); its synchronous ones end with ``router_lost``: failed if running, cancelled
    if queued.
    """
    settings = shared_settings(gpus=2)
    store_a = open_store()
    async with Runtime.from_settings(settings, store=open_store(), seed=2) as b:
        async with Runtime.from_settings(settings, store=store_a, seed=1) as a:
            running = await a.submit(chat(duration_s=0.8, resources=HALF_GPU), ALICE)
            sync_running, _ = await a.admit(
                chat(duration_s=30.0, resources=HALF_GPU), ALICE, durable=False
            )
            queued = await a.submit(chat(duration_s=0.05, resources=HALF_GPU), ALICE)
            sync_queued, _ = await a.admit(
                chat(duration_s=0.05, resources=HALF_GPU), ALICE, durable=False
            )
            await until(
                lambda: (
                    a.get(running.id).status is S.RUNNING
                    and a.get(sync_running.id).status is S.RUNNING
                )
            )
            assert a.get(queued.id).status is S.QUEUED
            assert a.get(sync_queued.id).status is S.QUEUED
        # A stopped without ending them; closing its store gives its lease up at once.
        left = store_a.get_request(running.id)
        assert left is not None and left.status is S.RUNNING
        store_a.close()
        stopped = time.monotonic()
        every = (running, queued, sync_running, sync_queued)

        def owners() -> set[object]:
            return {raw.hget(f"{redis_store_prefix}:req:{r.id}", "owner") for r in every}

        await until(lambda: owners() == {b.store.replica}, timeout_s=8 * SHARED_SYNC_S)
        adopted_after = time.monotonic() - stopped
        ended = await asyncio.gather(*(b.wait(r.id, 10) for r in every))
    done_running, done_queued, lost_running, lost_queued = ended
    assert adopted_after < 8 * SHARED_SYNC_S
    assert done_running.status is S.SUCCEEDED, done_running.error
    assert done_running.attempts == 2  # its first attempt died with A's fleet
    assert done_queued.status is S.SUCCEEDED, done_queued.error
    assert done_queued.attempts == 1
    assert lost_running.status is S.FAILED
    assert lost_running.error is not None and lost_running.error.type == "router_lost"
    assert lost_queued.status is S.CANCELLED
    assert lost_queued.error is not None and lost_queued.error.type == "router_lost"
    # A's reservations were not left behind in the ledger.
    for gpu_id in ("sim:0", "sim:1"):
        assert raw.hgetall(f"{redis_store_prefix}:ledger:{gpu_id}") == {}, gpu_id


async def test_refused_creations_of_one_commit_leave_no_change_behind(
    open_store: Callable[[], RedisStore],
) -> None:
    """Two creations the store refuses in one commit: nothing of either reaches the store.

    A's own window is empty, so its core admits both: the first runs on the one GPU and the
    second waits behind it. Taking the first back frees the GPU, and the pass that follows
    dispatches the second before its own refusal is handled: that dispatch must go with it, not
    reach the store as a change of a request never created (the writer would refuse the commit
    holding it, and drop whatever else that commit held).
    """
    from structlog.testing import capture_logs

    settings = shared_settings(quota={"requests_per_minute": 2})
    async with two_runtimes(settings, open_store) as (a, b):
        for _ in range(2):  # B takes the whole window
            done = await b.submit(chat(max_tokens=2, duration_s=0.01), ALICE)
            await b.wait(done.id, 5)
        with capture_logs() as logs:
            outcomes = await asyncio.gather(
                *(
                    a.submit(chat(max_tokens=2, duration_s=0.01, resources=HALF_GPU), ALICE)
                    for _ in range(2)
                ),
                return_exceptions=True,
            )
            await a.writer.flushed()
            await asyncio.sleep(0.2)
            await a.writer.flushed()
    assert [type(outcome) for outcome in outcomes] == [QuotaExceeded, QuotaExceeded]
    events = [entry["event"] for entry in logs]
    assert "commit_refused" not in events and "changes_dropped" not in events, logs
    assert a.writer.pending == 0


async def test_a_starving_request_holds_its_gpu_against_the_other_routers(
    open_store: Callable[[], RedisStore],
) -> None:
    """B keeps the one GPU busy with small requests; A's large one still starts.

    Past the starvation bound A's request holds the GPU, the hold is shared through Redis, and
    B places nothing more there (its claims on it would be refused): the GPU drains and A's
    request runs, well before B's stream ends.
    """
    settings = shared_settings(placement={"starvation_bound_s": 0.5})
    async with two_runtimes(settings, open_store) as (a, b):
        stop = asyncio.Event()

        async def stream() -> None:
            while not stop.is_set():
                # Two fit at once; even one leaves no room for A's request beside it.
                small = chat(duration_s=0.3, resources=ResourceHints(gpu_memory_mb=30_000))
                done = await b.submit(small, Caller("bob"))
                await b.wait(done.id, 10)

        streams = [asyncio.create_task(stream()) for _ in range(8)]  # B's queue never empties
        try:
            await until(lambda: b.router.active_count("bob") >= 2)
            large = await a.submit(chat(duration_s=0.05, resources=HALF_GPU), ALICE)
            started = time.monotonic()
            done = await a.wait(large.id, 8)
            waited = time.monotonic() - started
        finally:
            stop.set()
            await asyncio.gather(*streams)
    assert done.status is S.SUCCEEDED, (done.status, waited)
    assert waited < 8


async def test_a_higher_class_waiting_on_one_router_gets_the_gpu_the_other_frees(
    open_store: Callable[[], RedisStore],
) -> None:
    """B keeps the one GPU busy with low-class requests, one at a time; A's high one starts next.

    B learns first of what its own executions free, so alone it would refill the GPU at once,
    every time, and A's request would wait for the starvation bound (a minute here). A shares
    its request waiting for room; B's next pass keeps the GPU for it, and A places it.
    """
    settings = shared_settings(placement={"starvation_bound_s": 60.0})
    async with two_runtimes(settings, open_store) as (a, b):
        stop = asyncio.Event()

        async def stream() -> None:
            while not stop.is_set():
                # One at a time on the GPU, and none beside A's request.
                low = chat(duration_s=0.3, priority="low", resources=ResourceHints(45_000))
                done = await b.submit(low, Caller("bob"))
                await b.wait(done.id, 10)

        streams = [asyncio.create_task(stream()) for _ in range(4)]  # B's queue never empties
        try:
            await until(lambda: b.router.active_count("bob") >= 1)
            await until(lambda: b.router.queued_count("bob") >= 2)
            high = chat(duration_s=0.05, priority="high", resources=HALF_GPU)
            large = await a.submit(high, ALICE)
            done = await a.wait(large.id, 4)
            b_queued = b.router.queued_count("bob")
        finally:
            stop.set()
            await asyncio.gather(*streams)
    assert done.status is S.SUCCEEDED
    assert b_queued >= 1  # B still had its own work waiting when A's ran


async def test_requests_owned_but_not_driven_are_taken_over(
    open_store: Callable[[], RedisStore],
) -> None:
    """An adoption the runtime never took over (its answer lost, say) is caught up.

    Router C stops with a request running and one queued; A's *store* adopts them behind A's
    runtime's back (no await between C's lapse and the adoption, so A's own loop never sees C
    lapsed). A's runtime finds them among what it owns but does not drive, and runs both.
    """
    settings = shared_settings()
    async with Runtime.from_settings(settings, store=open_store(), seed=1) as a:
        c_store = open_store()
        async with Runtime.from_settings(settings, store=c_store, seed=3) as c:
            running = await c.submit(chat(duration_s=2, resources=HALF_GPU), ALICE)
            queued = await c.submit(chat(duration_s=0.01, resources=HALF_GPU), ALICE)
        c_store.close()  # its lease goes at once; it stays listed: lapsed
        adopted = a.store.adopt(c_store.replica)
        assert {r.id for r in adopted} == {running.id, queued.id}
        assert a.router.get(running.id) is None  # the runtime knows nothing of them yet
        ended = [await a.wait(r.id, 15) for r in (queued, running)]
    assert [r.status for r in ended] == [S.SUCCEEDED, S.SUCCEEDED]

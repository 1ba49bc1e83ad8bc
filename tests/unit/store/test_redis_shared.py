"""Routers sharing one Redis prefix (``RedisStore(shared=True)``), at the store's level.

Two store clients on one prefix stand for two routers. What one admits or reserves, the other's
writes are checked against, atomically, in the write script: the users' rate windows (timed by
Redis's clock), their queue limits, the idempotency keys, each GPU's reservation ledger and each
user's concurrent slots. A lapsed router's requests are adopted by another, which fences it;
cancellations reach a request's owner through the prefix.

Plain tests pin each rule; a stateful hypothesis test drives both clients in interleaved
creations, dispatches with claims, starts, ends, requeues and cancellations, and checks Redis
itself against a model after every step. Everything runs against the real Redis of
``REDIS_URL``, under a prefix of each test's own that is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import hypothesis.strategies as st
import pytest
import redis
from changes import T0, created, make_request, moved
from hypothesis import Phase, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gpu_request_router.core.load_balancer import Need
from gpu_request_router.core.state_store import (
    Charge,
    Claim,
    Limits,
    QueueHead,
    Refusal,
    StateChange,
)
from gpu_request_router.exceptions import StoreUnavailable
from gpu_request_router.models.request import Request, RequestStatus, Task
from gpu_request_router.store import RedisStore
from gpu_request_router.store.redis_store import HOUR_CHARGE_ID
from gpu_request_router.testing import (
    RedisServer,
    drop_redis_prefix,
    redis_prefix,
    require_redis,
)

S = RequestStatus
# A long lease: nothing here waits for one to lapse (a lapse is made by deleting the key).
LEASE_S = 30.0
# The executions a GPU runs at once, where a test is not about them.
ROOMY_SLOTS = 100


def open_shared(url: str, prefix: str) -> RedisStore:
    """One router's client of a shared prefix."""
    return RedisStore(url, prefix=prefix, shared=True, lease_s=LEASE_S)


def creating(request: Request, queue_key: float | None = None, **limits: float) -> StateChange:
    """The creation of ``request``, checked against ``limits`` (Limits' fields).

    Its sort key in the queue is ``queue_key``, by default its creation time.
    """
    key = request.created_at if queue_key is None else queue_key
    return replace(created(request), limits=Limits(**limits), queue_key=key)


def dispatching(
    request: Request,
    at: float,
    *gpus: tuple[str, int, int] | tuple[str, int, int, int],
    max_concurrent: int | None = None,
    gpu_seconds: float | None = None,
    per_hour: float | None = None,
) -> StateChange:
    """Move ``request`` to dispatching at ``at``, claiming ``gpus``.

    Each GPU as (gpu, MiB, limit, slots), or (gpu, MiB, limit) with :data:`ROOMY_SLOTS`.
    ``gpu_seconds``: the dispatch's charge (execution ``<id>-x``), checked against ``per_hour``.
    """
    claimed = tuple(g if len(g) == 4 else (*g, ROOMY_SLOTS) for g in gpus)
    charge = (
        None if gpu_seconds is None else Charge(request.user, f"{request.id}-x", at, gpu_seconds)
    )
    claim = Claim(claimed, max_concurrent, per_hour)
    return replace(moved(request, S.DISPATCHING, at, charge=charge), claim=claim)


@pytest.fixture
def stores(redis_url: str, redis_store_prefix: str) -> Iterator[tuple[RedisStore, RedisStore]]:
    """Two routers' clients of one shared prefix (closed before the prefix is dropped)."""
    a = open_shared(redis_url, redis_store_prefix)
    b = open_shared(redis_url, redis_store_prefix)
    yield a, b
    b.close()
    a.close()


def ledger(raw: redis.Redis, prefix: str, gpu: str) -> dict[str, int]:
    """The reservations on ``gpu`` as stored: request id -> MiB."""
    return {rid: int(mb) for rid, mb in raw.hgetall(f"{prefix}:ledger:{gpu}").items()}


def only(refusals: list[Refusal]) -> Refusal:
    """The one refusal of a write."""
    assert len(refusals) == 1, refusals
    return refusals[0]


# --- creations' limits across routers -------------------------------------------------------------


def test_the_rate_limit_counts_the_creations_of_every_router(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """N creations a minute in all, alternating routers; the rest refused and never stored."""
    a, b = stores
    limit = 3
    answers: dict[str, list[Refusal]] = {}
    for i in range(7):
        request = make_request(f"r{i}", created_at=T0 + i, key=f"k{i}")
        answers[request.id] = (a, b)[i % 2].write([creating(request, requests_per_minute=limit)])
    assert [rid for rid, refusals in answers.items() if not refusals] == ["r0", "r1", "r2"]
    for i in range(3, 7):
        rid = f"r{i}"
        refusal = only(answers[rid])
        assert (refusal.request_id, refusal.kind, refusal.creation) == (
            rid,
            "requests_per_minute",
            True,
        )
        assert 30 < refusal.retry_after_s <= 60  # the oldest admission is a moment old
        for store in (a, b):
            assert store.get_request(rid) is None
            assert store.transitions(rid) == []
            assert store.find_idempotent("alice", f"k{i}") is None
    assert [r.id for r in a.unfinished_requests()] == ["r0", "r2"]  # each router's own
    assert [r.id for r in b.unfinished_requests()] == ["r1"]
    assert raw.zcard(f"{redis_store_prefix}:created") == 3
    # Another user's window is their own.
    assert b.write([creating(make_request("bob1", user="bob"), requests_per_minute=limit)]) == []


def test_a_lowered_rate_limit_waits_for_every_admission_over_it_to_leave(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """Three admissions half a second apart, then a limit of 1: the wait is for the newest."""
    a, b = stores
    for i in range(3):
        assert a.write([creating(make_request(f"r{i}"), requests_per_minute=3)]) == []
        time.sleep(0.5)
    refusal = only(b.write([creating(make_request("r3"), requests_per_minute=1)]))
    assert refusal.kind == "requests_per_minute"
    # r0 leaves in ~58.5 s, but r1 and r2 would still be two over a limit of 1.
    assert 59.0 < refusal.retry_after_s <= 60


def test_a_refused_creation_takes_its_other_changes_of_the_batch_with_it(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """Created and dispatched in one batch, refused: no row, no trail, no reservation, no slot."""
    a, b = stores
    assert a.write([creating(make_request("r1"), requests_per_minute=1)]) == []
    request = make_request("r2", created_at=T0 + 1, key="k2")
    batch = [
        creating(request, requests_per_minute=1),
        dispatching(request, T0 + 2, ("g0", 1000, 10_000), max_concurrent=5),
    ]
    refusal = only(b.write(batch))
    assert (refusal.request_id, refusal.kind) == ("r2", "requests_per_minute")
    assert b.get_request("r2") is None
    assert b.transitions("r2") == []
    assert b.find_idempotent("alice", "k2") is None
    assert ledger(raw, redis_store_prefix, "g0") == {}
    assert b.shared_view(["g0"], ["alice"]).active == {"alice": frozenset()}
    assert [r.id for r in b.unfinished_requests()] == []


def test_the_queue_limit_of_a_user_counts_every_routers_waiting_requests(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """max_queued across routers; a dispatch leaves the queue and frees the place."""
    a, b = stores
    r1, r2 = make_request("r1"), make_request("r2", created_at=T0 + 1)
    assert a.write([creating(r1, max_queued=2)]) == []
    assert b.write([creating(r2, max_queued=2)]) == []
    refusal = only(a.write([creating(make_request("r3", created_at=T0 + 2), max_queued=2)]))
    assert (refusal.request_id, refusal.kind) == ("r3", "max_queued")
    assert a.get_request("r3") is None
    # Another user's queue is their own.
    assert b.write([creating(make_request("bob1", user="bob"), max_queued=2)]) == []
    assert a.write([moved(r1, S.DISPATCHING, T0 + 3)]) == []
    assert b.write([creating(make_request("r4", created_at=T0 + 4), max_queued=2)]) == []
    refusal = only(a.write([creating(make_request("r5", created_at=T0 + 5), max_queued=2)]))
    assert refusal.kind == "max_queued"
    assert b.write([moved(r2, S.CANCELLED, T0 + 6)]) == []  # a cancellation frees it too
    assert a.write([creating(make_request("r6", created_at=T0 + 7), max_queued=2)]) == []


def test_the_total_queue_limit_counts_every_users_waiting_requests_on_every_router(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """max_queued_total across users and routers: the refusal says the limit and the count."""
    a, b = stores
    alice = make_request("a1", user="alice")
    assert a.write([creating(alice, max_queued_total=2)]) == []
    assert b.write([creating(make_request("b1", user="bob"), max_queued_total=2)]) == []
    refusal = only(a.write([creating(make_request("c1", user="carol"), max_queued_total=2)]))
    assert (refusal.request_id, refusal.kind) == ("c1", "max_queued_total")
    assert (refusal.limit, refusal.waiting) == (2, 2)
    assert b.get_request("c1") is None
    assert a.write([moved(alice, S.DISPATCHING, T0 + 1)]) == []
    assert b.write([creating(make_request("c2", user="carol"), max_queued_total=2)]) == []


def test_a_dispatch_in_the_same_batch_frees_its_queue_place_for_a_creation_after_it(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """A batch holds a dispatch, then a creation: the creation sees the queue the dispatch left.

    The core admitted the creation after it had dispatched (its queue count was below the
    limit), and the writer commits both in one batch; the queue after the batch holds
    ``max_queued`` requests, not more.
    """
    a, b = stores
    r1 = make_request("r1")
    assert a.write([creating(r1, max_queued=2)]) == []
    assert b.write([creating(make_request("r2", created_at=T0 + 1), max_queued=2)]) == []
    batch = [
        moved(r1, S.DISPATCHING, T0 + 2),
        creating(make_request("r3", created_at=T0 + 2), max_queued=2),
    ]
    assert a.write(batch) == []
    assert a.get_request("r3") is not None


def test_an_idempotency_key_taken_by_another_router_refuses_the_second_creation(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """The second creation under one key is refused with the first's id, and not stored."""
    a, b = stores
    assert a.write([creating(make_request("r1", key="k"))]) == []
    refusal = only(b.write([creating(make_request("r2", created_at=T0 + 1, key="k"))]))
    assert (refusal.request_id, refusal.kind, refusal.existing) == ("r2", "idempotency_key", "r1")
    assert refusal.creation
    assert b.get_request("r2") is None
    found = b.find_idempotent("alice", "k")
    assert found is not None and found.id == "r1"
    # The key is the user's: another user's is free.
    assert b.write([creating(make_request("r3", user="bob", key="k"))]) == []


# --- dispatches' claims across routers ------------------------------------------------------------


def test_a_claim_past_a_gpus_limit_is_refused_and_its_dispatch_holds_nothing(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """gpu_memory: the refusal shows the other router's reservation; freed, the claim passes."""
    a, b = stores
    r1, r2 = make_request("r1"), make_request("r2", created_at=T0 + 1)
    a.write([creating(r1)])
    b.write([creating(r2)])
    assert a.write([dispatching(r1, T0 + 2, ("g0", 6000, 10_000))]) == []
    refusal = only(b.write([dispatching(r2, T0 + 3, ("g0", 5000, 10_000))]))
    assert (refusal.request_id, refusal.kind, refusal.creation) == ("r2", "gpu_memory", False)
    assert refusal.ledger == {"g0": {"r1": 6000}}
    stored = b.get_request("r2")
    assert stored is not None and stored.status is S.DISPATCHING  # written, without its claim
    assert a.shared_view(["g0"], ["alice"]).ledger == {"g0": {"r1": 6000}}
    assert a.shared_view(["g0"], ["alice"]).active == {"alice": frozenset({"r1"})}
    assert a.write([moved(r1, S.RUNNING, T0 + 4)]) == []
    assert ledger(raw, redis_store_prefix, "g0") == {"r1": 6000}  # a start keeps it
    assert a.write([moved(r1, S.SUCCEEDED, T0 + 5)]) == []
    assert ledger(raw, redis_store_prefix, "g0") == {}
    assert b.shared_view(["g0"], []).ledger == {"g0": {}}
    assert b.write([moved(r2, S.QUEUED, T0 + 6)]) == []  # what the router does with a refusal
    assert b.write([dispatching(r2, T0 + 7, ("g0", 5000, 10_000))]) == []
    assert a.shared_view(["g0"], []).ledger == {"g0": {"r2": 5000}}


def test_a_claim_may_fill_a_gpu_to_its_limit_and_is_all_or_nothing(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """Exactly the limit passes; a claim one GPU of which refuses reserves none of them."""
    a, b = stores
    r1, r2, r3 = (make_request(f"r{i}", created_at=T0 + i) for i in (1, 2, 3))
    a.write([creating(r1), creating(r3)])
    b.write([creating(r2)])
    assert a.write([dispatching(r1, T0 + 4, ("g0", 6000, 10_000))]) == []
    assert b.write([dispatching(r2, T0 + 5, ("g0", 4000, 10_000))]) == []
    assert ledger(raw, redis_store_prefix, "g0") == {"r1": 6000, "r2": 4000}
    refusal = only(a.write([dispatching(r3, T0 + 6, ("g1", 1000, 8000), ("g0", 1, 10_000))]))
    assert refusal.kind == "gpu_memory"
    assert refusal.ledger == {"g1": {}, "g0": {"r1": 6000, "r2": 4000}}
    assert ledger(raw, redis_store_prefix, "g1") == {}


def test_a_gpu_runs_no_more_executions_of_all_routers_than_its_slots(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """A claim on a GPU whose slots the ledger fills is refused, memory to spare or not."""
    a, b = stores
    r1, r2, r3 = (make_request(f"r{i}", created_at=T0 + i) for i in (1, 2, 3))
    a.write([creating(r1), creating(r3)])
    b.write([creating(r2)])
    assert a.write([dispatching(r1, T0 + 4, ("g0", 1000, 10_000, 2))]) == []
    assert b.write([dispatching(r2, T0 + 5, ("g0", 1000, 10_000, 2))]) == []
    refusal = only(a.write([dispatching(r3, T0 + 6, ("g0", 1000, 10_000, 2))]))
    assert (refusal.request_id, refusal.kind) == ("r3", "gpu_memory")
    assert refusal.ledger == {"g0": {"r1": 1000, "r2": 1000}}
    b.write([moved(r2, S.FAILED, T0 + 7)])
    a.write([moved(r3, S.QUEUED, T0 + 8)])
    assert a.write([dispatching(r3, T0 + 9, ("g0", 1000, 10_000, 2))]) == []
    assert ledger(raw, redis_store_prefix, "g0") == {"r1": 1000, "r3": 1000}


def test_a_batch_that_frees_gpu_memory_lets_a_claim_of_the_same_batch_use_it(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """One request ends and another is dispatched in one batch: the ledger counts the end."""
    a, _ = stores
    r1, r2 = make_request("r1"), make_request("r2", created_at=T0 + 1)
    a.write([creating(r1), creating(r2)])
    assert a.write([dispatching(r1, T0 + 2, ("g0", 6000, 10_000))]) == []
    a.write([moved(r1, S.RUNNING, T0 + 3)])
    batch = [moved(r1, S.SUCCEEDED, T0 + 4), dispatching(r2, T0 + 4, ("g0", 8000, 10_000))]
    assert a.write(batch) == []
    assert ledger(raw, redis_store_prefix, "g0") == {"r2": 8000}


def test_max_concurrent_counts_the_slots_a_user_holds_on_every_router(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """max_concurrent: refused with the slot holders; a requeue frees the slot."""
    a, b = stores
    r1, r2 = make_request("r1"), make_request("r2", created_at=T0 + 1)
    bob = make_request("b1", user="bob", created_at=T0 + 1)
    a.write([creating(r1)])
    b.write([creating(r2), creating(bob)])
    gpu = ("g0", 1000, 10_000)
    assert a.write([dispatching(r1, T0 + 2, gpu, max_concurrent=1)]) == []
    refusal = only(b.write([dispatching(r2, T0 + 3, gpu, max_concurrent=1)]))
    assert (refusal.request_id, refusal.kind, refusal.creation) == ("r2", "max_concurrent", False)
    assert refusal.active == frozenset({"r1"})
    assert b.write([dispatching(bob, T0 + 3, gpu, max_concurrent=1)]) == []  # bob's own slots
    view = a.shared_view(["g0"], ["alice", "bob"])
    assert view.active == {"alice": frozenset({"r1"}), "bob": frozenset({"b1"})}
    assert view.ledger == {"g0": {"r1": 1000, "b1": 1000}}  # the refused dispatch holds nothing
    a.write([moved(r1, S.RUNNING, T0 + 4)])
    assert raw.smembers(f"{redis_store_prefix}:active:alice") == {"r1"}
    assert a.write([moved(r1, S.QUEUED, T0 + 5)]) == []  # a requeue gives the slot back
    assert raw.smembers(f"{redis_store_prefix}:active:alice") == set()
    b.write([moved(r2, S.QUEUED, T0 + 6)])
    assert b.write([dispatching(r2, T0 + 7, gpu, max_concurrent=1)]) == []
    assert raw.smembers(f"{redis_store_prefix}:active:alice") == {"r2"}


def test_a_batch_that_frees_a_users_slot_lets_a_claim_of_the_same_batch_take_it(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """One of alice's requests ends and another is dispatched in one batch, max_concurrent 1.

    The core freed the slot before it dispatched; the store counts the user's slots less what
    the batch releases, as it counts the GPUs' ledgers.
    """
    a, _ = stores
    r1, r2 = make_request("r1"), make_request("r2", created_at=T0 + 1)
    gpu = ("g0", 1000, 10_000)
    a.write([creating(r1), creating(r2)])
    assert a.write([dispatching(r1, T0 + 2, gpu, max_concurrent=1)]) == []
    a.write([moved(r1, S.RUNNING, T0 + 3)])
    batch = [moved(r1, S.SUCCEEDED, T0 + 4), dispatching(r2, T0 + 4, gpu, max_concurrent=1)]
    assert a.write(batch) == []
    assert raw.smembers(f"{redis_store_prefix}:active:alice") == {"r2"}
    assert ledger(raw, redis_store_prefix, "g0") == {"r2": 1000}


def test_gpu_seconds_per_hour_counts_the_charges_of_every_router(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """A claim whose charge would pass the user's hour, with every router's charges, is refused.

    The refusal carries the user's charges in the hour (their router learns them) and when
    enough of them leave it; a refused claim charges nothing; a charge settled lower in the
    same batch as a claim makes room for it; another user's hour is their own.
    """
    a, b = stores
    r1, r2, r3 = (make_request(f"r{i}", created_at=T0 + i) for i in (1, 2, 3))
    bob = make_request("b1", user="bob", created_at=T0 + 1)
    a.write([creating(r1), creating(r3)])
    b.write([creating(r2), creating(bob)])
    gpu = ("g0", 1000, 10_000)
    assert a.write([dispatching(r1, T0 + 4, gpu, gpu_seconds=60.0, per_hour=100.0)]) == []
    refusal = only(b.write([dispatching(r2, T0 + 5, gpu, gpu_seconds=50.0, per_hour=100.0)]))
    assert (refusal.request_id, refusal.kind, refusal.creation) == (
        "r2",
        "gpu_seconds_per_hour",
        False,
    )
    assert "you used 60 GPU-seconds in the last hour" in refusal.message
    # The hour as one charge of every router's 60 GPU-seconds, leaving when r1's charge leaves.
    assert refusal.charges is not None
    (hour,) = refusal.charges
    assert (hour.user, hour.charge_id, hour.gpu_seconds) == ("alice", HOUR_CHARGE_ID, 60.0)
    assert 3590 < refusal.retry_after_s <= 3600  # when r1's charge leaves the hour
    assert abs(hour.at + 3600 - (time.time() + refusal.retry_after_s)) < 5  # by Redis's clock
    assert raw.hget(f"{redis_store_prefix}:charge_gs", '["alice","r2-x"]') is None
    assert ledger(raw, redis_store_prefix, "g0") == {"r1": 1000}
    # The view of a router waiting on alice's hour reads the same charges.
    (viewed,) = b.shared_view([], [], charged=["alice"]).charges
    assert (viewed.charge_id, viewed.gpu_seconds) == (HOUR_CHARGE_ID, 60.0)
    assert abs(viewed.at - hour.at) < 5  # it leaves the hour with r1's charge
    assert b.write([dispatching(bob, T0 + 5, gpu, gpu_seconds=50.0, per_hour=100.0)]) == []
    b.write([moved(r2, S.QUEUED, T0 + 6)])
    assert b.write([dispatching(r2, T0 + 7, gpu, gpu_seconds=40.0, per_hour=100.0)]) == []
    # r1 ends having used 20, settled in the same batch as r3's claim of 40, which then fits:
    # 20 + 40 + 40 (r2) = 100.
    a.write([moved(r1, S.RUNNING, T0 + 8)])
    settle = moved(r1, S.SUCCEEDED, T0 + 9, charge=Charge("alice", "r1-x", T0 + 4, 20.0))
    assert a.write([settle, dispatching(r3, T0 + 9, gpu, gpu_seconds=40.0, per_hour=100.0)]) == []
    assert float(raw.hget(f"{redis_store_prefix}:charge_gs", '["alice","r1-x"]')) == 20.0
    # Full: any more is refused, 1 GPU-second or not.
    r4 = make_request("r4", created_at=T0 + 12)
    a.write([creating(r4)])
    refusal = only(a.write([dispatching(r4, T0 + 13, gpu, gpu_seconds=1.0, per_hour=100.0)]))
    assert [c.gpu_seconds for c in refusal.charges or ()] == [100.0]
    assert raw.zcard(f"{redis_store_prefix}:gsu:alice") == 3
    assert float(raw.get(f"{redis_store_prefix}:gst:alice")) == 100.0  # 20 + 40 + 40
    assert 3500 < raw.pttl(f"{redis_store_prefix}:gsu:alice") / 1000 <= 3601


def test_a_creation_is_refused_once_the_users_hour_is_spent_on_every_router(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """Admission counts every router's GPU-seconds of the user in the hour, as dispatch does.

    The refusal is a creation's (nothing written), says when the hour has room again, and hands
    the router the user's hour; another user's hour is their own.
    """
    a, b = stores
    r1 = make_request("r1", created_at=T0 + 1)
    a.write([creating(r1)])
    assert a.write([dispatching(r1, T0 + 2, ("g0", 1000, 10_000), gpu_seconds=60.0)]) == []
    r2, r3 = make_request("r2", created_at=T0 + 3), make_request("r3", created_at=T0 + 4)
    assert b.write([creating(r2, gpu_seconds_per_hour=100.0)]) == []  # 60 of 100: room left
    refusal = only(b.write([creating(r3, gpu_seconds_per_hour=60.0)]))
    assert (refusal.request_id, refusal.kind, refusal.creation) == (
        "r3",
        "gpu_seconds_per_hour",
        True,
    )
    assert "you used 60 of 60 GPU-seconds in the last hour" in refusal.message
    assert 3590 < refusal.retry_after_s <= 3600  # when r1's charge leaves the hour
    assert [(c.charge_id, c.gpu_seconds) for c in refusal.charges or ()] == [(HOUR_CHARGE_ID, 60.0)]
    assert raw.exists(f"{redis_store_prefix}:req:r3") == 0
    bob = make_request("b1", user="bob", created_at=T0 + 5)
    assert b.write([creating(bob, gpu_seconds_per_hour=60.0)]) == []


def test_a_charge_leaves_the_users_running_hour_total_once_an_hour_old(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """The check reads a running total, not every charge: one over an hour old leaves it."""
    a, _ = stores
    r1, r2, r3 = (make_request(f"r{i}", created_at=T0 + i) for i in (1, 2, 3))
    a.write([creating(r1), creating(r2), creating(r3)])
    gpu = ("g0", 1000, 10_000)
    assert a.write([dispatching(r1, T0 + 4, gpu, gpu_seconds=70.0, per_hour=100.0)]) == []
    assert only(a.write([dispatching(r2, T0 + 5, gpu, gpu_seconds=40.0, per_hour=100.0)]))
    a.write([moved(r2, S.QUEUED, T0 + 6)])
    # r1's charge an hour old (as if the hour had passed): the hour has room for r2 again.
    raw.zadd(f"{redis_store_prefix}:gsu:alice", {'["alice","r1-x"]': time.time() - 3601})
    assert a.write([dispatching(r2, T0 + 7, gpu, gpu_seconds=40.0, per_hour=100.0)]) == []
    assert raw.zrange(f"{redis_store_prefix}:gsu:alice", 0, -1) == ['["alice","r2-x"]']
    assert float(raw.get(f"{redis_store_prefix}:gst:alice")) == 40.0  # pruned by the write


def test_a_claim_larger_than_the_whole_hour_is_refused_with_no_time_to_retry(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """Waiting frees nothing for a charge over the limit on its own: retry_after is 0."""
    a, _ = stores
    r1 = make_request("r1")
    a.write([creating(r1)])
    refusal = only(a.write([dispatching(r1, T0 + 1, ("g0", 1, 10), gpu_seconds=7.0, per_hour=5.0)]))
    assert (refusal.kind, refusal.retry_after_s) == ("gpu_seconds_per_hour", 0.0)
    assert [c.gpu_seconds for c in refusal.charges or ()] == [0.0]


def test_workers_heard_by_one_router_reach_the_others_once_and_a_silent_one_is_forgotten(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """The worker list comes back when it changed; a worker unheard of for a day leaves it."""
    a, b = stores
    assert a.shared_view([], [], heard={"w1": "http://h1:9000"}).workers == {"w1": "http://h1:9000"}
    assert b.shared_view([], []).workers == {"w1": "http://h1:9000"}
    assert b.shared_view([], []).workers is None  # unchanged since
    assert a.shared_view([], [], heard={"w1": "http://h1:9000"}).workers is None  # a heartbeat
    assert a.shared_view([], [], heard={"w1": "http://h2:9000"}).workers == {"w1": "http://h2:9000"}
    assert b.shared_view([], [], heard={"w2": "http://h3:9000"}).workers == {
        "w1": "http://h2:9000",
        "w2": "http://h3:9000",
    }
    seen = f"{redis_store_prefix}:workers_seen"
    raw.zadd(seen, {"w1": time.time() - 86_401})  # silent for a day
    assert a.shared_view([], []).workers == {"w2": "http://h3:9000"}
    assert raw.hgetall(f"{redis_store_prefix}:workers") == {"w2": "http://h3:9000"}
    assert raw.zrange(seen, 0, -1) == ["w2"]


def test_every_routers_queued_requests_are_ranked_in_one_order(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """Both routers give each queued request the same place: by sort key, whoever owns it."""
    a, b = stores
    r1, r2, r3 = (make_request(f"r{i}", created_at=T0 + i) for i in (1, 2, 3))
    a.write([creating(r1, queue_key=100.0), creating(r3, queue_key=75.0)])
    b.write([creating(r2, queue_key=50.0)])
    ids = ["r1", "r2", "r3", "nobody"]
    assert a.queue_positions(ids) == b.queue_positions(ids) == {"r2": 0, "r3": 1, "r1": 2}
    b.write([dispatching(r2, T0 + 4, ("g0", 1000, 10_000))])
    assert b.queue_positions(ids) == {"r3": 0, "r1": 1}
    b.write([moved(r2, S.QUEUED, T0 + 5)])  # back in the queue, at its own place
    assert a.queue_positions(ids) == {"r2": 0, "r3": 1, "r1": 2}
    a.write([moved(r3, S.CANCELLED, T0 + 6)])
    assert b.queue_positions(ids) == {"r2": 0, "r1": 1}
    assert a.queue_positions([]) == {}


def test_queue_heads_published_by_one_router_reach_the_others_until_they_lapse(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """A router's heads come back to the others, whole, not to itself; a second unrenewed, gone."""
    a, b = stores
    need = Need(
        model="llama-3-8b",
        memory_mb=50_000,
        weights_mb=15_360,
        gpu_count=2,
        gpu_type="H100-80GB",
        avoid=frozenset({"w1:0"}),
        exact=True,
        duration_s={"H100-80GB": 2.5},
        task=Task.EMBEDDING,
    )
    heads = [QueueHead("req_1", 60.125, need), QueueHead("req_2", 1e9 + 0.1, Need("m", 1))]
    assert a.shared_view([], [], heads=heads).heads == []
    assert b.shared_view([], []).heads == heads
    assert b.shared_view([], [], heads=[]).heads == heads  # b has none; a's stay
    assert a.shared_view([], []).heads == []
    assert 0 < raw.pttl(f"{redis_store_prefix}:heads:{a.replica}") <= 1_000
    raw.delete(f"{redis_store_prefix}:heads:{a.replica}")  # a stopped renewing them
    assert b.shared_view([], []).heads == []


def test_one_router_at_a_time_takes_a_workers_turn_and_the_others_get_its_reading(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """A turn is one router's for an interval; its reading reaches the others once, newest wins."""
    a, b = stores
    first = a.poll_turns({"w1": 0, "w2": 0}, 60.0)
    assert sorted(first.mine) == ["w1", "w2"] and first.readings == []
    assert b.poll_turns({"w1": 0, "w2": 0}, 60.0).mine == []  # a holds both turns
    items = [{"id": "w1:0", "index": 0, "memory_total_mb": 81_559, "running": ["exe_1"]}]
    a.publish_readings(first.stamp, {"w1": items, "w2": "ConnectError('refused')"}, 30.0)
    shared = {r.worker: r for r in b.poll_turns({"w1": 0, "w2": 0}, 60.0).readings}
    assert shared["w1"].items == items and shared["w1"].stamp == first.stamp
    assert 0 <= shared["w1"].age_s < 5
    assert shared["w2"].items is None and shared["w2"].error == "ConnectError('refused')"
    # Asked with the stamp it took in, b gets nothing new; a stale publication never overwrites.
    assert b.poll_turns({"w1": first.stamp}, 60.0).readings == []
    a.publish_readings(first.stamp - 1, {"w1": []}, 30.0)
    assert b.poll_turns({"w1": 0}, 60.0).readings[0].items == items
    assert 29_000 < raw.pttl(f"{redis_store_prefix}:reading:w1") <= 30_000
    # When a's turn lapses, the next router to ask takes it.
    raw.delete(f"{redis_store_prefix}:poll:w1")
    second = b.poll_turns({"w1": first.stamp, "w2": 0}, 0.5)
    assert second.mine == ["w1"] and second.stamp >= first.stamp
    assert 0 < raw.pttl(f"{redis_store_prefix}:poll:w1") <= 500
    assert raw.get(f"{redis_store_prefix}:poll:w1") == b.replica


# --- adoption, cancellations, modes ---------------------------------------------------------------


def lapse_and_adopt(
    raw: redis.Redis, prefix: str, dead: RedisStore, adopter: RedisStore
) -> list[Request]:
    """Delete ``dead``'s lease (a lapse) and adopt its requests with ``adopter``.

    ``dead``'s renewal thread takes a lapsed lease back while nobody adopted it (every second):
    a lapse it undid before the adoption is made again.
    """
    for _ in range(50):
        raw.delete(f"{prefix}:replica:{dead.replica}")
        if dead.replica not in adopter.shared_view([], []).lapsed:
            continue
        adopted = adopter.adopt(dead.replica)
        if raw.get(f"{prefix}:adopted:{dead.replica}") == adopter.replica:
            return adopted
        assert adopted == []  # its lease came back first: nothing was taken
    pytest.fail("the lease was never seen lapsed")


def test_a_lapsed_routers_requests_are_adopted_oldest_first_and_it_is_fenced(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """The adopter lists them, owns them (cancellations go to it); the lapsed one never writes."""
    a, b = stores
    assert a.shared_view([], []).lapsed == []
    r1, r2, r3 = (make_request(f"r{i}", created_at=T0 + 10 - i) for i in (1, 2, 3))
    done = make_request("done", created_at=T0)
    b.write([creating(r1), creating(r2), creating(r3), creating(done)])
    b.write([dispatching(r2, T0 + 20, ("g0", 2000, 10_000))])
    b.write([moved(done, S.CANCELLED, T0 + 20)])
    a.write([creating(make_request("mine", created_at=T0 + 30))])
    assert a.send_cancel("r1", "admin")  # sent to b before it lapsed: the adopter gets it
    adopted = lapse_and_adopt(raw, redis_store_prefix, b, a)
    assert [r.id for r in adopted] == ["r3", "r2", "r1"]  # oldest first, unfinished only
    view = a.shared_view(["g0"], [])
    assert view.cancels == [("r1", "admin")]
    assert view.lapsed == []
    assert view.ledger == {"g0": {"r2": 2000}}  # it keeps its reservation
    assert [r.id for r in a.unfinished_requests()] == ["r3", "r2", "r1", "mine"]
    assert a.adopt(b.replica) == []  # taken once
    assert a.send_cancel("r3", "alice")  # its owner is the adopter now
    assert a.shared_view([], []).cancels == [("r3", "alice")]
    with pytest.raises(StoreUnavailable):
        b.write([creating(make_request("late", created_at=T0 + 40))])
    assert a.get_request("late") is None
    with pytest.raises(StoreUnavailable):
        b.write([moved(r3.snapshot(), S.CANCELLED, T0 + 40)])
    stored = a.get_request("r3")
    assert stored is not None and stored.status is S.QUEUED
    deadline = time.monotonic() + 5
    while b.failure() is None:  # its renewal finds the lease adopted
        assert time.monotonic() < deadline, "the fenced router never noticed"
        time.sleep(0.05)
    assert a.write([moved(r3, S.CANCELLED, T0 + 40)]) == []


def test_a_cancellation_reaches_the_requests_owner_once(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """send_cancel: the owner's next view has it, the one after not; finished: False."""
    a, b = stores
    r1 = make_request("r1")
    a.write([creating(r1), creating(make_request("r2", created_at=T0 + 1))])
    assert b.send_cancel("r1", "admin") is True
    assert b.shared_view([], []).cancels == []  # not b's
    assert a.shared_view([], []).cancels == [("r1", "admin")]
    assert a.shared_view([], []).cancels == []
    a.write([moved(r1, S.CANCELLED, T0 + 2)])
    assert b.send_cancel("r1", "admin") is False
    assert b.send_cancel("nobody", "admin") is False
    assert a.shared_view([], []).cancels == []


def test_recovery_leaves_the_cancellations_passed_to_a_router_for_its_next_view(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """unfinished_requests (which looks for lapsed routers) does not take the cancellations."""
    a, b = stores
    a.write([creating(make_request("r1"))])
    assert b.send_cancel("r1", "admin")
    assert [r.id for r in a.unfinished_requests()] == ["r1"]
    assert a.shared_view([], []).cancels == [("r1", "admin")]


def test_every_router_of_a_prefix_must_share_it_or_none(
    redis_url: str, redis_store_prefix: str
) -> None:
    """A shared router on a one-owner prefix (and the reverse) is refused, naming state.shared."""
    owner = RedisStore(redis_url, prefix=redis_store_prefix, lease_s=LEASE_S)
    try:
        with pytest.raises(StoreUnavailable, match=r"state\.shared"):
            open_shared(redis_url, redis_store_prefix)
    finally:
        owner.close()
    other = f"{redis_store_prefix}-shared"
    sharer = open_shared(redis_url, other)
    try:
        with pytest.raises(StoreUnavailable, match=r"state\.shared"):
            RedisStore(redis_url, prefix=other, lease_s=LEASE_S)
    finally:
        sharer.close()
        drop_redis_prefix(redis_url, other)
    with pytest.raises(ValueError, match="standby"):
        RedisStore(redis_url, prefix=redis_store_prefix, shared=True, standby=True)


def test_a_delisted_router_never_takes_its_lease_back(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """Adopted, b is gone from the replicas for good: its lease never comes back.

    Even with the adoption marker expired (it lasts a day), its lapsed lease stays lapsed and
    its writes are refused.
    """
    a, b = stores
    b.write([creating(make_request("rb"))])
    lapse_and_adopt(raw, redis_store_prefix, b, a)
    raw.delete(
        f"{redis_store_prefix}:adopted:{b.replica}", f"{redis_store_prefix}:replica:{b.replica}"
    )
    time.sleep(1.5)  # b's renewal thread tries to take its lease back
    assert raw.get(f"{redis_store_prefix}:replica:{b.replica}") is None
    with pytest.raises(StoreUnavailable):
        b.write([creating(make_request("rb2"))])
    assert a.get_request("rb2") is None


def test_an_adopter_whose_own_lease_lapsed_takes_it_back(
    stores: tuple[RedisStore, RedisStore], raw: redis.Redis, redis_store_prefix: str
) -> None:
    """A lapse of the adopter's own lease (nobody adopted it) does not fence it: it adopts."""
    a, b = stores
    b.write([creating(make_request("rb"))])
    for _ in range(50):
        raw.delete(f"{redis_store_prefix}:replica:{b.replica}")
        if b.replica in a.shared_view([], []).lapsed:
            raw.delete(f"{redis_store_prefix}:replica:{a.replica}")  # a's own lapses too
            adopted = a.adopt(b.replica)
            if adopted:
                break
    else:
        pytest.fail("b was never seen lapsed")
    assert [r.id for r in adopted] == ["rb"]
    assert a.failure() is None
    assert raw.get(f"{redis_store_prefix}:replica:{a.replica}") is not None  # taken back
    a.write([creating(make_request("ra"))])


def test_a_creation_dispatched_in_its_batch_takes_no_queue_place(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """max_queued 1: two creations dispatched in the same batch both pass (neither waits)."""
    a, _ = stores
    r1, r2 = make_request("r1"), make_request("r2")
    batch = [creating(r1, max_queued=1), creating(r2, max_queued=1)]
    batch += [
        dispatching(r1, T0 + 1, ("g0", 100, 10_000)),
        dispatching(r2, T0 + 1, ("g1", 100, 10_000)),
    ]
    assert a.write(batch) == []
    assert {a.get_request("r1").status, a.get_request("r2").status} == {S.DISPATCHING}


# --- the stateful test ----------------------------------------------------------------------------

GPU_LIMIT = {"g0": 10_000, "g1": 7_000}
GPU_SLOTS = {"g0": 3, "g1": 2}
GPU_SETS = [("g0",), ("g1",), ("g0", "g1")]
SIZES = st.integers(1, 12).map(lambda n: n * 500)
RATE = 6
MAX_QUEUED = 3
MAX_CONCURRENT = 2
GPU_SECONDS_PER_HOUR = 90.0
# The hour a creation is checked against: lower than the dispatches', so that runs reach it.
CREATION_HOUR = 60.0
CHARGES = st.sampled_from([10.0, 25.0, 40.0])
USERS = ("alice", "bob")
KEYS = ("k1", "k2", "k3")
# Where a request goes from where it is (cancellations have a rule of their own).
ENDS = {
    S.DISPATCHING: [S.FAILED, S.QUEUED, S.EXPIRED],
    S.RUNNING: [S.SUCCEEDED, S.FAILED, S.QUEUED],
}
Move = tuple[Request, RequestStatus, Claim | None]


class SharedStoresMachine(RuleBasedStateMachine):
    """Two routers on one prefix; Redis is checked against the model after every step.

    - I2: no GPU's ledger holds more than its limit, and it holds exactly the reservations of
      the requests the model says hold one (dispatching or running with a confirmed claim);
    - I4: no user holds more than ``max_concurrent`` slots, nor was admitted more than the
      rate limit, nor charged more GPU-seconds in the hour than the limit (which the machine
      reaches: refusals happen), nor admitted once the hour is spent; a refused claim charges
      nothing;
    - every admitted request is stored once, as the model says; a refused one never is;
    - each router recovers its own unfinished requests, oldest first.

    A creation goes to either router; every later change to the one that created the request.
    """

    @initialize()
    def open(self) -> None:
        self.url = require_redis()
        self.prefix = redis_prefix()
        self.raw = redis.Redis.from_url(self.url, decode_responses=True)
        self.stores = [open_shared(self.url, self.prefix) for _ in range(2)]
        self.now = T0
        self.count = 0
        self.requests: dict[str, Request] = {}  # admitted, as stored
        self.owner: dict[str, int] = {}
        self.held: dict[str, dict[str, int]] = {}  # the reservations: id -> GPU -> MiB
        self.refused: set[str] = set()
        self.admitted: Counter[str] = Counter()
        self.keys: dict[tuple[str, str], str] = {}
        self.charged: dict[str, dict[str, float]] = {user: {} for user in USERS}  # id -> GPU-s
        self.charges_of: dict[
            str, float
        ] = {}  # request id -> what its last claim's dispatch charges

    def teardown(self) -> None:
        for store in getattr(self, "stores", []):
            store.close()
        if hasattr(self, "raw"):
            self.raw.close()
            drop_redis_prefix(self.url, self.prefix)

    # The model ----------------------------------------------------------------------------------

    def _with(self, *statuses: RequestStatus) -> list[Request]:
        return sorted(
            (r for r in self.requests.values() if r.status in statuses), key=lambda r: r.id
        )

    def _ledger(self, gpu: str, held: dict[str, dict[str, int]] | None = None) -> dict[str, int]:
        held = self.held if held is None else held
        return {rid: gpus[gpu] for rid, gpus in held.items() if gpu in gpus}

    def _slots(self, user: str, held: dict[str, dict[str, int]] | None = None) -> set[str]:
        held = self.held if held is None else held
        return {rid for rid in held if self.requests[rid].user == user}

    def _admission(self, request: Request) -> tuple[str, str | None] | None:
        """The refusal a creation earns, as (kind, existing id), or ``None``."""
        key = request.idempotency_key
        if key is not None and (request.user, key) in self.keys:
            return "idempotency_key", self.keys[request.user, key]
        if self.admitted[request.user] >= RATE:
            return "requests_per_minute", None
        if sum(r.user == request.user for r in self._with(S.QUEUED)) >= MAX_QUEUED:
            return "max_queued", None
        if sum(self.charged[request.user].values()) >= CREATION_HOUR:
            return "gpu_seconds_per_hour", None
        return None

    def _claims(self, moves: list[Move]) -> dict[str, str]:
        """The claims of a batch of moves refused (id -> kind): the ledger less what it frees."""
        freed = {r.id for r, to, claim in moves if not to.active or claim is not None}
        left = {rid: gpus for rid, gpus in self.held.items() if rid not in freed}
        used = {user: sum(charges.values()) for user, charges in self.charged.items()}
        refused: dict[str, str] = {}
        for request, _, claim in moves:
            if claim is None:
                continue
            if any(
                sum(self._ledger(gpu, left).values()) + mb > limit
                or len(self._ledger(gpu, left)) + 1 > slots
                for gpu, mb, limit, slots in claim.gpus
            ):
                refused[request.id] = "gpu_memory"
            elif (
                claim.max_concurrent is not None
                and len(self._slots(request.user, left)) >= claim.max_concurrent
            ):
                refused[request.id] = "max_concurrent"
            elif used[request.user] + self.charges_of[request.id] > GPU_SECONDS_PER_HOUR:
                refused[request.id] = "gpu_seconds_per_hour"
            else:
                left[request.id] = {gpu: mb for gpu, mb, _, _ in claim.gpus}
                used[request.user] += self.charges_of[request.id]
        return refused

    def _move(self, client: int, moves: list[Move]) -> None:
        """Write ``moves`` as one batch of ``client``; check its refusals; update the model."""
        expected = self._claims(moves)
        before = {gpu: self._ledger(gpu) for gpu in GPU_LIMIT}
        slots = {user: self._slots(user) for user in USERS}
        charged = {user: dict(charges) for user, charges in self.charged.items()}
        self.now += 1
        batch = []
        for r, to, claim in moves:
            charge = None
            if claim is not None:
                charge = Charge(r.user, f"{r.id}-{self.now:g}", self.now, self.charges_of[r.id])
            batch.append(replace(moved(r, to, self.now, charge=charge), claim=claim))
            if charge is not None and r.id not in expected:
                self.charged[r.user][charge.charge_id] = charge.gpu_seconds
        refusals = self.stores[client].write(batch)
        assert {f.request_id: f.kind for f in refusals} == expected
        for refusal in refusals:
            request = self.requests[refusal.request_id]
            if refusal.kind == "gpu_seconds_per_hour":
                # The hour as stored before the batch, and the batch's claims confirmed
                # before this one.
                assert refusal.charges is not None
                (hour,) = refusal.charges
                earlier = 0.0
                for r, _, claim in moves:
                    if r.id == request.id:
                        break
                    if claim is not None and r.user == request.user and r.id not in expected:
                        earlier += self.charges_of[r.id]
                stored_gs = sum(charged[request.user].values())
                assert hour.gpu_seconds == pytest.approx(stored_gs + earlier)
            elif refusal.kind == "gpu_memory":
                assert refusal.ledger is not None
                assert set(refusal.ledger) <= set(GPU_LIMIT)
                assert refusal.ledger == {gpu: before[gpu] for gpu in refusal.ledger}
            else:
                assert refusal.active == slots[request.user]
        for request, to, claim in moves:
            if not to.active or claim is not None:
                self.held.pop(request.id, None)
            if claim is not None and request.id not in expected:
                self.held[request.id] = {gpu: mb for gpu, mb, _, _ in claim.gpus}

    def _claim(self, data: st.DataObject, request: Request) -> Claim:
        """A claim for dispatching ``request``; what its dispatch charges is drawn with it."""
        gpus = data.draw(st.sampled_from(GPU_SETS))
        self.charges_of[request.id] = data.draw(CHARGES)
        return Claim(
            tuple((gpu, data.draw(SIZES), GPU_LIMIT[gpu], GPU_SLOTS[gpu]) for gpu in gpus),
            MAX_CONCURRENT,
            GPU_SECONDS_PER_HOUR,
        )

    def _pick(self, data: st.DataObject, among: list[Request]) -> Request:
        """One of ``among``, drawn by id (a failing case reads as ids)."""
        return self.requests[data.draw(st.sampled_from(sorted(r.id for r in among)))]

    def _owned_with(self, *statuses: RequestStatus) -> list[tuple[int, Request]]:
        return [(self.owner[r.id], r) for r in self._with(*statuses)]

    # The rules ----------------------------------------------------------------------------------

    @rule(client=st.sampled_from([0, 1]), user=st.sampled_from(USERS))
    def create(self, client: int, user: str) -> None:
        self._create(client, user, None)

    @rule(client=st.sampled_from([0, 1]), user=st.sampled_from(USERS), key=st.sampled_from(KEYS))
    def create_keyed(self, client: int, user: str, key: str) -> None:
        self._create(client, user, key)

    def _create(self, client: int, user: str, key: str | None) -> None:
        self.count += 1
        self.now += 1
        request = make_request(f"r{self.count:03d}", user=user, created_at=self.now, key=key)
        expected = self._admission(request)
        change = creating(
            request,
            requests_per_minute=RATE,
            max_queued=MAX_QUEUED,
            gpu_seconds_per_hour=CREATION_HOUR,
        )
        refusals = self.stores[client].write([change])
        if expected is None:
            assert refusals == []
            self.requests[request.id] = request
            self.owner[request.id] = client
            self.admitted[user] += 1
            if key is not None:
                self.keys[user, key] = request.id
            return
        refusal = only(refusals)
        assert (refusal.request_id, refusal.kind) == (request.id, expected[0])
        if refusal.kind == "idempotency_key":
            assert refusal.existing == expected[1]
        elif refusal.kind == "requests_per_minute":
            assert 0 < refusal.retry_after_s <= 60
        elif refusal.kind == "gpu_seconds_per_hour":
            assert refusal.creation and 0 < refusal.retry_after_s <= 3600
            (hour,) = refusal.charges or ()
            assert hour.gpu_seconds == pytest.approx(sum(self.charged[user].values()))
        self.refused.add(request.id)

    @precondition(lambda self: self._with(S.QUEUED))
    @rule(data=st.data())
    def dispatch(self, data: st.DataObject) -> None:
        request = self._pick(data, self._with(S.QUEUED))
        self._move(self.owner[request.id], [(request, S.DISPATCHING, self._claim(data, request))])

    def _two_queued(self) -> list[int]:
        """The routers with two queued requests or more."""
        counts = Counter(client for client, _ in self._owned_with(S.QUEUED))
        return sorted(client for client, n in counts.items() if n >= 2)

    @precondition(lambda self: self._two_queued())
    @rule(data=st.data())
    def dispatch_two(self, data: st.DataObject) -> None:
        """Two claims in one batch: the second counts what the first reserved."""
        client = data.draw(st.sampled_from(self._two_queued()))
        queued = [r for c, r in self._owned_with(S.QUEUED) if c == client]
        first = self._pick(data, queued)
        second = self._pick(data, [r for r in queued if r is not first])
        self._move(
            client,
            [
                (first, S.DISPATCHING, self._claim(data, first)),
                (second, S.DISPATCHING, self._claim(data, second)),
            ],
        )

    @precondition(lambda self: self._with(S.DISPATCHING))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        request = self._pick(data, self._with(S.DISPATCHING))
        self._move(self.owner[request.id], [(request, S.RUNNING, None)])

    @precondition(lambda self: self._with(S.DISPATCHING, S.RUNNING))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        """Succeed, fail, expire or requeue."""
        request = self._pick(data, self._with(S.DISPATCHING, S.RUNNING))
        to = data.draw(st.sampled_from(ENDS[request.status]))
        self._move(self.owner[request.id], [(request, to, None)])

    def _swappable(self) -> list[tuple[int, Request]]:
        """Running requests whose router has a queued one to dispatch in their place."""
        queuing = {client for client, _ in self._owned_with(S.QUEUED)}
        return [(c, r) for c, r in self._owned_with(S.RUNNING) if c in queuing]

    @precondition(lambda self: self._swappable())
    @rule(data=st.data())
    def end_and_dispatch(self, data: st.DataObject) -> None:
        """A request ends and another of its router is dispatched in one batch."""
        ending = self._pick(data, [r for _, r in self._swappable()])
        client = self.owner[ending.id]
        queued = [r for c, r in self._owned_with(S.QUEUED) if c == client]
        same_user = [r for r in queued if r.user == ending.user]
        following = self._pick(data, same_user or queued)
        to = data.draw(st.sampled_from(ENDS[S.RUNNING]))
        self._move(
            client, [(ending, to, None), (following, S.DISPATCHING, self._claim(data, following))]
        )

    @precondition(lambda self: self._with(S.QUEUED, S.DISPATCHING, S.RUNNING))
    @rule(data=st.data(), sender=st.sampled_from([0, 1]))
    def cancel(self, data: st.DataObject, sender: int) -> None:
        """Cancelled through its owner; from the other router, passed on to it first."""
        request = self._pick(data, self._with(S.QUEUED, S.DISPATCHING, S.RUNNING))
        owner = self.owner[request.id]
        if sender != owner:
            assert self.stores[sender].send_cancel(request.id, "admin") is True
            assert self.stores[sender].shared_view([], []).cancels == []
            assert self.stores[owner].shared_view([], []).cancels == [(request.id, "admin")]
        self._move(owner, [(request, S.CANCELLED, None)])

    @precondition(lambda self: any(r.status.terminal for r in self.requests.values()))
    @rule(data=st.data(), sender=st.sampled_from([0, 1]))
    def cancel_finished(self, data: st.DataObject, sender: int) -> None:
        request = self._pick(data, [r for r in self.requests.values() if r.status.terminal])
        assert self.stores[sender].send_cancel(request.id, "admin") is False

    # The invariants -----------------------------------------------------------------------------

    @invariant()
    def ledgers_hold_the_models_reservations_within_their_limits(self) -> None:
        if not hasattr(self, "stores"):
            return
        for gpu, limit in GPU_LIMIT.items():
            held = ledger(self.raw, self.prefix, gpu)
            assert sum(held.values()) <= limit  # I2
            assert len(held) <= GPU_SLOTS[gpu]
            assert held == self._ledger(gpu)
        view = self.stores[1].shared_view(list(GPU_LIMIT), list(USERS))
        assert view.ledger == {gpu: self._ledger(gpu) for gpu in GPU_LIMIT}
        assert view.active == {user: frozenset(self._slots(user)) for user in USERS}

    @invariant()
    def users_hold_their_slots_and_rates_within_their_limits(self) -> None:
        if not hasattr(self, "stores"):
            return
        for user in USERS:
            slots = self.raw.smembers(f"{self.prefix}:active:{user}")
            assert len(slots) <= MAX_CONCURRENT  # I4
            assert slots == self._slots(user)
            assert self.raw.zcard(f"{self.prefix}:rate:{user}") == self.admitted[user] <= RATE
            fields = self.raw.zrange(f"{self.prefix}:gsu:{user}", 0, -1)
            amounts = [float(self.raw.hget(f"{self.prefix}:charge_gs", f) or -1) for f in fields]
            assert sum(amounts) <= GPU_SECONDS_PER_HOUR
            total = self.raw.get(f"{self.prefix}:gst:{user}")
            assert float(total or 0) == pytest.approx(sum(amounts))
            assert dict(zip(fields, amounts, strict=True)) == {
                f'["{user}","{charge_id}"]': amount
                for charge_id, amount in self.charged[user].items()
            }
            waiting = {r.id for r in self._with(S.QUEUED) if r.user == user}
            assert self.raw.smembers(f"{self.prefix}:waiting:{user}") == waiting

    @invariant()
    def requests_are_stored_as_the_model_says(self) -> None:
        if not hasattr(self, "stores"):
            return
        assert self.raw.zcard(f"{self.prefix}:created") == len(self.requests)
        pipe = self.raw.pipeline(transaction=False)
        ids = sorted(self.requests)
        for rid in ids:
            pipe.hmget(f"{self.prefix}:req:{rid}", "status", "version")
            pipe.llen(f"{self.prefix}:trail:{rid}")
        for rid in sorted(self.refused):
            pipe.exists(f"{self.prefix}:req:{rid}", f"{self.prefix}:trail:{rid}")
        answers = pipe.execute()
        for i, rid in enumerate(ids):
            request = self.requests[rid]
            assert answers[2 * i] == [request.status.value, str(request.version)], rid
            assert answers[2 * i + 1] == request.version + 1, rid
        assert answers[2 * len(ids) :] == [0] * len(self.refused)
        queued = sorted(self._with(S.QUEUED), key=lambda r: (r.created_at, r.id))
        assert self.raw.zrange(f"{self.prefix}:queue", 0, -1) == [r.id for r in queued]
        for client, store in enumerate(self.stores):
            mine = sorted(
                (
                    r
                    for rid, r in self.requests.items()
                    if self.owner[rid] == client and not r.status.terminal
                ),
                key=lambda r: r.created_at,
            )
            assert [r.id for r in store.unfinished_requests()] == [r.id for r in mine]


@pytest.mark.usefixtures("redis_url")
def test_two_routers_sharing_a_prefix_keep_its_limits_and_ledgers() -> None:
    """Run the machine (see its docstring)."""
    run = SharedStoresMachine.TestCase
    # Every example reaches Redis: a shrink would run for minutes (Hypothesis gives it five),
    # past the suite's timeout; a failure is reported as found (the plain tests above pin
    # each rule on its own).
    run.settings = settings(
        max_examples=30,
        stateful_step_count=40,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    run().runTest()


class Gate:
    """A TCP forwarder to Redis that can be shut: then every connection through it is dropped.

    One router reaching Redis through it comes back from an outage later than another.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.shut = threading.Event()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close_gate(self) -> None:
        self.shut.set()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()  # each pipe's thread closes its sockets as it ends

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.shut.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()
        self.close_gate()


def test_after_an_outage_longer_than_the_lease_no_router_adopts_another(tmp_path: Path) -> None:
    """Redis down past the lease: every lease lapsed in it, and each router takes its own back.

    Router a reaches Redis again 1.5 s before router b (b's way to it stays shut): a finds b's
    lease lapsed, but a router that just came back adopts nobody for a lease, and b takes its
    own lease back meanwhile. Neither is fenced, neither loses its requests.
    """
    with RedisServer(tmp_path) as server:
        gate = Gate(server.port)
        a = RedisStore(server.url, prefix="p", shared=True, lease_s=1.5)
        b = RedisStore(f"redis://127.0.0.1:{gate.port}", prefix="p", shared=True, lease_s=1.5)
        try:
            a.write([created(make_request("ra"))])
            b.write([created(make_request("rb"))])
            gate.close_gate()
            server.kill()
            time.sleep(2.5)  # past the leases
            saw_b_lapsed = threading.Event()

            def poll() -> None:  # both views, polled as the runtimes poll them
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline:
                    for store in (a, b):
                        with contextlib.suppress(StoreUnavailable):
                            for router in store.shared_view([], []).lapsed:
                                store.adopt(router)
                    with contextlib.suppress(redis.RedisError):
                        if raw.hexists("p:replicas", b.replica) and not raw.exists(
                            f"p:replica:{b.replica}"
                        ):
                            saw_b_lapsed.set()
                    time.sleep(0.05)

            server.start()
            raw = redis.Redis.from_url(server.url)
            poller = threading.Thread(target=poll)
            poller.start()
            time.sleep(1.5)
            gate.shut.clear()  # b's way to Redis opens
            poller.join()
            raw.close()
            assert saw_b_lapsed.is_set()  # the window was there
            assert a.failure() is None and b.failure() is None
            assert [r.id for r in a.unfinished_requests()] == ["ra"]
            assert [r.id for r in b.unfinished_requests()] == ["rb"]
            a.write([created(make_request("ra2"))])  # neither is fenced
            b.write([created(make_request("rb2"))])
        finally:
            a.close()
            b.close()
            gate.close()

"""The state-store contract, run against every store: batches, reads, listing, quota history.

Each test runs once per store kind (``memory``, ``sqlite``, ``redis``: the real Redis of
``REDIS_URL``, each store under a prefix of its own) through the ``store`` fixture; the
hypothesis tests, which cannot take a function-scoped fixture, build a fresh store of their
``kind`` for every example with :func:`fresh_store`.

Changes are made as the core makes them (``changes.py``).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from changes import ESTIMATE, PLACEMENT, T0, add, created, make_request, moved
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_request_router.core.request_router import transition_of
from gpu_request_router.core.state_store import (
    RETENTION_BATCH,
    Change,
    Charge,
    OverrideChange,
    StateChange,
    decode_cursor,
    encode_cursor,
)
from gpu_request_router.exceptions import InvalidRequest
from gpu_request_router.models.request import ErrorInfo, Request, RequestStatus
from gpu_request_router.store import MemoryStore, RedisStore, RequestQuery, StateStore
from gpu_request_router.store.sqlite import SQLiteStore
from gpu_request_router.testing import (
    drop_redis_prefix,
    redis_prefix,
    redis_test_url,
    require_redis,
)

S = RequestStatus
KINDS = ["memory", "sqlite", "redis"]
# What a store raises for a batch the core could never hand over (a programming error).
REFUSED = (ValueError, sqlite3.IntegrityError)


def make_store(
    kind: str, directory: Path, prefix: str, retention_s: float | None = None
) -> StateStore:
    """A new, empty store of ``kind``: an SQLite one in ``directory``, a Redis one at ``prefix``."""
    if kind == "memory":
        return MemoryStore(retention_s=retention_s)
    if kind == "redis":
        require_redis()
        return RedisStore(redis_test_url(), prefix=prefix, retention_s=retention_s)
    return SQLiteStore(directory / "state.db", retention_s=retention_s)


@contextmanager
def fresh_store(kind: str, retention_s: float | None = None) -> Iterator[StateStore]:
    """A new, empty store of ``kind`` (its own directory or prefix), closed and dropped after."""
    prefix = redis_prefix()
    with tempfile.TemporaryDirectory() as directory:
        store = make_store(kind, Path(directory), prefix, retention_s)
        try:
            yield store
        finally:
            store.close()
            if kind == "redis":
                drop_redis_prefix(redis_test_url(), prefix)


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest) -> Iterator[StateStore]:
    """A new, empty store of each kind."""
    with fresh_store(request.param) as made:
        yield made


def stored(store: StateStore, request_id: str) -> Request:
    """The stored request, which must exist."""
    found = store.get_request(request_id)
    assert found is not None, request_id
    return found


def trail(store: StateStore, request_id: str) -> list[tuple[int, S | None, S]]:
    """The audit trail as (seq, from, to)."""
    return [(t.seq, t.from_status, t.to_status) for t in store.transitions(request_id)]


def all_pages(store: StateStore, query: RequestQuery) -> list[list[Request]]:
    """Follow next_cursor from the first page to the last."""
    pages = []
    cursor = None
    while True:
        page = store.list_requests(
            RequestQuery(
                user=query.user,
                statuses=query.statuses,
                model=query.model,
                priority=query.priority,
                limit=query.limit,
                cursor=cursor,
            )
        )
        pages.append(page.items)
        if page.next_cursor is None:
            return pages
        assert len(pages) < 10_000
        cursor = page.next_cursor


# --- creation and reads ------------------------------------------------------------------------


def test_a_created_request_comes_back_as_an_equal_copy(store: StateStore) -> None:
    """A stored request is read back with its fields, as a distinct object each time."""
    request = make_request("r1", key="k")
    add(store, request)
    first, second = stored(store, "r1"), stored(store, "r1")
    assert first is not request
    assert first is not second
    assert (first.id, first.user, first.status, first.version) == ("r1", "alice", S.QUEUED, 0)
    assert (first.created_at, first.idempotency_key, first.estimate) == (T0, "k", ESTIMATE)
    assert trail(store, "r1") == [(0, None, S.QUEUED)]


def test_changing_a_request_after_it_was_written_does_not_change_the_store(
    store: StateStore,
) -> None:
    """The caller's object, and a read copy, stay outside the store once written."""
    request = make_request("r1")
    add(store, request)
    request.transition(S.CANCELLED, T0 + 1)
    fetched = stored(store, "r1")
    fetched.transition(S.DISPATCHING, T0 + 2, placement=PLACEMENT)
    again = stored(store, "r1")
    assert (again.status, again.attempts, again.version) == (S.QUEUED, 0, 0)


def test_reads_of_unknown_requests_are_empty(store: StateStore) -> None:
    """An unknown id or key gives None, an unknown trail is empty."""
    assert store.get_request("nope") is None
    assert store.find_idempotent("alice", "nope") is None
    assert store.transitions("nope") == []


def test_later_changes_write_the_request_as_it_now_is(store: StateStore) -> None:
    """Each change replaces the stored row with the request it carries, and adds its entry."""
    request = add(store, make_request("r1"))
    store.write([moved(request, S.DISPATCHING, T0 + 1)])
    dispatched = stored(store, "r1")
    assert (dispatched.status, dispatched.attempts, dispatched.placement) == (
        S.DISPATCHING,
        1,
        PLACEMENT,
    )
    store.write([moved(request, S.QUEUED, T0 + 2, error=ErrorInfo("oom", "out of memory"))])
    requeued = stored(store, "r1")
    assert (requeued.status, requeued.attempts, requeued.version) == (S.QUEUED, 1, 2)
    assert requeued.error == ErrorInfo("oom", "out of memory")
    assert requeued.placement is None
    assert requeued.queued_at == T0 + 2
    entries = store.transitions("r1")
    assert [(t.seq, t.from_status, t.to_status) for t in entries] == [
        (0, None, S.QUEUED),
        (1, S.QUEUED, S.DISPATCHING),
        (2, S.DISPATCHING, S.QUEUED),
    ]
    assert entries[1].detail.startswith("on w:0")
    assert entries[2].detail == "oom: out of memory"
    assert [t.seq for t in store.transitions("r1", after=0)] == [1, 2]
    assert store.transitions("r1", after=2) == []


# --- batches ------------------------------------------------------------------------------------


def test_a_creation_and_later_changes_in_one_batch_leave_one_row_in_its_final_state(
    store: StateStore,
) -> None:
    """Coalescing: one row as the last change left it, and every audit entry in order."""
    request = make_request("r1", key="k")
    batch = [
        created(request),
        moved(request, S.DISPATCHING, T0 + 1),
        moved(request, S.RUNNING, T0 + 2),
    ]
    store.write(batch)
    row = stored(store, "r1")
    assert (row.status, row.attempts, row.version, row.started_at) == (S.RUNNING, 1, 2, T0 + 2)
    assert trail(store, "r1") == [
        (0, None, S.QUEUED),
        (1, S.QUEUED, S.DISPATCHING),
        (2, S.DISPATCHING, S.RUNNING),
    ]
    assert [r.id for r in store.list_requests(RequestQuery()).items] == ["r1"]
    assert [(r.id, r.status) for r in store.unfinished_requests()] == [("r1", S.RUNNING)]
    found = store.find_idempotent("alice", "k")
    assert found is not None
    assert found.status is S.RUNNING


def test_a_request_created_and_finished_in_one_batch_is_not_unfinished(
    store: StateStore,
) -> None:
    """A creation coalesced with its end is stored terminal and never recovered."""
    request = make_request("r1")
    store.write([created(request), moved(request, S.CANCELLED, T0 + 1)])
    assert stored(store, "r1").status is S.CANCELLED
    assert store.unfinished_requests() == []
    assert trail(store, "r1") == [(0, None, S.QUEUED), (1, S.QUEUED, S.CANCELLED)]


def test_changes_of_a_stored_request_in_one_batch_end_as_the_last_left_it(
    store: StateStore,
) -> None:
    """Several updates of one request in a batch: the last snapshot wins, all entries kept."""
    request = add(store, make_request("r1"))
    store.write(
        [
            moved(request, S.DISPATCHING, T0 + 1),
            moved(request, S.QUEUED, T0 + 2),
            moved(request, S.DISPATCHING, T0 + 3),
        ]
    )
    row = stored(store, "r1")
    assert (row.status, row.attempts, row.version, row.dispatched_at) == (
        S.DISPATCHING,
        2,
        3,
        T0 + 3,
    )
    assert [seq for seq, _, _ in trail(store, "r1")] == [0, 1, 2, 3]


def test_one_batch_holds_many_requests_and_overrides(store: StateStore) -> None:
    """Requests of several users, their changes and overrides all land from one write."""
    ann, bob = make_request("a1", user="ann"), make_request("b1", user="bob", created_at=T0 + 1)
    bob_old = add(store, make_request("b0", user="bob", created_at=T0 - 1))
    store.write(
        [
            created(ann),
            OverrideChange("ann", {"max_concurrent": 2}),
            created(bob),
            moved(bob_old, S.CANCELLED, T0 + 2),
            moved(ann, S.DISPATCHING, T0 + 3, charge=Charge("ann", "exe_a1_1", T0 + 3, 7.0)),
        ]
    )
    assert [(r.id, r.status) for r in store.unfinished_requests()] == [
        ("a1", S.DISPATCHING),
        ("b1", S.QUEUED),
    ]
    assert stored(store, "b0").status is S.CANCELLED
    assert store.quota_overrides() == {"ann": {"max_concurrent": 2}}
    history = store.quota_history(T0 + 4, 60.0, 3600.0)
    assert sorted(history.admissions) == [
        ("ann", T0, "a1"),
        ("bob", T0 - 1, "b0"),
        ("bob", T0 + 1, "b1"),
    ]
    assert history.charges == [Charge("ann", "exe_a1_1", T0 + 3, 7.0)]


def test_an_empty_batch_writes_nothing(store: StateStore) -> None:
    """Nothing to persist is no error."""
    store.write([])
    assert store.list_requests(RequestQuery()).items == []


def snapshot(store: StateStore) -> object:
    """What a reader can see of the store, to compare before and after a refused batch."""
    history = store.quota_history(T0 + 10, 60.0, 3600.0)
    return (
        [
            (r.id, r.status, r.version, r.attempts, tuple(trail(store, r.id)))
            for r in store.list_requests(RequestQuery(limit=1000)).items
        ],
        [r.id for r in store.unfinished_requests()],
        sorted(history.admissions),
        sorted(history.charges, key=lambda c: c.charge_id),
        store.quota_overrides(),
        [(r.id, r.status) for r in [store.find_idempotent("alice", "k")] if r is not None],
    )


def batch_before_a_failure(store: StateStore) -> tuple[Request, list[Change]]:
    """A stored request and a batch of every kind of change that would all be written.

    The test appends the change that fails.
    """
    old = add(store, make_request("old", created_at=T0 - 1))
    fresh = make_request("new", key="k")
    return old, [
        created(fresh),
        moved(fresh, S.DISPATCHING, T0 + 1, charge=Charge("alice", "exe_new_1", T0 + 1, 3.0)),
        moved(old, S.CANCELLED, T0 + 2),
        OverrideChange("alice", {"max_queued": 1}),
    ]


def test_a_duplicate_creation_refuses_the_whole_batch(store: StateStore) -> None:
    """A batch whose last change creates a stored request again writes none of its changes."""
    _, batch = batch_before_a_failure(store)
    before = snapshot(store)
    with pytest.raises(REFUSED):
        store.write([*batch, created(make_request("old", user="bob"))])
    assert snapshot(store) == before
    assert store.get_request("new") is None
    assert stored(store, "old").user == "alice"


def test_a_change_of_a_request_never_created_refuses_the_whole_batch(store: StateStore) -> None:
    """An update of an unknown request (with no creation before it) writes nothing at all."""
    _, batch = batch_before_a_failure(store)
    ghost = make_request("ghost")
    before = snapshot(store)
    with pytest.raises(REFUSED):
        store.write([*batch, moved(ghost, S.CANCELLED, T0 + 3)])
    assert snapshot(store) == before
    assert store.get_request("ghost") is None
    assert store.transitions("ghost") == []


def test_a_request_created_twice_in_one_batch_refuses_the_batch(store: StateStore) -> None:
    """Two creations of one id in a batch are a programming error: nothing is written."""
    _, batch = batch_before_a_failure(store)
    before = snapshot(store)
    twin = make_request("twin")
    with pytest.raises(REFUSED):
        store.write([*batch, created(twin), created(make_request("twin", user="bob"))])
    assert snapshot(store) == before
    assert store.get_request("twin") is None


def test_a_second_request_under_a_taken_idempotency_key_refuses_the_batch(
    store: StateStore,
) -> None:
    """The key's request stays the one found: a clashing creation writes nothing."""
    add(store, make_request("first", key="k"))
    before = snapshot(store)
    with pytest.raises(REFUSED):
        store.write([created(make_request("other")), created(make_request("second", key="k"))])
    assert snapshot(store) == before
    assert store.get_request("other") is None
    found = store.find_idempotent("alice", "k")
    assert found is not None
    assert found.id == "first"


@pytest.mark.parametrize("amount", [float("inf"), float("nan"), -1.0])
def test_a_charge_no_window_could_hold_refuses_the_whole_batch(
    store: StateStore, amount: float
) -> None:
    """A negative, infinite or NaN charge raises ValueError; none of the batch is written."""
    old, batch = batch_before_a_failure(store)
    before = snapshot(store)
    bad = make_request("bad", created_at=T0 + 3)
    with pytest.raises(ValueError, match="GPU-seconds"):
        store.write(
            [
                *batch,
                created(bad),
                moved(bad, S.DISPATCHING, T0 + 4, charge=Charge("alice", "exe_bad", T0, amount)),
            ]
        )
    assert snapshot(store) == before
    assert stored(store, "old").status is S.QUEUED
    assert old.status is S.CANCELLED  # the caller's object moved; the store did not


def test_a_refused_batch_leaves_the_store_writable(store: StateStore) -> None:
    """After a refused batch, the same good changes can be written."""
    _, batch = batch_before_a_failure(store)
    with pytest.raises(REFUSED):
        store.write([*batch, created(make_request("old"))])
    store.write(batch)
    assert stored(store, "new").status is S.DISPATCHING
    assert stored(store, "old").status is S.CANCELLED
    assert store.quota_overrides() == {"alice": {"max_queued": 1}}


# --- idempotency keys ---------------------------------------------------------------------------


def test_idempotency_keys_are_per_user(store: StateStore) -> None:
    """Bob's "k" is not alice's; a user without the key finds nothing."""
    add(store, make_request("r1", key="k"))
    add(store, make_request("r2", user="bob", key="k"))
    alices, bobs = store.find_idempotent("alice", "k"), store.find_idempotent("bob", "k")
    assert (alices and alices.id, bobs and bobs.id) == ("r1", "r2")
    assert store.find_idempotent("carol", "k") is None
    assert store.find_idempotent("alice", "other") is None


def test_idempotent_lookup_sees_the_latest_state(store: StateStore) -> None:
    """The request found by key reflects the changes written since it was created."""
    request = add(store, make_request("r1", key="k"))
    store.write([moved(request, S.CANCELLED, T0 + 1)])
    found = store.find_idempotent("alice", "k")
    assert found is not None
    assert (found.id, found.status) == ("r1", S.CANCELLED)


def test_requests_without_a_key_are_not_found_by_key(store: StateStore) -> None:
    """Requests with no key are all stored and none is found under any key."""
    add(store, make_request("r1"))
    add(store, make_request("r2"))
    assert stored(store, "r1").idempotency_key is None
    assert stored(store, "r2").idempotency_key is None
    assert store.find_idempotent("alice", "") is None


# --- unfinished requests ------------------------------------------------------------------------


def test_unfinished_requests_oldest_first_without_terminal_ones(store: StateStore) -> None:
    """Recovery sees every unfinished request in its current status, and none that finished."""
    requests = [add(store, make_request(f"r{i}", created_at=T0 + i)) for i in range(5)]
    store.write([moved(requests[2], S.CANCELLED, T0 + 10)])
    store.write([moved(requests[3], S.DISPATCHING, T0 + 10)])
    unfinished = store.unfinished_requests()
    assert [r.id for r in unfinished] == ["r0", "r1", "r3", "r4"]
    assert unfinished[2].status is S.DISPATCHING


def test_unfinished_requests_are_ordered_by_creation_not_insertion(store: StateStore) -> None:
    """Oldest first means by creation time, even when written out of order; ties as written."""
    add(store, make_request("late", created_at=T0 + 50))
    store.write(
        [created(make_request("b", created_at=T0)), created(make_request("a", created_at=T0))]
    )
    add(store, make_request("middle", created_at=T0 + 20))
    assert [r.id for r in store.unfinished_requests()] == ["b", "a", "middle", "late"]


def test_a_request_created_terminal_is_not_unfinished(store: StateStore) -> None:
    """A request stored already terminal never shows up for recovery."""
    request = make_request("done")
    request.transition(S.CANCELLED, T0 + 1)
    store.write([StateChange(request.snapshot(), transition_of(request, None, "alice", T0))])
    assert store.unfinished_requests() == []
    assert stored(store, "done").status is S.CANCELLED


# --- quota history -------------------------------------------------------------------------------


def test_each_creation_records_its_admission_at_the_creation_time(store: StateStore) -> None:
    """Admissions are (user, created_at, request id), one per creation, none per update."""
    first = add(store, make_request("r1", created_at=T0))
    add(store, make_request("r2", user="bob", created_at=T0 + 5))
    store.write([moved(first, S.CANCELLED, T0 + 6)])
    history = store.quota_history(T0 + 10, 60.0, 3600.0)
    assert sorted(history.admissions) == [("alice", T0, "r1"), ("bob", T0 + 5, "r2")]
    assert history.charges == []


def test_quota_history_keeps_what_is_still_in_each_window(store: StateStore) -> None:
    """An entry is in a window ending ``now`` while its time is after ``now - window``."""
    request = add(store, make_request("r1", created_at=T0))
    add(store, make_request("r2", created_at=T0 + 30))
    store.write(
        [
            moved(request, S.DISPATCHING, T0, charge=Charge("alice", "c_old", T0 - 100, 1.0)),
            moved(request, S.QUEUED, T0 + 1, charge=Charge("alice", "c_new", T0 + 20, 2.0)),
        ]
    )
    history = store.quota_history(T0 + 59, 60.0, 3600.0)
    assert sorted(a[2] for a in history.admissions) == ["r1", "r2"]
    assert sorted(c.charge_id for c in history.charges) == ["c_new", "c_old"]
    history = store.quota_history(T0 + 60, 60.0, 3600.0)  # r1's admission is exactly 60 s old
    assert [a[2] for a in history.admissions] == ["r2"]
    history = store.quota_history(T0 + 3499, 60.0, 3600.0)
    assert history.admissions == []
    assert sorted(c.charge_id for c in history.charges) == ["c_new", "c_old"]
    history = store.quota_history(T0 + 3500, 60.0, 3600.0)  # c_old exactly 3600 s old
    assert [c.charge_id for c in history.charges] == ["c_new"]
    history = store.quota_history(T0 + 20 + 3600, 60.0, 3600.0)
    assert history.charges == []


def test_charging_the_same_id_again_replaces_the_amount_and_keeps_its_time(
    store: StateStore,
) -> None:
    """A reconciled charge settles the first: one charge, the new amount, the first time."""
    request = add(store, make_request("r1"))
    store.write([moved(request, S.DISPATCHING, T0 + 1, charge=Charge("alice", "exe", T0, 100.0))])
    store.write([moved(request, S.RUNNING, T0 + 2)])
    store.write([moved(request, S.SUCCEEDED, T0 + 9, charge=Charge("alice", "exe", T0 + 9, 8.5))])
    assert store.quota_history(T0 + 10, 60.0, 3600.0).charges == [Charge("alice", "exe", T0, 8.5)]


def test_charges_replaced_within_one_batch_keep_the_last_amount(store: StateStore) -> None:
    """A charge and its reconciliation in one batch: one charge, the last amount, first time."""
    request = add(store, make_request("r1"))
    store.write(
        [
            moved(request, S.DISPATCHING, T0 + 1, charge=Charge("alice", "exe", T0 + 1, 50.0)),
            moved(request, S.RUNNING, T0 + 2),
            moved(request, S.SUCCEEDED, T0 + 4, charge=Charge("alice", "exe", T0 + 4, 3.0)),
        ]
    )
    assert store.quota_history(T0 + 5, 60.0, 3600.0).charges == [
        Charge("alice", "exe", T0 + 1, 3.0)
    ]


def test_charges_are_per_user_and_id(store: StateStore) -> None:
    """The same charge id of two users is two charges."""
    ann, bob = add(store, make_request("a", user="ann")), add(store, make_request("b", user="bob"))
    store.write(
        [
            moved(ann, S.DISPATCHING, T0 + 1, charge=Charge("ann", "exe", T0 + 1, 1.0)),
            moved(bob, S.DISPATCHING, T0 + 1, charge=Charge("bob", "exe", T0 + 1, 2.0)),
        ]
    )
    charges = store.quota_history(T0 + 2, 60.0, 3600.0).charges
    assert sorted(charges, key=lambda c: c.user) == [
        Charge("ann", "exe", T0 + 1, 1.0),
        Charge("bob", "exe", T0 + 1, 2.0),
    ]


# --- quota overrides -----------------------------------------------------------------------------


def test_quota_overrides_are_set_replaced_and_removed_per_user(store: StateStore) -> None:
    """Setting replaces a user's override whole; ``{}`` removes it; others are untouched."""
    store.write([OverrideChange("ann", {"max_concurrent": 2})])
    store.write([OverrideChange("bob", {"max_queued": None})])
    store.write([OverrideChange("ann", {"requests_per_minute": 5})])
    assert store.quota_overrides() == {
        "ann": {"requests_per_minute": 5},
        "bob": {"max_queued": None},
    }
    store.write([OverrideChange("ann", {}), OverrideChange("carol", {})])
    assert store.quota_overrides() == {"bob": {"max_queued": None}}


def test_overrides_in_one_batch_apply_in_order(store: StateStore) -> None:
    """The last override of a user in a batch is the one kept."""
    store.write(
        [
            OverrideChange("ann", {"max_concurrent": 1}),
            OverrideChange("ann", {}),
            OverrideChange("bob", {"max_concurrent": 1}),
            OverrideChange("bob", {"max_concurrent": 3}),
        ]
    )
    assert store.quota_overrides() == {"bob": {"max_concurrent": 3}}


def test_a_returned_override_is_a_copy(store: StateStore) -> None:
    """Changing the answer or the written dict leaves the stored override alone."""
    values = {"max_concurrent": 2}
    store.write([OverrideChange("ann", values)])
    values["max_concurrent"] = 9
    store.quota_overrides()["ann"]["max_concurrent"] = 7
    assert store.quota_overrides() == {"ann": {"max_concurrent": 2}}


# --- listing ------------------------------------------------------------------------------------


def test_list_is_newest_first_with_ties_by_id(store: StateStore) -> None:
    """Requests list newest first; equal creation times order by id, descending."""
    for rid, at in [("a", T0), ("b", T0 + 1), ("c", T0), ("d", T0 + 2)]:
        add(store, make_request(rid, created_at=at))
    assert [r.id for r in store.list_requests(RequestQuery()).items] == ["d", "b", "c", "a"]


def test_list_filters_by_user_status_model_and_priority(store: StateStore) -> None:
    """Each filter narrows the listing; the status filter sees the current status."""
    add(store, make_request("r1", user="bob", model="m2"))
    done = add(store, make_request("r2", created_at=T0 + 1, priority="high"))
    add(store, make_request("r3", created_at=T0 + 2))
    store.write([moved(done, S.CANCELLED, T0 + 3)])

    def ids(**filters: object) -> list[str]:
        return [r.id for r in store.list_requests(RequestQuery(**filters)).items]  # type: ignore[arg-type]

    assert ids(user="bob") == ["r1"]
    assert ids(statuses=frozenset({S.CANCELLED})) == ["r2"]
    assert ids(statuses=frozenset({S.QUEUED})) == ["r3", "r1"]
    assert ids(statuses=frozenset()) == []
    assert ids(model="m2") == ["r1"]
    assert ids(priority="high") == ["r2"]
    assert ids(user="alice", statuses=frozenset({S.QUEUED})) == ["r3"]


def test_pages_follow_the_cursor(store: StateStore) -> None:
    """A full page carries the cursor of the next; the last one carries none."""
    for index in range(4):
        add(store, make_request(f"r{index}", created_at=T0 + index))
    first = store.list_requests(RequestQuery(limit=2))
    assert [r.id for r in first.items] == ["r3", "r2"]
    assert first.next_cursor is not None
    second = store.list_requests(RequestQuery(limit=2, cursor=first.next_cursor))
    assert [r.id for r in second.items] == ["r1", "r0"]
    assert second.next_cursor is None


def test_listed_requests_are_copies(store: StateStore) -> None:
    """Changing a listed request leaves the store as it was."""
    add(store, make_request("r1"))
    (listed,) = store.list_requests(RequestQuery()).items
    listed.transition(S.CANCELLED, T0 + 1)
    assert stored(store, "r1").status is S.QUEUED


_request_rows = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=20),
        st.sampled_from(["alice", "bob"]),
        st.sampled_from(["m1", "m2"]),
        st.sampled_from(["high", "normal"]),
        st.booleans(),
    ),
    max_size=40,
)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=100, deadline=None)
@given(
    rows=_request_rows,
    limit=st.integers(min_value=1, max_value=7),
    batch=st.integers(min_value=1, max_value=5),
    user=st.sampled_from([None, "alice", "bob"]),
    model=st.sampled_from([None, "m1", "m2"]),
    priority=st.sampled_from([None, "high"]),
    only_cancelled=st.sampled_from([None, True, False]),
)
def test_pagination_has_no_duplicates_or_gaps(
    kind: str,
    rows: list[tuple[int, str, str, str, bool]],
    limit: int,
    batch: int,
    user: str | None,
    model: str | None,
    priority: str | None,
    only_cancelled: bool | None,
) -> None:
    """Concatenated pages equal the filtered requests, newest first, whatever the page size.

    The requests are written ``batch`` at a time, a cancelled one coalesced with its creation.
    """
    statuses = None
    if only_cancelled is not None:
        statuses = frozenset({S.CANCELLED} if only_cancelled else {S.QUEUED})
    query = RequestQuery(user=user, model=model, priority=priority, statuses=statuses, limit=limit)
    changes: list[Change] = []
    for index, (at, owner, model_name, prio, cancel) in enumerate(rows):
        request = make_request(
            f"r{index:03d}", user=owner, created_at=float(at), model=model_name, priority=prio
        )
        changes.append(created(request))
        if cancel:
            changes.append(moved(request, S.CANCELLED, at + 1.0))
    with fresh_store(kind) as store:
        for start in range(0, len(changes), batch):
            store.write(changes[start : start + batch])
        pages = all_pages(store, query)
    listed = [r.id for page in pages for r in page]
    expected = sorted(
        (
            (float(at), f"r{index:03d}")
            for index, (at, owner, model_name, prio, cancel) in enumerate(rows)
            if (user is None or owner == user)
            and (model is None or model_name == model)
            and (priority is None or prio == priority)
            and (only_cancelled is None or cancel == only_cancelled)
        ),
        reverse=True,
    )
    assert listed == [rid for _, rid in expected]
    assert all(len(page) <= limit for page in pages)
    assert all(pages[:-1])  # only the last page may be short or empty


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "bm90IGpzb24",  # "not json"
        base64.urlsafe_b64encode(b'["x", "r1"]').decode(),
        base64.urlsafe_b64encode(b"[1.0, 2]").decode(),
        base64.urlsafe_b64encode(b"[1.0]").decode(),
        base64.urlsafe_b64encode(b'[1.0, "r1", 3]').decode(),
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),
        base64.urlsafe_b64encode(b"42").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "=",
    ],
)
def test_a_tampered_cursor_is_an_invalid_request(store: StateStore, cursor: str) -> None:
    """A cursor not made by the store is a 400 on the query parameter ``cursor``."""
    add(store, make_request("r1"))
    with pytest.raises(InvalidRequest) as info:
        store.list_requests(RequestQuery(cursor=cursor))
    assert (info.value.field, info.value.location) == ("cursor", "query")
    assert info.value.message == "cursor: not a cursor returned by a previous page"


def test_cursor_round_trips() -> None:
    """decode_cursor gives back the position encode_cursor was made from."""
    request = make_request("r-1", created_at=1234.5)
    assert decode_cursor(encode_cursor(request)) == (1234.5, "r-1")
    assert json.loads(base64.urlsafe_b64decode(encode_cursor(request) + "==")) == [1234.5, "r-1"]


@pytest.mark.parametrize("limit", [0, -1])
def test_a_page_size_below_one_is_an_invalid_request(limit: int) -> None:
    """A listing must ask for at least one request per page; one is enough."""
    with pytest.raises(InvalidRequest) as info:
        RequestQuery(limit=limit)
    assert (info.value.field, info.value.location) == ("limit", "query")
    assert info.value.message == "limit: a page holds at least one request"
    assert RequestQuery(limit=1).limit == 1


# --- retention -----------------------------------------------------------------------------------

RETAIN_S = 100.0


def finished(store: StateStore, rid: str, created_at: float, key: str | None = None) -> None:
    """Write a request created at ``created_at`` and cancelled a second later."""
    request = make_request(rid, created_at=created_at, key=key)
    store.write([created(request), moved(request, S.CANCELLED, created_at + 1)])


@pytest.mark.parametrize("kind", KINDS)
def test_finished_requests_past_retention_go_with_their_trail_and_key(kind: str) -> None:
    """Past ``retention_s`` (by creation), a finished request leaves every read; its key is free.

    Unfinished and younger ones stay.
    """
    with fresh_store(kind, retention_s=RETAIN_S) as store:
        finished(store, "old", T0, key="k1")
        running = add(store, make_request("old-running", created_at=T0))
        store.write([moved(running, S.DISPATCHING, T0 + 2)])
        finished(store, "young", T0 + 50)
        add(store, make_request("later", created_at=T0 + RETAIN_S + 31))  # a write: it prunes
        assert store.get_request("old") is None
        assert store.transitions("old") == []
        assert store.find_idempotent("alice", "k1") is None
        listed = [r.id for page in all_pages(store, RequestQuery(limit=2)) for r in page]
        assert sorted(listed) == ["later", "old-running", "young"]
        assert [r.id for r in store.unfinished_requests()] == ["old-running", "later"]
        add(store, make_request("again", created_at=T0 + RETAIN_S + 32, key="k1"))
        assert store.find_idempotent("alice", "k1").id == "again"  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", KINDS)
def test_without_retention_finished_requests_stay(kind: str) -> None:
    """The default keeps every request, however old."""
    with fresh_store(kind) as store:
        finished(store, "old", T0, key="k1")
        add(store, make_request("much-later", created_at=T0 + 10 * 365 * 86_400))
        assert store.get_request("old") is not None
        assert store.find_idempotent("alice", "k1") is not None


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_batch_of_old_requests_is_pruned_again_by_the_next_write(kind: str) -> None:
    """One prune deletes at most RETENTION_BATCH; the next write goes on, not 30 s later."""
    with fresh_store(kind, retention_s=RETAIN_S) as store:
        changes: list[Change] = []
        for index in range(RETENTION_BATCH + 1):
            request = make_request(f"r{index:05d}", created_at=T0 + index * 1e-3)
            changes += [created(request), moved(request, S.CANCELLED, T0 + 5)]
        store.write(changes)
        add(store, make_request("a", created_at=T0 + RETAIN_S + 40))
        assert [store.get_request(f"r{i:05d}") is None for i in (0, RETENTION_BATCH)] == [
            True,
            False,
        ]
        add(store, make_request("b", created_at=T0 + RETAIN_S + 41))
        assert store.get_request(f"r{RETENTION_BATCH:05d}") is None


# --- health --------------------------------------------------------------------------------------


def test_a_working_store_answers_ping_and_takes_writes(store: StateStore) -> None:
    """Ping and check_writable return quietly on a store that works."""
    store.ping()
    store.check_writable(T0)
    add(store, make_request("r1"))
    store.check_writable(T0 + 5)

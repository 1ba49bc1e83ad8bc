"""The state-store contract, run against every store: requests, listing, reservations, quotas.

Each test runs once per store kind (``memory``, ``sqlite``) through the ``store`` fixture; the
hypothesis tests, which cannot take a function-scoped fixture, build a fresh store of their
``kind`` for every example with :func:`fresh_store`.
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from counters import admit, charge
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_request_router.core.request_router import transition_of
from gpu_request_router.core.state_store import Charge, RateAdmission, decode_cursor, encode_cursor
from gpu_request_router.exceptions import InvalidRequest
from gpu_request_router.models.request import (
    Estimate,
    Placement,
    Request,
    RequestStatus,
    Task,
)
from gpu_request_router.store import MemoryStore, RequestQuery, StateStore
from gpu_request_router.store.sqlite import SQLiteStore

S = RequestStatus
T0 = 1000.0
EPOCH = 1_700_000_000.0
PLACEMENT = Placement("w", ("w:0",))
ESTIMATE = Estimate(
    gpu_memory_mb=1000, weights_mb=500, kv_cache_mb=500, activations_mb=0, duration_s={}
)
KINDS = ["memory", "sqlite"]


def make_store(kind: str, directory: Path) -> StateStore:
    """A new, empty store of ``kind``; an SQLite one keeps its file in ``directory``."""
    if kind == "memory":
        return MemoryStore()
    return SQLiteStore(directory / "state.db")


@contextmanager
def fresh_store(kind: str) -> Iterator[StateStore]:
    """A new, empty store of ``kind`` in its own temporary directory, closed afterwards."""
    with tempfile.TemporaryDirectory() as directory:
        store = make_store(kind, Path(directory))
        try:
            yield store
        finally:
            store.close()


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """A new, empty store of each kind."""
    made = make_store(request.param, tmp_path)
    yield made
    made.close()


def add(store: StateStore, request: Request) -> Request:
    """Store a new request with its creation entry, as the receiver does."""
    return store.add_request(
        request, transition_of(request, None, request.user, request.created_at)
    )


def move(store: StateStore, request: Request, from_status: RequestStatus, attempt: int) -> bool:
    """Write a changed request with its audit entry, as the router does."""
    return store.transition(
        request, from_status, attempt, transition_of(request, from_status, "router", T0)
    )


def make_request(
    rid: str,
    *,
    user: str = "alice",
    created_at: float = T0,
    model: str = "llama-3-8b",
    priority: str = "normal",
    key: str | None = None,
) -> Request:
    """A queued request."""
    return Request(
        id=rid,
        user=user,
        model=model,
        task=Task.CHAT,
        priority=priority,
        estimate=ESTIMATE,
        created_at=created_at,
        idempotency_key=key,
    )


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


# --- add and get -------------------------------------------------------------------------------


def test_add_then_get_returns_an_equal_copy(store: StateStore) -> None:
    """A stored request comes back equal but as a distinct object."""
    request = make_request("r1")
    returned = add(store, request)
    fetched = store.get_request("r1")
    assert fetched is not None
    assert fetched is not request
    assert returned is not request
    assert (fetched.id, fetched.status, fetched.version) == ("r1", S.QUEUED, 0)


def test_changing_a_returned_request_does_not_change_the_store(store: StateStore) -> None:
    """Transitions on the caller's object, the returned copy or a fetched copy stay outside."""
    request = make_request("r1")
    returned = add(store, request)
    request.transition(S.CANCELLED, T0 + 1)
    returned.transition(S.EXPIRED, T0 + 1)
    fetched = store.get_request("r1")
    assert fetched is not None
    fetched.transition(S.DISPATCHING, T0 + 2, placement=PLACEMENT)
    again = store.get_request("r1")
    assert again is not None
    assert again.status is S.QUEUED
    assert again.attempts == 0


def test_get_unknown_is_none(store: StateStore) -> None:
    """An unknown id gives None."""
    assert store.get_request("nope") is None


def test_same_user_and_key_returns_the_stored_request(store: StateStore) -> None:
    """A second add with the same user and idempotency key returns the first, storing nothing."""
    first = add(store, make_request("r1", key="k", created_at=T0))
    second = add(store, make_request("r2", key="k", created_at=T0 + 5))
    assert second.id == first.id == "r1"
    assert store.get_request("r2") is None
    found = store.find_idempotent("alice", "k")
    assert found is not None
    assert found.id == "r1"


def test_another_user_may_reuse_the_key(store: StateStore) -> None:
    """Idempotency keys are per user: bob's "k" is not alice's."""
    add(store, make_request("r1", key="k"))
    bobs = add(store, make_request("r2", user="bob", key="k"))
    assert bobs.id == "r2"
    found = store.find_idempotent("bob", "k")
    assert found is not None
    assert found.id == "r2"
    assert store.find_idempotent("carol", "k") is None


def test_idempotent_lookup_sees_the_latest_state(store: StateStore) -> None:
    """The request found by key reflects transitions written since it was added."""
    request = add(store, make_request("r1", key="k"))
    request.transition(S.CANCELLED, T0 + 1)
    assert move(store, request, S.QUEUED, 0)
    again = add(store, make_request("r9", key="k"))
    assert again.status is S.CANCELLED


def test_requests_without_a_key_are_all_stored(store: StateStore) -> None:
    """Without an idempotency key every add stores a new request."""
    add(store, make_request("r1"))
    add(store, make_request("r2"))
    assert store.get_request("r1") is not None
    assert store.get_request("r2") is not None


# --- guarded transitions -----------------------------------------------------------------------


def test_transition_with_the_seen_status_and_attempt_is_written(store: StateStore) -> None:
    """A write guarded by the stored status and attempt succeeds and is visible."""
    request = add(store, make_request("r1"))
    request.transition(S.DISPATCHING, T0 + 1, placement=PLACEMENT)
    assert move(store, request, S.QUEUED, 0)
    stored = store.get_request("r1")
    assert stored is not None
    assert stored.status is S.DISPATCHING
    assert stored.attempts == 1
    assert stored.placement == PLACEMENT


def test_a_charge_rides_with_the_transition_that_carries_it(store: StateStore) -> None:
    """The charge is written with the status change, and only when the change is."""
    request = add(store, make_request("r1"))
    claim = request.snapshot()
    claim.transition(S.DISPATCHING, T0 + 1, placement=PLACEMENT)
    change = transition_of(claim, S.QUEUED, "router", T0 + 1)
    assert store.transition(claim, S.QUEUED, 0, change, Charge("alice", "exe_1", T0, 30.0))
    assert store.gpu_seconds_in_window("alice", T0 + 2, 3600.0) == 30.0
    stale = request.snapshot()  # still thinks the request is queued
    stale.transition(S.CANCELLED, T0 + 2)
    lost = transition_of(stale, S.QUEUED, "router", T0 + 2)
    assert not store.transition(stale, S.QUEUED, 0, lost, Charge("alice", "exe_2", T0, 99.0))
    assert store.gpu_seconds_in_window("alice", T0 + 2, 3600.0) == 30.0
    done = claim.snapshot()
    done.transition(S.CANCELLED, T0 + 3)
    ended = transition_of(done, S.DISPATCHING, "router", T0 + 3)
    assert store.transition(done, S.DISPATCHING, 1, ended, Charge("alice", "exe_1", T0, 2.5))
    assert store.gpu_seconds_in_window("alice", T0 + 4, 3600.0) == 2.5


@pytest.mark.parametrize("amount", [float("inf"), float("nan"), -1.0])
def test_a_transition_with_a_charge_no_window_could_hold_writes_nothing(
    store: StateStore, amount: float
) -> None:
    """A refused charge refuses its status change too: neither is written."""
    request = add(store, make_request("r1"))
    claim = request.snapshot()
    claim.transition(S.DISPATCHING, T0 + 1, placement=PLACEMENT)
    change = transition_of(claim, S.QUEUED, "router", T0 + 1)
    with pytest.raises(ValueError, match="GPU-seconds"):
        store.transition(claim, S.QUEUED, 0, change, Charge("alice", "exe_1", T0, amount))
    stored = store.get_request("r1")
    assert stored is not None
    assert stored.status is S.QUEUED
    assert [entry.seq for entry in store.transitions("r1")] == [0]
    assert store.gpu_seconds_in_window("alice", T0 + 2, 3600.0) == 0.0


def test_transition_with_a_stale_status_is_refused(store: StateStore) -> None:
    """A writer that saw an old status loses: nothing is written."""
    request = add(store, make_request("r1"))
    winner = request.snapshot()
    winner.transition(S.DISPATCHING, T0 + 1, placement=PLACEMENT)
    assert move(store, winner, S.QUEUED, 0)
    loser = request.snapshot()
    loser.transition(S.CANCELLED, T0 + 2)
    assert not move(store, loser, S.QUEUED, 0)
    stored = store.get_request("r1")
    assert stored is not None
    assert stored.status is S.DISPATCHING


def test_transition_with_a_stale_attempt_is_refused(store: StateStore) -> None:
    """The attempt guards too: a write about attempt 1 cannot land on attempt 2."""
    request = add(store, make_request("r1"))
    request.transition(S.DISPATCHING, T0 + 1, placement=PLACEMENT)
    assert move(store, request, S.QUEUED, 0)
    request.transition(S.QUEUED, T0 + 2)
    assert move(store, request, S.DISPATCHING, 1)
    request.transition(S.DISPATCHING, T0 + 3, placement=PLACEMENT)
    assert move(store, request, S.QUEUED, 1)
    late = request.snapshot()
    late.transition(S.RUNNING, T0 + 4)
    assert not move(store, late, S.DISPATCHING, 1)
    assert move(store, late, S.DISPATCHING, 2)


def test_transition_of_an_unknown_request_is_refused(store: StateStore) -> None:
    """A guarded write of a request that was never added does nothing."""
    assert not move(store, make_request("ghost"), S.QUEUED, 0)
    assert store.get_request("ghost") is None


# --- unfinished requests ---------------------------------------------------------------------


def test_unfinished_requests_oldest_first_without_terminal_ones(store: StateStore) -> None:
    """Recovery sees every unfinished request, oldest first, and none that finished."""
    for index in range(5):
        add(store, make_request(f"r{index}", created_at=T0 + index))
    finished = store.get_request("r2")
    assert finished is not None
    finished.transition(S.CANCELLED, T0 + 10)
    assert move(store, finished, S.QUEUED, 0)
    running = store.get_request("r3")
    assert running is not None
    running.transition(S.DISPATCHING, T0 + 10, placement=PLACEMENT)
    assert move(store, running, S.QUEUED, 0)
    unfinished = store.unfinished_requests()
    assert [r.id for r in unfinished] == ["r0", "r1", "r3", "r4"]
    assert unfinished[2].status is S.DISPATCHING


def test_unfinished_requests_are_ordered_by_creation_not_insertion(store: StateStore) -> None:
    """Oldest first means by creation time, even when added out of order."""
    add(store, make_request("late", created_at=T0 + 50))
    add(store, make_request("early", created_at=T0))
    add(store, make_request("middle", created_at=T0 + 20))
    assert [r.id for r in store.unfinished_requests()] == ["early", "middle", "late"]


def test_a_request_added_finished_is_not_unfinished(store: StateStore) -> None:
    """A request stored already terminal never shows up for recovery."""
    request = make_request("done")
    request.transition(S.CANCELLED, T0 + 1)
    add(store, request)
    assert store.unfinished_requests() == []


# --- listing -----------------------------------------------------------------------------------


def test_list_is_newest_first(store: StateStore) -> None:
    """Requests list newest first; equal creation times order by id, descending."""
    for rid, at in [("a", T0), ("b", T0 + 2), ("c", T0 + 1), ("d", T0 + 2)]:
        add(store, make_request(rid, created_at=at))
    page = store.list_requests(RequestQuery())
    assert [r.id for r in page.items] == ["d", "b", "c", "a"]
    assert page.next_cursor is None


def test_list_filters(store: StateStore) -> None:
    """Each filter keeps only the requests that match it, and filters combine."""
    add(store, make_request("a1", user="alice", model="m1", priority="high"))
    add(store, make_request("a2", user="alice", model="m2", created_at=T0 + 1))
    add(store, make_request("b1", user="bob", model="m1", created_at=T0 + 2))
    cancelled = store.get_request("a2")
    assert cancelled is not None
    cancelled.transition(S.CANCELLED, T0 + 3)
    assert move(store, cancelled, S.QUEUED, 0)

    def ids(**filters: Any) -> list[str]:
        return [r.id for r in store.list_requests(RequestQuery(**filters)).items]

    assert ids(user="alice") == ["a2", "a1"]
    assert ids(model="m1") == ["b1", "a1"]
    assert ids(priority="high") == ["a1"]
    assert ids(statuses=frozenset({S.CANCELLED})) == ["a2"]
    assert ids(statuses=frozenset({S.QUEUED, S.RUNNING})) == ["b1", "a1"]
    assert ids(user="alice", model="m1") == ["a1"]
    assert ids(user="carol") == []


def test_pages_follow_each_other(store: StateStore) -> None:
    """Pages of two walk the list without overlap; the last one has no cursor."""
    for index in range(5):
        add(store, make_request(f"r{index}", created_at=T0 + index))
    pages = all_pages(store, RequestQuery(limit=2))
    assert [[r.id for r in page] for page in pages] == [["r4", "r3"], ["r2", "r1"], ["r0"]]


def test_exactly_full_last_page_has_no_cursor(store: StateStore) -> None:
    """When the requests fill the page exactly there is no next page."""
    for index in range(4):
        add(store, make_request(f"r{index}", created_at=T0 + index))
    first = store.list_requests(RequestQuery(limit=2))
    second = store.list_requests(RequestQuery(limit=2, cursor=first.next_cursor))
    assert [r.id for r in second.items] == ["r1", "r0"]
    assert second.next_cursor is None


def test_cursor_stays_valid_when_newer_requests_arrive(store: StateStore) -> None:
    """Requests added after the first page do not shift the pages that follow."""
    for index in range(4):
        add(store, make_request(f"r{index}", created_at=T0 + index))
    first = store.list_requests(RequestQuery(limit=2))
    add(store, make_request("new", created_at=T0 + 100))
    second = store.list_requests(RequestQuery(limit=2, cursor=first.next_cursor))
    assert [r.id for r in second.items] == ["r1", "r0"]


def test_listed_requests_are_copies(store: StateStore) -> None:
    """Changing a listed request leaves the store as it was."""
    add(store, make_request("r1"))
    (listed,) = store.list_requests(RequestQuery()).items
    listed.transition(S.CANCELLED, T0 + 1)
    stored = store.get_request("r1")
    assert stored is not None
    assert stored.status is S.QUEUED


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
@settings(max_examples=150, deadline=None)
@given(
    rows=_request_rows,
    limit=st.integers(min_value=1, max_value=7),
    user=st.sampled_from([None, "alice", "bob"]),
    model=st.sampled_from([None, "m1", "m2"]),
    priority=st.sampled_from([None, "high"]),
    only_cancelled=st.sampled_from([None, True, False]),
)
def test_pagination_has_no_duplicates_or_gaps(
    kind: str,
    rows: list[tuple[int, str, str, str, bool]],
    limit: int,
    user: str | None,
    model: str | None,
    priority: str | None,
    only_cancelled: bool | None,
) -> None:
    """Concatenated pages equal the filtered requests, newest first, whatever the page size."""
    statuses = None
    if only_cancelled is not None:
        statuses = frozenset({S.CANCELLED} if only_cancelled else {S.QUEUED})
    query = RequestQuery(user=user, model=model, priority=priority, statuses=statuses, limit=limit)
    with fresh_store(kind) as store:
        for index, (at, owner, model_name, prio, cancel) in enumerate(rows):
            request = make_request(
                f"r{index:03d}", user=owner, created_at=float(at), model=model_name, priority=prio
            )
            if cancel:
                request.transition(S.CANCELLED, at + 1.0)
            add(store, request)
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
    """A cursor not made by the store raises InvalidRequest naming the cursor field."""
    add(store, make_request("r1"))
    with pytest.raises(InvalidRequest) as info:
        store.list_requests(RequestQuery(cursor=cursor))
    assert info.value.field == "cursor"


def test_cursor_round_trips() -> None:
    """decode_cursor gives back the position encode_cursor was made from."""
    request = make_request("r-1", created_at=1234.5)
    assert decode_cursor(encode_cursor(request)) == (1234.5, "r-1")
    assert json.loads(base64.urlsafe_b64decode(encode_cursor(request) + "==")) == [1234.5, "r-1"]


@pytest.mark.parametrize("limit", [0, -1])
def test_a_page_size_below_one_is_an_invalid_request(store: StateStore, limit: int) -> None:
    """A listing must ask for at least one request per page."""
    add(store, make_request("r1"))
    with pytest.raises(InvalidRequest) as info:
        store.list_requests(RequestQuery(limit=limit))
    assert info.value.field == "limit"


# --- reservations ------------------------------------------------------------------------------


def test_reserve_within_the_limit_returns_the_new_total(store: StateStore) -> None:
    """Reservations add up per GPU and the new total comes back."""
    assert store.reserve("g0", "e1", 300, 1000) == 300
    assert store.reserve("g0", "e2", 700, 1000) == 1000
    assert store.reserve("g1", "e1", 50, 1000) == 50
    assert store.reserved_mb("g0") == 1000
    assert store.reserved_mb("g1") == 50
    assert store.reserved_mb("unknown") == 0


def test_reserve_beyond_the_limit_is_refused_and_changes_nothing(store: StateStore) -> None:
    """A reservation that would pass the limit returns None and leaves the totals alone."""
    store.reserve("g0", "e1", 600, 1000)
    assert store.reserve("g0", "e2", 401, 1000) is None
    assert store.reserved_mb("g0") == 600
    assert store.release("e2") == {}
    assert store.reserved_mb("g0") == 600


def test_re_reserving_the_same_holder_replaces(store: StateStore) -> None:
    """The same holder reserving again on a GPU replaces its amount instead of adding."""
    store.reserve("g0", "e1", 600, 1000)
    assert store.reserve("g0", "e1", 900, 1000) == 900
    assert store.reserved_mb("g0") == 900
    assert store.reserve("g0", "e1", 1001, 1000) is None
    assert store.reserved_mb("g0") == 900


def test_negative_reservation_is_refused(store: StateStore) -> None:
    """A negative amount is a programming error."""
    with pytest.raises(ValueError, match="negative"):
        store.reserve("g0", "e1", -1, 1000)


def test_release_returns_new_totals_of_every_touched_gpu(store: StateStore) -> None:
    """Releasing a holder frees all its GPUs and reports each one's remaining total."""
    store.reserve("g0", "e1", 300, 1000)
    store.reserve("g1", "e1", 400, 1000)
    store.reserve("g0", "e2", 200, 1000)
    assert store.release("e1") == {"g0": 200, "g1": 0}
    assert store.reserved_mb("g0") == 200
    assert store.reserved_mb("g1") == 0
    assert store.release("e1") == {}
    assert store.reserve("g1", "e3", 1000, 1000) == 1000


@pytest.mark.parametrize("kind", KINDS)
@given(
    st.lists(
        st.tuples(st.sampled_from(["e1", "e2", "e3"]), st.integers(0, 600), st.booleans()),
        max_size=30,
    )
)
def test_reserved_total_never_passes_the_limit(kind: str, ops: list[tuple[str, int, bool]]) -> None:
    """Whatever sequence of reservations and releases, the total stays within the limit."""
    held: dict[str, int] = {}
    with fresh_store(kind) as store:
        for holder, amount, release in ops:
            if release:
                store.release(holder)
                held.pop(holder, None)
                continue
            total = store.reserve("g0", holder, amount, 1000)
            fits = sum(held.values()) - held.get(holder, 0) + amount <= 1000
            assert (total is not None) == fits
            if fits:
                held[holder] = amount
                assert total == sum(held.values())
            assert store.reserved_mb("g0") == sum(held.values()) <= 1000


# --- rate admissions --------------------------------------------------------------------------


def test_a_rate_admission_allows_exactly_the_limit_in_a_window(store: StateStore) -> None:
    """Three admissions fit a limit of three; the fourth gets the time until the first leaves."""
    assert admit(store, "alice", 0.0, 60.0, 3) is None
    assert admit(store, "alice", 10.0, 60.0, 3) is None
    assert admit(store, "alice", 20.0, 60.0, 3) is None
    assert admit(store, "alice", 30.0, 60.0, 3) == pytest.approx(30.0)
    assert store.admissions_in_window("alice", 30.0, 60.0) == 3


def test_a_refused_admission_is_not_recorded(store: StateStore) -> None:
    """Refusals do not count, so a slot opens when the oldest admission leaves the window."""
    admit(store, "alice", 0.0, 60.0, 2)
    admit(store, "alice", 50.0, 60.0, 2)
    for now in (51.0, 55.0, 59.0):
        assert admit(store, "alice", now, 60.0, 2) == pytest.approx(60.0 - now)
    assert admit(store, "alice", 60.0, 60.0, 2) is None
    assert admit(store, "alice", 61.0, 60.0, 2) == pytest.approx(49.0)
    assert store.admissions_in_window("alice", 61.0, 60.0) == 2


def test_an_idempotent_replay_records_no_admission(store: StateStore) -> None:
    """The request already stored under the key comes back; the window is left as it was."""
    first = make_request("r1", key="k")
    admission = RateAdmission(T0, 60.0, 1)
    store.add_request(first, transition_of(first, None, "alice", T0), admission)
    again = make_request("r2", key="k")
    stored = store.add_request(again, transition_of(again, None, "alice", T0), admission)
    assert stored.id == "r1"
    assert store.admissions_in_window("alice", T0, 60.0) == 1


def test_a_rate_limit_below_one_is_refused() -> None:
    """A limit that could admit nothing is a programming error, caught when it is made."""
    with pytest.raises(ValueError, match="at least one"):
        RateAdmission(T0, 60.0, 0)


def test_admissions_are_per_user(store: StateStore) -> None:
    """One user's admissions do not use up another's."""
    assert admit(store, "alice", 0.0, 60.0, 1) is None
    assert admit(store, "alice", 1.0, 60.0, 1) is not None
    assert admit(store, "bob", 1.0, 60.0, 1) is None
    assert store.admissions_in_window("carol", 1.0, 60.0) == 0


@pytest.mark.parametrize("kind", KINDS)
@given(
    # Clock readings as a router sees them: epoch seconds with sub-millisecond jitter.
    times=st.lists(st.integers(0, 300_000_000).map(lambda us: EPOCH + us / 1e6), max_size=40).map(
        sorted
    ),
    limit=st.integers(1, 5),
)
def test_admissions_in_any_window_never_pass_the_limit(
    kind: str, times: list[float], limit: int
) -> None:
    """Over any sequence of attempts, no 60 s window holds more than ``limit`` admissions."""
    admitted: list[float] = []
    with fresh_store(kind) as store:
        for now in times:
            retry_after = admit(store, "u", now, 60.0, limit)
            recent = [t for t in admitted if t > now - 60.0]
            if retry_after is None:
                assert len(recent) < limit
                admitted.append(now)
            else:
                assert len(recent) >= limit
                assert retry_after == pytest.approx(min(recent) + 60.0 - now, abs=1e-6)
                assert 0 < retry_after <= 60.0 + 1e-6
                later = now + retry_after
                assert len([t for t in admitted if t > later - 60.0]) < limit


def test_retry_after_is_positive_despite_float_rounding(store: StateStore) -> None:
    """An admission far smaller than the window still yields a positive, sufficient retry-after."""
    assert admit(store, "u", 1e-128, 60.0, 1) is None
    retry_after = admit(store, "u", 60.0, 60.0, 1)
    assert retry_after is not None
    assert retry_after > 0
    assert admit(store, "u", 60.0 + retry_after, 60.0, 1) is None


# --- GPU-second charges -----------------------------------------------------------------------


def test_charges_add_up_in_the_window(store: StateStore) -> None:
    """GPU-seconds of several charges add up."""
    charge(store, "alice", "c1", 0.0, 10.0)
    charge(store, "alice", "c2", 5.0, 20.0)
    charge(store, "bob", "c3", 5.0, 99.0)
    assert store.gpu_seconds_in_window("alice", 10.0, 3600.0) == 30.0
    assert store.gpu_seconds_in_window("bob", 10.0, 3600.0) == 99.0
    assert store.gpu_seconds_in_window("carol", 10.0, 3600.0) == 0.0


def test_charging_the_same_id_replaces(store: StateStore) -> None:
    """A second charge with the same id settles the first instead of adding to it."""
    charge(store, "alice", "exe_1", 0.0, 100.0)
    charge(store, "alice", "exe_2", 1.0, 5.0)
    charge(store, "alice", "exe_1", 0.0, 40.0)
    assert store.gpu_seconds_in_window("alice", 2.0, 3600.0) == 45.0


def test_charges_older_than_the_window_drop_out(store: StateStore) -> None:
    """A charge leaves the window once it is window_s old."""
    charge(store, "alice", "c1", 0.0, 10.0)
    charge(store, "alice", "c2", 100.0, 20.0)
    assert store.gpu_seconds_in_window("alice", 3599.0, 3600.0) == 30.0
    assert store.gpu_seconds_in_window("alice", 3600.0, 3600.0) == 20.0
    assert store.gpu_seconds_in_window("alice", 3700.0, 3600.0) == 0.0


@pytest.mark.parametrize("amount", [float("inf"), float("nan"), -1.0])
def test_a_charge_no_window_could_hold_is_refused_and_changes_nothing(
    store: StateStore, amount: float
) -> None:
    """Negative, infinite or NaN GPU-seconds are refused; the window keeps what it had."""
    charge(store, "alice", "c1", 0.0, 10.0)
    with pytest.raises(ValueError, match="GPU-seconds"):
        charge(store, "alice", "c2", 1.0, amount)
    with pytest.raises(ValueError, match="GPU-seconds"):
        charge(store, "alice", "c1", 0.0, amount)
    assert store.gpu_seconds_in_window("alice", 2.0, 3600.0) == 10.0
    charge(store, "alice", "c1", 0.0, 4.0)
    assert store.gpu_seconds_in_window("alice", 2.0, 3600.0) == 4.0


def test_oldest_charge_in_window(store: StateStore) -> None:
    """The oldest charge still counted tells when usage next drops; None when there is none."""
    assert store.oldest_charge_in_window("alice", 0.0, 3600.0) is None
    charge(store, "alice", "c1", 10.0, 1.0)
    charge(store, "alice", "c2", 20.0, 1.0)
    assert store.oldest_charge_in_window("alice", 100.0, 3600.0) == 10.0
    assert store.oldest_charge_in_window("alice", 3610.0, 3600.0) == 20.0
    assert store.oldest_charge_in_window("alice", 3620.0, 3600.0) is None


def test_settling_a_charge_that_already_left_the_window_does_not_count(store: StateStore) -> None:
    """Re-charging an id dated outside the window, after it dropped out, adds nothing to usage."""
    charge(store, "alice", "long", 0.0, 10.0)
    charge(store, "alice", "short", 3000.0, 5.0)
    assert store.gpu_seconds_in_window("alice", 3700.0, 3600.0) == 5.0
    charge(store, "alice", "long", 0.0, 4000.0)
    assert store.gpu_seconds_in_window("alice", 3700.0, 3600.0) == 5.0
    assert store.oldest_charge_in_window("alice", 3700.0, 3600.0) == 3000.0


def test_charges_recorded_out_of_time_order_drop_out_on_time(store: StateStore) -> None:
    """A charge dated before an earlier-recorded one still leaves the window at its own time."""
    charge(store, "alice", "b", 100.0, 2.0)
    charge(store, "alice", "a", 50.0, 1.0)
    assert store.oldest_charge_in_window("alice", 200.0, 3600.0) == 50.0
    assert store.gpu_seconds_in_window("alice", 3660.0, 3600.0) == 2.0
    assert store.oldest_charge_in_window("alice", 3660.0, 3600.0) == 100.0


@pytest.mark.parametrize("kind", KINDS)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["c1", "c2", "c3", "c4"]),
            st.integers(0, 100),
            st.integers(0, 50),
        ),
        max_size=25,
    ),
    st.integers(0, 200),
)
def test_usage_equals_the_latest_amount_of_each_charge_in_the_window(
    kind: str, charges: list[tuple[str, int, int]], now_offset: int
) -> None:
    """Usage is the sum, over charge ids dated inside the window, of each id's latest amount."""
    latest: dict[str, tuple[int, int]] = {}
    with fresh_store(kind) as store:
        for charge_id, at, amount in sorted(charges, key=lambda c: c[1]):
            charge(store, "u", charge_id, float(at), float(amount))
            first_at = latest.get(charge_id, (at, 0))[0]
            latest[charge_id] = (first_at, amount)
        now = 100.0 + now_offset
        window = 150.0
        expected = sum(amount for at, amount in latest.values() if at > now - window)
        assert store.gpu_seconds_in_window("u", now, window) == pytest.approx(expected)


def test_audit_trail_records_every_written_change_in_order(store: StateStore) -> None:
    """Each written change adds one entry; a refused guarded write adds none."""
    request = add(store, make_request("r1"))
    request.transition(S.DISPATCHING, T0 + 1, placement=PLACEMENT)
    assert move(store, request, S.QUEUED, 0)
    stale = store.get_request("r1")
    stale.transition(S.CANCELLED, T0 + 2)
    assert not move(store, stale, S.QUEUED, 0)
    trail = store.transitions("r1")
    assert [(t.seq, t.from_status, t.to_status) for t in trail] == [
        (0, None, S.QUEUED),
        (1, S.QUEUED, S.DISPATCHING),
    ]
    assert trail[1].detail.startswith("on w:0")
    assert [t.seq for t in store.transitions("r1", after=0)] == [1]
    assert store.transitions("nope") == []


def test_quota_overrides_are_replaced_per_user(store: StateStore) -> None:
    """Setting a user's override replaces the previous one; others are untouched."""
    store.set_quota_override("ann", {"max_concurrent": 2})
    store.set_quota_override("bob", {"max_queued": None})
    store.set_quota_override("ann", {"requests_per_minute": 5})
    assert store.quota_overrides() == {
        "ann": {"requests_per_minute": 5},
        "bob": {"max_queued": None},
    }

"""Tests of the request model: the status machine, transition bookkeeping, snapshots, estimates."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_request_router.exceptions import AlreadyTerminal, InvalidTransition
from gpu_request_router.models.request import (
    TERMINAL_STATUSES,
    ErrorInfo,
    Estimate,
    Placement,
    Request,
    RequestStatus,
    ResourceHints,
    Shape,
    Task,
)

S = RequestStatus
T0 = 1000.0
PLACEMENT = Placement("w", ("w:0",), "test")

# The table of the module docstring, written out independently of the implementation.
DOCUMENTED: dict[RequestStatus, set[RequestStatus]] = {
    S.QUEUED: {S.DISPATCHING, S.CANCELLED, S.EXPIRED},
    S.DISPATCHING: {S.RUNNING, S.QUEUED, S.FAILED, S.CANCELLED, S.EXPIRED},
    S.RUNNING: {S.SUCCEEDED, S.FAILED, S.QUEUED, S.CANCELLED, S.EXPIRED},
    S.SUCCEEDED: set(),
    S.FAILED: set(),
    S.CANCELLED: set(),
    S.EXPIRED: set(),
}

# How to reach each status from queued, one edge at a time.
PATHS: dict[RequestStatus, list[RequestStatus]] = {
    S.QUEUED: [],
    S.DISPATCHING: [S.DISPATCHING],
    S.RUNNING: [S.DISPATCHING, S.RUNNING],
    S.SUCCEEDED: [S.DISPATCHING, S.RUNNING, S.SUCCEEDED],
    S.FAILED: [S.DISPATCHING, S.FAILED],
    S.CANCELLED: [S.CANCELLED],
    S.EXPIRED: [S.EXPIRED],
}


def estimate(**changes: Any) -> Estimate:
    """A small estimate with durations on two GPU types."""
    fields: dict[str, Any] = {
        "gpu_memory_mb": 20_000,
        "weights_mb": 15_000,
        "kv_cache_mb": 4_000,
        "activations_mb": 1_000,
        "duration_s": {"H100-80GB": 2.0, "L4-24GB": 8.0},
    }
    fields.update(changes)
    return Estimate(**fields)


def make_request(rid: str = "r1", *, created_at: float = T0) -> Request:
    """A fresh queued request."""
    return Request(
        id=rid,
        user="alice",
        model="llama-3-8b",
        task=Task.CHAT,
        priority="normal",
        estimate=estimate(),
        created_at=created_at,
        input={"messages": [{"role": "user", "content": "hi"}]},
    )


def request_in(status: RequestStatus) -> Request:
    """A request driven to ``status`` through legal transitions, one second apart."""
    request = make_request()
    now = T0
    for step in PATHS[status]:
        now += 1.0
        placement = PLACEMENT if step is S.DISPATCHING else None
        request.transition(step, now, placement=placement)
    assert request.status is status
    return request


# --- the status machine ----------------------------------------------------------------------


def test_documented_table_covers_every_status() -> None:
    """The table under test names every status, and its terminal rows are the terminal set."""
    assert set(DOCUMENTED) == set(RequestStatus)
    assert {status for status, targets in DOCUMENTED.items() if not targets} == TERMINAL_STATUSES
    assert all(status.terminal == (status in TERMINAL_STATUSES) for status in RequestStatus)


@pytest.mark.parametrize(
    ("source", "target"),
    list(itertools.product(RequestStatus, RequestStatus)),
    ids=lambda status: status.value,
)
def test_every_pair_follows_the_documented_table(
    source: RequestStatus, target: RequestStatus
) -> None:
    """A move succeeds exactly when the documented table has the edge; otherwise it raises."""
    request = request_in(source)
    before_version = request.version
    allowed = target in DOCUMENTED[source]
    assert request.can_transition(target) is allowed
    if allowed:
        left = request.transition(target, T0 + 100.0, placement=PLACEMENT)
        assert left is source
        assert request.status is target
        assert request.version == before_version + 1
        return
    expected = AlreadyTerminal if source.terminal else InvalidTransition
    with pytest.raises(expected) as info:
        request.transition(target, T0 + 100.0, placement=PLACEMENT)
    if not source.terminal:
        assert not isinstance(info.value, AlreadyTerminal)
    assert info.value.from_status == source.value
    assert info.value.to_status == target.value
    assert info.value.request_id == request.id
    assert request.status is source
    assert request.version == before_version


def test_already_terminal_names_the_status_it_is_in() -> None:
    """AlreadyTerminal carries the terminal status and is an InvalidTransition."""
    request = request_in(S.SUCCEEDED)
    with pytest.raises(AlreadyTerminal) as info:
        request.transition(S.QUEUED, T0 + 50.0)
    assert info.value.status == "succeeded"
    assert isinstance(info.value, InvalidTransition)


def test_active_is_dispatching_and_running_only() -> None:
    """Only dispatching and running requests count as holding a placement."""
    assert {status for status in RequestStatus if status.active} == {S.DISPATCHING, S.RUNNING}


@given(st.lists(st.sampled_from(list(RequestStatus)), max_size=30))
def test_random_walks_never_leave_the_table(steps: list[RequestStatus]) -> None:
    """Whatever moves are tried, the status only ever follows documented edges."""
    request = make_request()
    now = T0
    for target in steps:
        now += 1.0
        source = request.status
        try:
            request.transition(target, now, placement=PLACEMENT)
        except InvalidTransition:
            assert target not in DOCUMENTED[source]
            assert request.status is source
        else:
            assert target in DOCUMENTED[source]
            assert request.status is target
        if source.terminal:
            assert request.status is source


# --- bookkeeping of transition() -------------------------------------------------------------


def test_a_new_request_is_queued_at_creation() -> None:
    """A new request is queued, at attempt 0 and version 0, queued since it was created."""
    request = make_request(created_at=42.0)
    assert request.status is S.QUEUED
    assert request.queued_at == 42.0
    assert request.attempts == 0
    assert request.version == 0
    assert request.queue_wait_s == 0.0
    assert request.placement is None
    assert request.deadline == 42.0 + 3600.0
    assert request.execution_id == "exe_r1_0"


def test_dispatching_requires_a_placement() -> None:
    """A dispatch without a placement is refused and leaves the request untouched."""
    request = make_request()
    with pytest.raises(ValueError, match="placement"):
        request.transition(S.DISPATCHING, T0 + 1.0)
    assert request.status is S.QUEUED
    assert request.attempts == 0
    assert request.version == 0
    assert request.dispatched_at is None


def test_dispatch_counts_an_attempt_and_the_time_spent_waiting() -> None:
    """Dispatching bumps attempts, stamps dispatched_at, records the placement and the wait."""
    request = make_request()
    assert request.transition(S.DISPATCHING, T0 + 5.0, placement=PLACEMENT) is S.QUEUED
    assert request.attempts == 1
    assert request.dispatched_at == T0 + 5.0
    assert request.placement == PLACEMENT
    assert request.queue_wait_s == 5.0
    assert request.execution_id == "exe_r1_1"
    assert request.version == 1


def test_running_then_succeeded_stamps_start_and_finish() -> None:
    """Running stamps started_at; succeeding stamps finished_at and keeps the result."""
    request = request_in(S.DISPATCHING)
    request.transition(S.RUNNING, T0 + 3.0)
    assert request.started_at == T0 + 3.0
    assert request.finished_at is None
    request.transition(S.SUCCEEDED, T0 + 10.0, result={"text": "ok"})
    assert request.finished_at == T0 + 10.0
    assert request.result == {"text": "ok"}
    assert request.error is None
    assert request.placement == PLACEMENT
    assert request.version == 3
    assert request.attempts == 1


def test_requeue_clears_placement_and_start_and_keeps_the_error() -> None:
    """Going back to queued forgets the placement and start, remembers why, restarts the wait."""
    request = request_in(S.RUNNING)
    error = ErrorInfo("backend_error", "boom")
    request.transition(S.QUEUED, T0 + 20.0, error=error)
    assert request.status is S.QUEUED
    assert request.queued_at == T0 + 20.0
    assert request.placement is None
    assert request.started_at is None
    assert request.error == error
    assert request.attempts == 1


def test_queue_wait_adds_up_over_attempts() -> None:
    """queue_wait_s is the sum of every wait in the queue, not the last one."""
    request = make_request()
    request.transition(S.DISPATCHING, T0 + 4.0, placement=PLACEMENT)
    request.transition(S.RUNNING, T0 + 5.0)
    request.transition(S.QUEUED, T0 + 10.0)
    request.transition(S.DISPATCHING, T0 + 16.0, placement=PLACEMENT)
    assert request.attempts == 2
    assert request.queue_wait_s == pytest.approx(4.0 + 6.0)
    assert request.execution_id == "exe_r1_2"
    assert request.version == 4


def test_cancel_while_queued_counts_the_wait_and_finishes() -> None:
    """Cancelling a queued request adds its wait and stamps finished_at, with no attempt."""
    request = make_request()
    request.transition(S.CANCELLED, T0 + 7.0)
    assert request.queue_wait_s == 7.0
    assert request.finished_at == T0 + 7.0
    assert request.attempts == 0
    assert request.status.terminal


def test_expiring_a_running_request_does_not_count_queue_wait() -> None:
    """Expiring a running request stamps finished_at and the error without adding any wait."""
    request = request_in(S.RUNNING)
    wait = request.queue_wait_s
    error = ErrorInfo("timeout", "deadline passed")
    request.transition(S.EXPIRED, T0 + 500.0, error=error)
    assert request.queue_wait_s == wait
    assert request.finished_at == T0 + 500.0
    assert request.error == error


def test_queue_wait_never_goes_negative_when_time_runs_backwards() -> None:
    """A dispatch stamped before queued_at adds no (negative) wait."""
    request = make_request()
    request.transition(S.DISPATCHING, T0 - 5.0, placement=PLACEMENT)
    assert request.queue_wait_s == 0.0


def test_failed_dispatch_goes_straight_to_failed() -> None:
    """A dispatching request may fail for good before it ever ran."""
    request = request_in(S.DISPATCHING)
    error = ErrorInfo("client_error", "bad input")
    request.transition(S.FAILED, T0 + 2.0, error=error)
    assert request.status is S.FAILED
    assert request.started_at is None
    assert request.finished_at == T0 + 2.0
    assert request.error == error


# --- snapshots ---------------------------------------------------------------------------------


def test_snapshot_is_independent_of_later_transitions() -> None:
    """A snapshot keeps the status, attempts, version and timestamps it was taken with."""
    request = request_in(S.DISPATCHING)
    snap = request.snapshot()
    request.transition(S.RUNNING, T0 + 3.0)
    request.transition(S.QUEUED, T0 + 4.0, error=ErrorInfo("worker_lost", "gone"))
    assert snap.status is S.DISPATCHING
    assert snap.version == 1
    assert snap.attempts == 1
    assert snap.placement == PLACEMENT
    assert snap.started_at is None
    assert snap.error is None
    assert request.status is S.QUEUED


def test_transitions_of_a_snapshot_do_not_touch_the_original() -> None:
    """Moving a snapshot leaves the request it was taken from where it was."""
    request = make_request()
    snap = request.snapshot()
    snap.transition(S.DISPATCHING, T0 + 1.0, placement=PLACEMENT)
    assert request.status is S.QUEUED
    assert request.attempts == 0
    assert snap is not request
    assert snap.id == request.id


def test_snapshot_copies_every_field() -> None:
    """A snapshot equals its original field by field."""
    request = request_in(S.RUNNING)
    snap = request.snapshot()
    for name in Request.__dataclass_fields__:
        assert getattr(snap, name) == getattr(request, name), name


def test_adopt_takes_every_field() -> None:
    """Adopting another request makes this one equal to it field by field."""
    request = make_request()
    other = Request(
        id="r2",
        user="bob",
        model="llama-3-70b",
        task=Task.COMPLETION,
        priority="high",
        estimate=estimate(gpu_memory_mb=30_000),
        created_at=T0 + 1.0,
        input={"prompt": "hello"},
        shape=Shape(2, 10, 20),
        resources=ResourceHints(gpu_memory_mb=40_000, gpu_count=2, gpu_type="H100-80GB"),
        timeout_s=60.0,
        metadata={"team": "vision"},
        idempotency_key="k1",
        fingerprint="f1",
        synchronous=True,
        status=S.FAILED,
        queued_at=T0 + 2.0,
        dispatched_at=T0 + 3.0,
        started_at=T0 + 4.0,
        finished_at=T0 + 5.0,
        queue_wait_s=1.5,
        attempts=3,
        placement=PLACEMENT,
        result={"answer": 42},
        error=ErrorInfo("backend_error", "boom"),
        version=7,
    )
    request.adopt(other)
    for name in Request.__dataclass_fields__:
        mine, theirs = getattr(request, name), getattr(other, name)
        assert mine == theirs, name
        assert mine != getattr(make_request(), name), f"{name} does not differ: a weak test"


# --- estimates and shapes ----------------------------------------------------------------------


def test_memory_on_drops_the_weights_where_the_model_is_loaded() -> None:
    """Where the model is loaded only KV cache and activations need reserving."""
    est = estimate()
    assert est.memory_on(model_loaded=False) == 20_000
    assert est.memory_on(model_loaded=True) == 5_000


def test_duration_on_a_listed_type_is_its_own() -> None:
    """A GPU type the estimate lists gets its own duration."""
    est = estimate()
    assert est.duration_on("H100-80GB") == 2.0
    assert est.duration_on("L4-24GB") == 8.0


def test_duration_on_an_unlisted_type_is_the_slowest_known() -> None:
    """An unknown GPU type is assumed to be as slow as the slowest listed one."""
    assert estimate().duration_on("A100-80GB") == 8.0


def test_typical_duration_is_the_fastest() -> None:
    """The typical duration is the one on the fastest listed type."""
    assert estimate().typical_duration_s == 2.0


def test_durations_default_to_one_second_without_any_type() -> None:
    """An estimate without durations takes 1 s everywhere."""
    est = estimate(duration_s={})
    assert est.duration_on("H100-80GB") == 1.0
    assert est.typical_duration_s == 1.0


@given(
    st.integers(min_value=1, max_value=1024),
    st.integers(min_value=0, max_value=100_000),
    st.integers(min_value=0, max_value=100_000),
)
def test_total_tokens_is_batch_times_prompt_plus_output(batch: int, inp: int, out: int) -> None:
    """Shape.total_tokens is batch × (input + output)."""
    assert Shape(batch, inp, out).total_tokens == batch * (inp + out)


def test_default_shape_holds_no_tokens() -> None:
    """A default shape is one empty sequence."""
    assert Shape().total_tokens == 0
    assert Shape(batch_size=4, input_tokens=10, output_tokens=6).total_tokens == 64

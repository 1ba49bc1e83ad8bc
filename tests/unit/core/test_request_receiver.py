"""Admission: validation, idempotency, quota checks; a refused request changes nothing."""

from __future__ import annotations

import math

import pytest
from core_harness import Harness

from gpu_request_router.core.events import FailureKind
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.core.state_store import OverrideChange, RequestQuery
from gpu_request_router.exceptions import (
    IdempotencyConflict,
    InvalidRequest,
    QueueFull,
    QuotaExceeded,
    QuotaForbidden,
    RequestRejected,
    UnknownModel,
    Unschedulable,
)
from gpu_request_router.models.request import ResourceHints, Shape, Task
from gpu_request_router.testing import UNLIMITED_QUOTA, chat, make_settings, reading


def _nothing_stored(h: Harness) -> bool:
    """Nothing stored, nothing live in the core, no admission of alice's counted."""
    stored = h.store.list_requests(RequestQuery(limit=500)).items
    return stored == [] and not h.router.live and h.admitted("alice") == 0


def _rejected(h: Harness, reason: str) -> float | None:
    return h.engine.registry.get_sample_value(
        "gpurouter_requests_rejected_total", {"reason": reason}
    )


@pytest.mark.parametrize(
    ("submission", "field"),
    [
        (chat(priority="vip"), "priority"),
        (chat(timeout_s=0), "timeout_s"),
        (chat(timeout_s=-1), "timeout_s"),
        (chat(timeout_s=math.nan), "timeout_s"),
        (chat(timeout_s=10**12), "timeout_s"),
        (chat(resources=ResourceHints(gpu_count=0)), "resources.gpu_count"),
        (chat(resources=ResourceHints(gpu_count=65)), "resources.gpu_count"),
        (chat(resources=ResourceHints(gpu_memory_mb=0)), "resources.gpu_memory_mb"),
        (chat(shape=Shape(0, 10, 10)), "shape.batch_size"),
        (chat(shape=Shape(1, -1, 10)), "shape"),
        (chat(shape=Shape(1, 8000, 8000)), "shape"),
        (chat(idempotency_key=""), "idempotency_key"),
        (chat(idempotency_key="k" * 256), "idempotency_key"),
        (Submission(model="llama-3-8b", task=Task.EMBEDDING, input={"input": "x"}), "task"),
        (Submission(model="llama-3-8b", input={"messages": "hi"}), "input.messages"),
        (Submission(model="llama-3-8b", metadata={f"k{i}": "v" for i in range(33)}), "metadata"),
        (Submission(model="llama-3-8b", metadata={"k": "v" * 513}), "metadata.k"),
    ],
)
def test_invalid_submissions_are_refused_with_the_field_named(
    harness_for, submission: Submission, field: str
) -> None:
    """Bad input gets InvalidRequest naming the field, and nothing is stored or queued."""
    h: Harness = harness_for()
    with pytest.raises(InvalidRequest) as info:
        h.engine.receiver.submit(submission, Caller("alice"), h.now)
    assert info.value.field == field
    assert _nothing_stored(h)
    assert h.dispatches == []
    assert _rejected(h, info.value.reason) == 1


def test_unknown_model_lists_the_known_ones(harness_for) -> None:
    """An unknown model is refused and the message names the catalog."""
    h: Harness = harness_for()
    with pytest.raises(UnknownModel, match="llama-3-8b"):
        h.engine.receiver.submit(Submission(model="gpt-9"), Caller("alice"), h.now)
    assert _nothing_stored(h)


@pytest.mark.parametrize(
    "resources",
    [
        ResourceHints(gpu_type="A100-80GB"),
        ResourceHints(gpu_count=3),
        ResourceHints(gpu_memory_mb=90_000),
    ],
)
def test_requests_no_gpu_of_the_fleet_could_hold_are_unschedulable(
    harness_for, resources: ResourceHints
) -> None:
    """Wrong GPU type, more GPUs than a worker has, or more memory than a GPU: refused at once."""
    h: Harness = harness_for(gpus=[("H100-80GB", 2)])
    with pytest.raises(Unschedulable):
        h.submit(chat(resources=resources))
    assert _nothing_stored(h)


def test_what_could_ever_fit_follows_the_fleet_make_up(harness_for) -> None:
    """The answer is kept per kind of request, but a GPU joining or loading a model renews it."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    big = chat(resources=ResourceHints(gpu_memory_mb=100_000))
    with pytest.raises(Unschedulable):
        h.submit(big)
    h.apply(h.router.readings([reading("big", 0, "H200-141GB")], h.now))
    assert h.status(h.submit(big)) == "dispatching"
    two = chat(resources=ResourceHints(gpu_memory_mb=100_000, gpu_count=2))
    with pytest.raises(Unschedulable):
        h.submit(two)
    h.apply(h.router.readings([reading("big", 1, "H200-141GB")], h.now))
    # The first request holds 100 000 MiB of big:0 until it ends: the pair has to wait.
    assert h.status(h.submit(two)) == "queued"


def test_request_that_fits_the_fleet_but_not_now_is_queued(harness_for) -> None:
    """A request too big for the free room now, but not for the fleet, waits instead."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    h.submit(chat(resources=ResourceHints(gpu_memory_mb=60_000)))
    waiting = h.submit(chat(resources=ResourceHints(gpu_memory_mb=60_000)))
    assert h.status(waiting) == "queued"


def test_idempotency_key_returns_the_first_request(harness_for) -> None:
    """The same key and body give the same request; another body with the key is a conflict."""
    h: Harness = harness_for()
    first = h.submit(chat(idempotency_key="k1"))
    again = h.engine.receiver.submit(chat(idempotency_key="k1"), Caller("alice"), h.now + 1)
    assert not again.created and again.request.id == first.id
    with pytest.raises(IdempotencyConflict):
        h.submit(chat(text="other", idempotency_key="k1"))
    theirs = h.submit(chat(idempotency_key="k1"), user="bob")
    assert theirs.id != first.id
    assert len(h.store.list_requests(RequestQuery(limit=10)).items) == 2


def test_a_replay_of_a_finished_request_is_answered_from_what_the_store_found(harness_for) -> None:
    """Once a request has left the core, the driver's stored copy (``known``) answers its key.

    The same body gets the stored request and changes nothing; another body is a conflict.
    """
    h: Harness = harness_for()
    first = h.submit(chat(idempotency_key="k1"))
    h.finish(first)
    assert h.router.find_live("alice", "k1") is None
    known = h.store.find_idempotent("alice", "k1")
    assert known is not None and known.id == first.id
    receiver = h.engine.receiver
    again = receiver.submit(chat(idempotency_key="k1"), Caller("alice"), h.now + 1, known)
    assert not again.created and again.decisions == []
    assert again.request.id == first.id and again.request.status.value == "succeeded"
    with pytest.raises(IdempotencyConflict):
        receiver.submit(chat(text="other", idempotency_key="k1"), Caller("alice"), h.now, known)
    assert h.admitted("alice") == 1
    assert len(h.store.list_requests(RequestQuery(limit=10)).items) == 1


def test_only_a_request_with_an_idempotency_key_carries_a_body_digest(harness_for) -> None:
    """The digest tells a replay from a conflict; without a key there is nothing to compare."""
    h: Harness = harness_for()
    keyed = h.store.get_request(h.submit(chat(idempotency_key="k1")).id)
    plain = h.store.get_request(h.submit(chat()).id)
    assert keyed is not None and plain is not None
    assert len(keyed.fingerprint) == 64 and plain.fingerprint == ""


def test_priority_above_the_users_maximum_is_forbidden(harness_for) -> None:
    """Asking for a class above max_priority is 403-like: waiting never helps."""
    h: Harness = harness_for(quota={"max_priority": "normal"})
    with pytest.raises(QuotaForbidden) as info:
        h.submit(chat(priority="high"))
    assert info.value.quota == "max_priority"
    assert h.submit(chat(priority="low")).priority == "low"


def test_memory_above_the_users_maximum_is_forbidden(harness_for) -> None:
    """A request needing more memory per GPU than max_gpu_memory_mb is refused for good."""
    h: Harness = harness_for(quota={"max_gpu_memory_mb": 20_000})
    with pytest.raises(QuotaForbidden) as info:
        h.submit(chat(resources=ResourceHints(gpu_memory_mb=30_000)))
    assert info.value.quota == "max_gpu_memory_mb"
    assert _nothing_stored(h)


def test_rate_limit_admits_exactly_n_per_minute_with_a_correct_retry_after(harness_for) -> None:
    """The rate limit admits N in any 60 s window; the next gets the time until a slot frees."""
    h: Harness = harness_for(quota={"requests_per_minute": 3})
    start = h.now
    for offset in (0, 10, 20):
        h.now = start + offset
        h.submit(chat())
    h.now = start + 30
    with pytest.raises(QuotaExceeded) as info:
        h.submit(chat())
    assert info.value.quota == "requests_per_minute"
    assert info.value.retry_after_s == pytest.approx(30.0)
    h.now = start + 60.001
    h.submit(chat())
    assert h.submit(chat(), user="bob") is not None, "limits are per user"


def test_max_queued_refuses_with_retry_after(harness_for) -> None:
    """A user with max_queued requests waiting is refused until one is dispatched."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1, quota={"max_queued": 2})
    h.submit(chat(max_tokens=900))
    h.submit(chat())
    h.submit(chat())
    with pytest.raises(QuotaExceeded) as info:
        h.submit(chat())
    assert info.value.quota == "max_queued"
    assert info.value.retry_after_s >= 1.0
    assert h.router.queued_count("alice") == 2


def _bounded(harness_for, total: int, **quota: object) -> Harness:
    """One GPU with one slot, unlimited user quotas (but ``quota``), ``total`` waiting at most."""
    harness: Harness = harness_for(
        gpus=[("H100-80GB", 1)],
        slots=1,
        quotas={"default": {**UNLIMITED_QUOTA, **quota}, "max_queued_total": total},
    )
    return harness


def _stored(h: Harness) -> int:
    return len(h.store.list_requests(RequestQuery(limit=500)).items)


def test_the_routers_queue_bound_refuses_every_user_until_a_place_frees(harness_for) -> None:
    """With max_queued_total waiting, anyone's next request is QueueFull until one leaves."""
    h = _bounded(harness_for, 2)
    running = h.submit(chat(max_tokens=900))
    h.submit(chat())
    h.submit(chat(), user="bob")
    assert h.router.queued_total() == 2
    with pytest.raises(QueueFull) as info:
        h.submit(chat(), user="carol")
    assert info.value.reason == "queue_full" and info.value.limit == 2
    assert info.value.retry_after_s >= 1.0
    assert _stored(h) == 3 and h.router.queued_total() == 2
    assert h.admitted("carol") == 0
    assert _rejected(h, "queue_full") == 1
    h.finish(running)  # a queued request takes the slot: one place frees
    assert h.router.queued_total() == 1
    assert h.status(h.submit(chat(), user="carol")) == "queued"
    assert h.router.queued_total() == 2


def test_the_packaged_default_bounds_the_queue_at_ten_thousand(harness_for) -> None:
    """With no bound configured, the 10,001st waiting request is refused as queue_full."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], slots=1)
    h.submit(chat(max_tokens=900))  # takes the only slot: everything after waits
    for _ in range(10_000):
        h.submit(chat())
    with pytest.raises(RequestRejected) as info:
        h.submit(chat(), user="bob")
    assert info.value.reason == "queue_full"
    assert h.router.queued_total() == 10_000


def test_the_queue_bound_counts_requests_backing_off_to_retry(harness_for) -> None:
    """A request put back to be retried holds its place: the bound counts it as waiting."""
    h = _bounded(harness_for, 2)
    first = h.submit(chat(max_tokens=900))
    h.submit(chat())
    h.fail(first, FailureKind.BACKEND_ERROR)  # backs off; the other request takes the slot
    assert h.router.queued_total() == 1
    h.submit(chat())
    with pytest.raises(QueueFull):
        h.submit(chat())


def test_a_full_queue_still_answers_idempotent_replays_and_lasting_refusals(harness_for) -> None:
    """A replay gets its request, a class above the user's maximum 403-like, bad input 422-like."""
    h = _bounded(harness_for, 1, max_priority="high")
    h.submit(chat(max_tokens=900))
    waiting = h.submit(chat(idempotency_key="k1"))
    again = h.engine.receiver.submit(chat(idempotency_key="k1"), Caller("alice"), h.now)
    assert not again.created and again.request.id == waiting.id
    with pytest.raises(QuotaForbidden):
        h.submit(chat(priority="critical"))
    with pytest.raises(UnknownModel):
        h.submit(Submission(model="no-such-model"))
    with pytest.raises(QueueFull):
        h.submit(chat(idempotency_key="k2"))
    assert _stored(h) == 2


def test_an_admin_may_use_every_class_unless_their_own_quota_says_otherwise(harness_for) -> None:
    """The default max_priority binds users; admins only by a max_priority of their own."""
    h: Harness = harness_for(quota={"max_priority": "high"})
    root = Caller("root", admin=True)
    receiver = h.engine.receiver
    assert receiver.submit(chat(priority="critical"), root, h.now).request.priority == "critical"
    with pytest.raises(QuotaForbidden):
        h.submit(chat(priority="critical"))
    assert h.router.quotas.quota_for("root", admin=True).max_priority == "critical"
    assert h.router.quotas.quota_for("alice").max_priority == "high"
    h.router.quotas.set_override("root", {"max_priority": "normal"})
    with pytest.raises(QuotaForbidden):
        receiver.submit(chat(priority="high"), root, h.now)
    h.router.quotas.set_override("root", {})
    assert receiver.submit(chat(priority="critical"), root, h.now).created


def test_an_admins_configured_max_priority_applies(harness_for) -> None:
    """quotas.users.<admin>.max_priority in the configuration binds that admin."""
    h: Harness = harness_for(
        quotas={
            "default": {**UNLIMITED_QUOTA, "max_priority": "high"},
            "users": {"root": {"max_priority": "normal"}},
        }
    )
    root = Caller("root", admin=True)
    with pytest.raises(QuotaForbidden):
        h.engine.receiver.submit(chat(priority="high"), root, h.now)
    assert h.engine.receiver.submit(chat(priority="normal"), root, h.now).created
    assert h.router.quotas.quota_for("root", admin=True).max_priority == "normal"


def test_gpu_seconds_quota_refuses_once_the_hour_is_used_up(harness_for) -> None:
    """A user whose hour of GPU-seconds is spent is refused until the oldest charge ages out."""
    h: Harness = harness_for(quota={"gpu_seconds_per_hour": 30})
    first = h.submit(chat(shape=Shape(1, 100, 2000)))
    duration = first.estimate.typical_duration_s
    assert 20 < duration < 30
    h.finish(first, gpu_seconds=30.0)
    with pytest.raises(QuotaExceeded) as info:
        h.submit(chat())
    assert info.value.quota == "gpu_seconds_per_hour"
    assert str(info.value) == "you used 30 of 30 GPU-seconds in the last hour"
    assert info.value.retry_after_s == pytest.approx(3600.0, abs=1)
    with pytest.raises(QuotaForbidden) as forbidden:
        h.submit(chat(shape=Shape(1, 100, 4000)), user="bob")
    assert forbidden.value.quota == "gpu_seconds_per_hour"
    assert str(forbidden.value).endswith("GPU-seconds; your hourly limit is 30")


def test_gpu_seconds_quota_holds_requests_in_the_queue_at_dispatch(harness_for) -> None:
    """A request whose estimate would pass the hour's budget starts when the first charge ages out.

    Both requests outlive the hour, so the second can only wait for the budget: it is still
    queued a second before the first one's charge is an hour old, and dispatched at that moment.
    """
    h: Harness = harness_for(quota={"gpu_seconds_per_hour": 40})
    first = h.submit(chat(shape=Shape(1, 100, 2000), timeout_s=7200))
    second = h.submit(chat(shape=Shape(1, 100, 2000), timeout_s=7200))
    assert h.status(first) == "dispatching"
    assert h.status(second) == "queued"
    h.advance(3599)
    assert h.status(second) == "queued"
    h.advance(1)
    assert h.status(second) == "dispatching"
    assert h.dispatch_of(second).request.dispatched_at == first.created_at + 3600


def test_a_quota_wait_that_is_over_leaves_no_wakeup_in_the_past(harness_for) -> None:
    """Once the request waiting for GPU-seconds is gone, the core asks for no tick that is due.

    A wakeup left at a time already passed would have the runtime's timer tick without pause.
    """
    h: Harness = harness_for(quota={"gpu_seconds_per_hour": 40})
    h.submit(chat(shape=Shape(1, 100, 2000), timeout_s=7200))
    second = h.submit(chat(shape=Shape(1, 100, 2000), timeout_s=7200))
    assert h.status(second) == "queued"  # until the budget frees, an hour from now
    h.apply(h.router.cancel(second.id, h.now))
    h.advance(3600)
    wakeup = h.router.next_wakeup()
    assert wakeup is None or wakeup > h.now


def test_estimate_dry_run_stores_nothing_and_lists_fitting_gpus(harness_for) -> None:
    """The dry run validates and estimates, names the GPUs that could take it, queues nothing."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1), ("L4-24GB", 1)])
    report = h.engine.receiver.estimate(chat(shape=Shape(1, 2000, 500)), Caller("alice"), h.now)
    assert report.estimate.gpu_memory_mb > report.estimate.weights_mb
    assert report.fits_now == ["sim:0", "sim:1"]
    big = h.engine.receiver.estimate(chat(shape=Shape(8, 6000, 1000)), Caller("alice"), h.now)
    assert big.fits_now == ["sim:0"]
    assert _nothing_stored(h)
    assert h.admitted("alice") == 0


def test_refused_request_does_not_count_against_the_rate(harness_for) -> None:
    """A request refused for another reason leaves the user's rate window untouched."""
    h: Harness = harness_for(quota={"requests_per_minute": 1, "max_priority": "normal"})
    with pytest.raises(QuotaForbidden):
        h.submit(chat(priority="critical"))
    assert h.admitted("alice") == 0
    h.submit(chat())


def test_embedding_and_completion_defaults(harness_for) -> None:
    """The model's own task applies when none is given, and its shape is counted from the input."""
    h: Harness = harness_for()
    embedding = h.submit(Submission(model="all-minilm-l6-v2", input={"input": ["a", "bb"]}))
    assert embedding.task is Task.EMBEDDING and embedding.shape.batch_size == 2
    completion = h.submit(Submission(model="tinyllama-1.1b", input={"prompt": "hi"}))
    assert completion.task is Task.COMPLETION


def test_settings_default_priority_and_timeout_apply() -> None:
    """A request naming no class or timeout gets the configured defaults."""
    settings = make_settings(priorities={"default": "low"}, server={"default_timeout_s": 99})
    h = Harness(settings)
    request = h.submit(chat())
    assert request.priority == "low"
    assert request.timeout_s == 99


def test_a_restarted_router_keeps_the_quota_windows_and_the_overrides(harness_for) -> None:
    """The minute's admissions, the hour's GPU-seconds and run-time overrides come back.

    They are loaded from what the store kept with the status changes (and the override the
    driver persisted); a minute later the rate window has emptied.
    """
    h: Harness = harness_for(quota={"requests_per_minute": 2, "gpu_seconds_per_hour": 1000})
    first = h.submit(chat())
    h.finish(first, gpu_seconds=600.0)
    h.submit(chat())
    h.router.quotas.set_override("bob", {"max_priority": "low"})
    h.store.write([OverrideChange("bob", {"max_priority": "low"})])
    used = h.charged("alice")
    assert used > 600.0
    restarted = Harness(h.settings, store=h.store, now=h.now + 1)
    assert restarted.charged("alice") == pytest.approx(used)
    assert restarted.admitted("alice") == 2
    assert restarted.router.quotas.quota_for("bob").max_priority == "low"
    with pytest.raises(QuotaExceeded) as info:
        restarted.submit(chat())
    assert info.value.quota == "requests_per_minute"
    with pytest.raises(QuotaForbidden):
        restarted.submit(chat(priority="high"), user="bob")
    later = Harness(h.settings, store=h.store, now=h.now + 61)
    assert later.admitted("alice") == 0
    assert later.charged("alice") == pytest.approx(used)
    later.submit(chat())
    assert later.admitted("alice") == 1

"""The core's side of routers sharing a store: what others hold, and a refused claim.

Driven by hand through :class:`Harness` (the real core, a memory store): the store's refusals
and views are fed in as the runtime feeds them. A hypothesis property checks what another
router's waiting request of a higher class keeps against any of this router's lower ones.
"""

from __future__ import annotations

import hypothesis.strategies as st
from core_harness import Harness
from hypothesis import given, settings

from gpu_request_router.core.events import CancelExecution
from gpu_request_router.core.load_balancer import Chosen, Need
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.core.state_store import Charge, QueueHead, StateChange
from gpu_request_router.models.request import RequestStatus, ResourceHints
from gpu_request_router.testing import chat, make_settings

S = RequestStatus
BIG = ResourceHints(gpu_memory_mb=50_000)  # one at a time on an H100-80GB
ALICE = Caller("alice")


def test_a_dispatch_carries_its_claim_and_a_creation_its_limits(harness_for) -> None:
    """What a shared store checks: the limits at creation, MiB, limit and slots at dispatch."""
    h: Harness = harness_for(
        gpus=[("H100-80GB", 1)], slots=3, quota={"requests_per_minute": 7, "max_concurrent": 2}
    )
    decisions = h.engine.receiver.submit(chat(resources=BIG), ALICE, h.now).decisions
    changes = [d for d in decisions if isinstance(d, StateChange)]
    created, dispatched = changes
    assert created.limits is not None and created.limits.requests_per_minute == 7
    assert created.claim is None
    claim = dispatched.claim
    assert claim is not None and claim.max_concurrent == 2
    ((gpu_id, memory_mb, limit, slots),) = claim.gpus
    gpu = h.router.monitor.gpus[gpu_id]
    assert memory_mb == 50_000 and slots == 3
    assert limit == gpu.memory_total_mb - h.settings.placement.memory_safety_margin_mb


def test_a_dispatch_claims_its_gpu_seconds_against_the_users_hour(harness_for) -> None:
    """The claim carries the user's GPU-seconds per hour; the dispatch's change, its charge."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], quota={"gpu_seconds_per_hour": 500.0})
    decisions = h.engine.receiver.submit(chat(), ALICE, h.now).decisions
    created, dispatched = (d for d in decisions if isinstance(d, StateChange))
    h.apply(decisions)
    request = created.request
    assert dispatched.claim is not None and dispatched.charge is not None
    assert dispatched.claim.gpu_seconds_per_hour == 500.0
    assert dispatched.charge.gpu_seconds > 0  # what the store checks against the hour
    assert dispatched.charge.charge_id == h.dispatch_of(request).execution_id


def test_charges_of_other_routers_hold_work_back_until_they_are_settled_lower(
    harness_for,
) -> None:
    """Alice's hour is full with another router's charge: her request waits, named as waiting.

    The view says the charge was settled lower (same id, new amount): the request starts, and
    alice no longer waits for the quota.
    """
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], quota={"gpu_seconds_per_hour": 100.0})
    full = Charge("alice", "exe_other_1", h.now, 99.99)  # admitted, but no dispatch fits
    h.apply(h.router.shared_view({}, {}, h.now, charges=[full]))
    waiting = h.submit(chat())
    assert h.status(waiting) == "queued"
    assert h.router.waiting_for_gpu_seconds == {"alice"}
    settled = Charge("alice", "exe_other_1", h.now, 1.0)
    h.apply(h.router.shared_view({}, {}, h.now, charges=[settled]))
    assert h.status(waiting) == "dispatching"
    assert h.router.waiting_for_gpu_seconds == frozenset()


def test_what_other_routers_hold_comes_off_the_room_and_keeps_work_queued(harness_for) -> None:
    """Another router's 50 GB on the one GPU: a 50 GB request waits until they are released."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    gpu_id = next(iter(h.router.monitor.gpus))
    room = h.router.monitor.gpus[gpu_id].room_mb
    h.apply(h.router.shared_view({gpu_id: {"req_other": 50_000}}, {}, h.now))
    state = h.router.monitor.gpus[gpu_id]
    assert (state.room_mb, state.elsewhere_mb, state.elsewhere_slots) == (room - 50_000, 50_000, 1)
    waiting = h.submit(chat(resources=BIG))
    assert h.status(waiting) == "queued"
    h.apply(h.router.shared_view({gpu_id: {}}, {}, h.now))  # released elsewhere
    assert h.status(waiting) == "dispatching"
    assert h.router.monitor.gpus[gpu_id].room_mb == room - 50_000  # now its own


def test_own_reservations_in_the_ledger_are_not_counted_twice(harness_for) -> None:
    """The ledger lists this router's own executions too: they are not 'elsewhere'."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    mine = h.submit(chat(resources=BIG))
    gpu_id = h.dispatch_of(mine).placement.gpu_ids[0]
    h.apply(h.router.shared_view({gpu_id: {mine.id: 50_000}}, {}, h.now))
    assert h.router.monitor.gpus[gpu_id].elsewhere_mb == 0


def test_slots_held_elsewhere_count_against_max_concurrent(harness_for) -> None:
    """Two slots of alice held through other routers (max 2): her request here waits for one."""
    h: Harness = harness_for(gpus=[("H100-80GB", 2)], quota={"max_concurrent": 2})
    h.apply(h.router.shared_view({}, {"alice": {"req_a", "req_b"}}, h.now))
    waiting = h.submit(chat())
    assert h.status(waiting) == "queued"
    h.apply(h.router.shared_view({}, {"alice": {"req_a"}}, h.now))
    assert h.status(waiting) == "dispatching"


def test_a_refused_claim_requeues_without_counting_the_attempt(harness_for) -> None:
    """The store refused the dispatch: back to the queue, attempt 0, reservation and slot freed."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    request = h.submit(chat(resources=BIG))
    dispatch = h.dispatch_of(request)
    gpu_id = dispatch.placement.gpu_ids[0]
    # What the refusal says the others hold comes first, so that the pass does not retry there.
    h.apply(h.router.shared_view({gpu_id: {"req_other": 50_000}}, {}, h.now))
    decisions = h.apply(h.router.claim_refused(dispatch.execution_id, "GPU full", h.now))
    assert h.status(request) == "queued"
    live = h.router.get(request.id)
    assert live is not None and live.attempts == 0
    assert live.error is not None and live.error.type == "placement_conflict"
    assert h.router.execution_of(request.id) is None
    assert h.router.monitor.gpus[gpu_id].running == {}
    assert h.router.active_count("alice") == 0
    changes = [d for d in decisions if isinstance(d, StateChange)]
    assert changes[0].entry.detail == "placement_conflict: GPU full"
    assert changes[0].charge is not None and changes[0].charge.gpu_seconds == 0.0
    h.apply(h.router.shared_view({gpu_id: {}}, {}, h.now))
    again = h.dispatch_of(request)
    assert again.attempt == 1 and h.status(request) == "dispatching"


def test_a_stale_refusal_changes_nothing(harness_for) -> None:
    """A refusal for an execution the core no longer runs (ended meanwhile) is ignored."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    request = h.submit(chat())
    execution_id = h.dispatch_of(request).execution_id
    h.finish(request)
    assert h.router.claim_refused(execution_id, "late", h.now) == []


def test_a_synchronous_request_of_a_dead_router_ends_instead_of_running(harness_for) -> None:
    """Recovered (adopted) synchronous requests end router_lost; async ones queue again."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    running = h.engine.receiver.submit(chat(), ALICE, h.now, synchronous=True)
    h.apply(running.decisions)
    queued = h.engine.receiver.submit(
        chat(resources=ResourceHints(gpu_memory_mb=70_000)), ALICE, h.now, synchronous=True
    )
    h.apply(queued.decisions)
    plain = h.submit(chat(resources=ResourceHints(gpu_memory_mb=70_000)))
    adopter = Harness(h.settings, store=h.store, now=h.now + 10)
    recovery = adopter.recover()
    ended = {r.id: adopter.store.get_request(r.id) for r in (running.request, queued.request)}
    assert ended[running.request.id].status is S.FAILED
    assert ended[queued.request.id].status is S.CANCELLED
    assert all(r.error is not None and r.error.type == "router_lost" for r in ended.values())
    assert adopter.router.get(running.request.id) is None
    stopped = {d.request_id for d in recovery.decisions if isinstance(d, CancelExecution)}
    assert running.request.id in stopped  # its execution is told to stop
    assert adopter.status(plain) in ("queued", "dispatching")


def test_a_gpu_held_elsewhere_takes_nothing_here_and_an_older_wait_may_hold_it(
    harness_for,
) -> None:
    """Another router holds the one GPU for a starving request: nothing more is placed there.

    A request here that has waited longer than theirs may hold it in turn (the store then gives
    the GPU to the longest wait); a younger one may not.
    """
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], placement={"starvation_bound_s": 1.0})
    gpu_id = next(iter(h.router.monitor.gpus))
    # Others hold 60 GB there: a 50 GB request cannot fit until they drain.
    h.apply(h.router.shared_view({gpu_id: {"req_other": 60_000}}, {}, h.now))
    old = h.submit(chat(resources=BIG))
    h.now += 0.5
    small = h.submit(chat(resources=ResourceHints(gpu_memory_mb=10_000)))
    assert h.status(small) == "dispatching"  # room for it, nobody holds the GPU yet
    h.finish(small)
    h.apply(h.router.shared_view({}, {}, h.now, held={gpu_id: old.created_at + 0.1}))
    another = h.submit(chat(resources=ResourceHints(gpu_memory_mb=10_000)))
    assert h.status(another) == "queued"  # held elsewhere: nothing is placed there
    h.advance(2.0)  # old has starved past the bound, and waited longer than their request
    assert h.router.holds_to_share() == {gpu_id: (old.id, old.created_at)}
    h.apply(h.router.shared_view({}, {}, h.now, held={gpu_id: old.created_at - 0.1}))
    assert h.router.holds_to_share() == {}  # theirs waits longer: this router gives it up


def waiting_head(request_id: str, key: float, memory_mb: int) -> QueueHead:
    """Another router's request of sort key ``key`` waiting for ``memory_mb`` on one GPU."""
    return QueueHead(request_id, key, Need(model="llama-3-8b", memory_mb=memory_mb, exact=True))


def test_a_better_ranked_request_waiting_elsewhere_keeps_its_room_from_lower_ones(
    harness_for,
) -> None:
    """The one GPU frees; another router's 50 GB request ranks first: its room is kept for it.

    What it needs is kept, where it would go; the rest of the GPU still takes work. Only a
    better priority level (class with aging) keeps room: not one of the same level, however
    long it waited, nor one below. A head that holds a reservation in the ledger
    was placed since, and keeps nothing more.
    """
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    gpu_id = next(iter(h.router.monitor.gpus))
    forty, twenty = ResourceHints(gpu_memory_mb=40_000), ResourceHints(gpu_memory_mb=20_000)
    h.apply(h.router.shared_view({gpu_id: {"req_busy": 70_000}}, {}, h.now))
    mine = h.submit(chat(resources=forty, priority="low"))
    assert h.status(mine) == "queued"
    key = h.router.queue.key(mine)
    aging = h.settings.priorities.aging_seconds
    higher = waiting_head("req_high", key - aging, 50_000)  # one class above, as old
    # The GPU frees: their better-ranked request would fit there; 40 GB more would not.
    h.apply(h.router.shared_view({gpu_id: {}}, {}, h.now, heads=[higher]))
    assert h.status(mine) == "queued"
    state = h.router.monitor.gpus[gpu_id]
    assert state.room_mb >= 50_000 and state.aside_mb == 0  # kept during the pass only
    beside = h.submit(chat(resources=twenty, priority="low"))
    assert h.status(beside) == "dispatching"  # 20 GB fits beside what is kept
    h.finish(beside)
    # Their request was placed (30 GB in the ledger): it keeps nothing more, and 40 GB fits.
    placed = {gpu_id: {"req_high": 30_000}}
    h.apply(h.router.shared_view(placed, {}, h.now, heads=[higher]))
    assert h.status(mine) == "dispatching"
    h.finish(mine)
    h.apply(h.router.shared_view({gpu_id: {}}, {}, h.now, heads=[]))

    # A head of the same level keeps nothing, however long it waited (each router keeps its
    # own order within a level); nor does one of a lower level.
    again = h.submit(chat(resources=forty, priority="low"))
    earlier = waiting_head("req_earlier", h.router.queue.key(again) - 30.0, 50_000)
    lower = waiting_head("req_lower", h.router.queue.key(again) + aging, 50_000)
    h.finish(again)
    h.apply(h.router.shared_view({gpu_id: {}}, {}, h.now, heads=[earlier, lower]))
    last = h.submit(chat(resources=forty, priority="low"))
    assert h.status(last) == "dispatching"


def test_a_pass_shares_its_requests_waiting_for_room_one_per_shape(harness_for) -> None:
    """What the others keep room for: requests that fit nowhere now, not those held by quota."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)], quota={"max_concurrent": 1})
    running = h.submit(chat(resources=BIG))
    capped = h.submit(chat())  # alice's second waits for her quota, not for room
    first = h.submit(chat(resources=BIG), user="bob")
    h.submit(chat(resources=BIG), user="bob")  # the same shape: one head stands for both
    other = h.submit(chat(resources=ResourceHints(gpu_memory_mb=40_000)), user="bob")
    assert h.status(capped) == h.status(first) == "queued"
    heads = h.router.heads_to_share()
    assert [head.request_id for head in heads] == [first.id, other.id]
    assert heads[0].key == h.router.queue.key(first) and heads[0].need.memory_mb == 50_000
    h.finish(running)
    assert h.status(first) == "dispatching"
    assert first.id not in [head.request_id for head in h.router.heads_to_share()]


def test_explain_names_what_other_routers_keep_from_a_waiting_request(harness_for) -> None:
    """A request kept off the GPU by another router's hold, or by its higher class, says so."""
    h: Harness = harness_for(gpus=[("H100-80GB", 1)])
    gpu_id = next(iter(h.router.monitor.gpus))
    forty = ResourceHints(gpu_memory_mb=40_000)
    h.apply(h.router.shared_view({gpu_id: {}}, {}, h.now, held={gpu_id: h.now - 100.0}))
    held = h.submit(chat(resources=forty, priority="low"))
    waiting = h.router.explain(held, h.now).waiting
    assert waiting is not None and waiting.blocked_by == "starvation_hold"
    assert "held for an older request of another router" in waiting.detail
    key = h.router.queue.key(held)
    above = waiting_head("req_high", key - h.settings.priorities.aging_seconds, 50_000)
    h.apply(h.router.shared_view({gpu_id: {}}, {}, h.now, held={}, heads=[above]))
    assert h.status(held) == "queued"
    waiting = h.router.explain(held, h.now).waiting
    assert waiting is not None and waiting.blocked_by == "priority"
    assert "other routers keep room for 1 of a higher priority" in waiting.detail


MIB = st.sampled_from([10_000, 20_000, 30_000, 40_000, 50_000])


@settings(max_examples=60, deadline=None)
@given(
    gpus=st.integers(1, 3),
    busy=st.lists(st.sampled_from([0, 20_000, 40_000, 70_000]), min_size=3, max_size=3),
    head_mb=MIB,
    own=st.lists(MIB, max_size=6),
)
def test_requests_of_a_lower_level_never_take_the_room_a_waiting_head_needs(
    gpus: int, busy: list[int], head_mb: int, own: list[int]
) -> None:
    """Property: a higher-class head that fits the fleet still fits it after any own passes.

    Whatever this router's lower-class requests and whatever the others hold, what it places
    leaves the head its room, and nothing stays set aside once a pass ends.
    """
    h = Harness(make_settings(gpus=[("H100-80GB", gpus)]))
    ledger = {
        gpu_id: {f"req_busy_{gpu_id}": mb} if mb else {}
        for gpu_id, mb in zip(h.router.monitor.gpus, busy, strict=False)
    }
    need = Need(model="llama-3-8b", memory_mb=head_mb, exact=True)
    # A head of the "high" class submitted now: it ranks above any "low" request.
    rank = h.settings.priorities.classes.index("high")
    head = QueueHead("req_head", rank * h.settings.priorities.aging_seconds + h.now, need)
    h.apply(h.router.shared_view(ledger, {}, h.now, heads=[head]))
    fits_at_first = fits(h, need)
    for mb in own:
        h.submit(chat(resources=ResourceHints(gpu_memory_mb=mb), priority="low"))
        assert all(g.aside_mb == g.aside_slots == 0 for g in h.router.monitor.gpus.values())
    if fits_at_first:
        assert fits(h, need)


def fits(h: Harness, need: Need) -> bool:
    """Whether ``need`` fits a GPU of the harness's fleet now (as the balancer places it)."""
    return isinstance(h.router.balancer.place(need, h.router.monitor.index, learn=False), Chosen)

"""The queue: aged priority levels, fair share between users, lazy ordered iteration."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_request_router.core.priority_manager import PriorityManager
from gpu_request_router.models.request import Estimate, Request, Task

CLASSES = ["critical", "high", "normal", "low", "batch"]
_ESTIMATE = Estimate(
    gpu_memory_mb=1, weights_mb=0, kv_cache_mb=1, activations_mb=0, duration_s={"H100-80GB": 1.0}
)
_ids = iter(range(10**9))
# Most requests share a class, so that users often meet on one level and fair share decides.
SAME_CLASS_OFTEN = ["normal", "normal", "normal", *CLASSES]


def _request(user: str = "u", priority: str = "normal", created_at: float = 0.0) -> Request:
    return Request(
        id=f"req_{next(_ids):06d}",
        user=user,
        model="m",
        task=Task.GENERIC,
        priority=priority,
        estimate=_ESTIMATE,
        created_at=created_at,
    )


def _order(queue: PriorityManager, now: float) -> list[str]:
    return [request.id for request in queue.candidates(now)]


class DocumentedOrder:
    """The dispatch order as docs/architecture.md states it, kept apart from the code under test.

    A request of class rank *k* submitted at *t0* has at *t* the level
    ``k − floor((t − t0) / aging_s)``; lower levels go first. Within a level the user with the
    smallest fair-share counter goes first, a user's own requests in ``key = k·aging_s + t0``
    order (and, for equal counters, the earlier key). Each dispatch adds the request's cost to
    its user's counter; a user who becomes backlogged is lifted to the smallest counter among
    the backlogged users or, when nobody waits, to the largest counter a dispatch was charged
    from. Times must be exact in binary floating point (e.g. on a quarter-second grid).
    """

    def __init__(self, aging_s: float) -> None:
        self.aging_s = aging_s
        self.queued: dict[str, tuple[Request, float]] = {}
        self.counters: dict[str, float] = {}
        self.served_from = 0.0

    def push(self, request: Request, cost: float) -> None:
        """Queue ``request``, lifting its user if it was idle."""
        backlogged = {queued.user for queued, _ in self.queued.values()}
        if request.user not in backlogged:
            floor = min((self.counters[user] for user in backlogged), default=self.served_from)
            self.counters[request.user] = max(self.counters.get(request.user, 0.0), floor)
        self.queued[request.id] = (request, cost)

    def dispatched(self, request_id: str) -> None:
        """Take a request out as dispatched and charge its cost to its user."""
        request, cost = self.queued.pop(request_id)
        self.served_from = max(self.served_from, self.counters[request.user])
        self.counters[request.user] += cost

    def remove(self, request_id: str) -> None:
        """Take a request out without charging anyone."""
        del self.queued[request_id]

    def rank(self, request_id: str, now: float) -> tuple[int, float, float]:
        """(level, counter, key) of a queued request at ``now``: smaller goes first."""
        request, _ = self.queued[request_id]
        k = CLASSES.index(request.priority)
        level = k - math.floor(Fraction(now - request.created_at) / Fraction(self.aging_s))
        return level, self.counters[request.user], k * self.aging_s + request.created_at

    def check(self, queue: PriorityManager, now: float) -> None:
        """The queue's walk at ``now`` holds every queued request once, in the documented order.

        The counters the queue reports for the waiting users are the documented ones too.
        """
        walk = [request.id for request in queue.candidates(now)]
        assert sorted(walk) == sorted(self.queued)
        ranks = [self.rank(request_id, now) for request_id in walk]
        assert ranks == sorted(ranks), "not in (level, counter, key) order"
        waiting = {request.user for request, _ in self.queued.values()}
        assert {user: queue.counter(user) for user in waiting} == {
            user: self.counters[user] for user in waiting
        }


def test_higher_class_first_then_submission_order() -> None:
    """Without waiting, classes go highest first and a user's requests keep their order."""
    queue = PriorityManager(CLASSES, aging_s=60)
    low = _request(priority="low", created_at=0)
    first = _request(created_at=1)
    second = _request(created_at=2)
    critical = _request(priority="critical", created_at=3)
    for request in (low, second, first, critical):
        queue.push(request, cost=1)
    assert _order(queue, now=3) == [critical.id, first.id, second.id, low.id]


def test_each_full_aging_period_lifts_a_request_one_class() -> None:
    """A batch request ranks below a fresh high one until it has waited three aging periods."""
    queue = PriorityManager(CLASSES, aging_s=60)
    old_batch = _request(user="a", priority="batch", created_at=0)
    queue.push(old_batch, cost=1)
    assert queue.level(old_batch, now=0) == 4
    assert queue.level(old_batch, now=59.9) == 4
    assert queue.level(old_batch, now=60) == 3
    assert queue.level(old_batch, now=240) == 0
    early_high = _request(user="b", priority="high", created_at=170)
    queue.push(early_high, cost=1)
    assert _order(queue, now=179) == [early_high.id, old_batch.id]
    queue.remove(early_high.id)
    late_high = _request(user="b", priority="high", created_at=185)
    queue.push(late_high, cost=1)
    assert queue.level(old_batch, 185) == queue.level(late_high, 185) == 1
    assert _order(queue, now=185) == [old_batch.id, late_high.id]


@given(
    rank=st.integers(0, 4),
    created=st.integers(0, 40_000).map(lambda quarters: quarters / 4),
    waited=st.integers(0, 40_000).map(lambda quarters: quarters / 4),
    aging=st.integers(4, 2_400).map(lambda quarters: quarters / 4),
)
def test_level_matches_the_definition(
    rank: int, created: float, waited: float, aging: float
) -> None:
    """The level is rank − floor(waiting / aging_s), exactly, also on the boundaries.

    Times on a quarter-second grid are exact in binary floating point, so the expected level is
    computed in exact rational arithmetic and there is one right answer.
    """
    queue = PriorityManager(CLASSES, aging_s=aging)
    request = _request(priority=CLASSES[rank], created_at=created)
    expected = rank - math.floor(Fraction(waited) / Fraction(aging))
    assert queue.level(request, created + waited) == expected


def test_users_take_turns_by_charged_cost() -> None:
    """Within a level, the user with the smallest counter goes next; dispatch charges the cost."""
    queue = PriorityManager(CLASSES, aging_s=60)
    heavy = [_request(user="heavy", created_at=t) for t in range(10)]
    light = _request(user="light", created_at=20)
    for request in [*heavy, light]:
        queue.push(request, cost=5)
    first = next(iter(queue.candidates(30)))
    assert first.id == heavy[0].id
    queue.dispatched(first.id)
    assert queue.counter("heavy") == 5
    assert _order(queue, 30)[0] == light.id


def test_counters_adapt_during_one_iteration() -> None:
    """Dispatching while iterating re-ranks the charged user for the rest of the pass."""
    queue = PriorityManager(CLASSES, aging_s=60)
    for t in range(3):
        queue.push(_request(user="ann", created_at=t), cost=1)
        queue.push(_request(user="bob", created_at=t + 0.5), cost=1)
    users = []
    for request in queue.candidates(10):
        users.append(request.user)
        queue.dispatched(request.id)
    assert users == ["ann", "bob", "ann", "bob", "ann", "bob"]
    assert len(queue) == 0


def test_user_returning_from_idle_banks_no_credit() -> None:
    """A user who was idle is lifted to the smallest backlogged counter, not left below it.

    busy waits at 30 and light at 4: the returning user starts at 4 (the smallest), neither at
    its own 0 nor at busy's 30.
    """
    queue = PriorityManager(CLASSES, aging_s=60)
    busy = [_request(user="busy", created_at=t) for t in range(5)]
    light = [_request(user="light", created_at=t) for t in range(2)]
    for request in busy:
        queue.push(request, cost=10)
    for request in light:
        queue.push(request, cost=4)
    for request in [*busy[:3], light[0]]:
        queue.dispatched(request.id)
    assert (queue.counter("busy"), queue.counter("light")) == (30, 4)
    returning = _request(user="idle", created_at=6)
    queue.push(returning, cost=10)
    assert queue.counter("idle") == 4


def test_user_returning_when_nobody_waits_is_lifted_to_the_last_served() -> None:
    """With an empty queue a returning user starts from the counter of the user served last."""
    queue = PriorityManager(CLASSES, aging_s=60)
    busy = _request(user="busy")
    queue.push(busy, cost=7)
    queue.dispatched(busy.id)
    again = _request(user="busy", created_at=1)
    queue.push(again, cost=7)
    queue.dispatched(again.id)
    assert queue.counter("busy") == 14
    newcomer = _request(user="new", created_at=2)
    queue.push(newcomer, cost=1)
    assert queue.counter("new") == 7


def test_returning_when_nobody_waits_lifts_to_the_largest_counter_served_from() -> None:
    """With an empty queue, a newcomer's counter is the largest one a dispatch was charged from.

    ann is served from 0 and then from 5, bob (last) from 0: the newcomer starts at 5, not at
    bob's 0 (where he was served) or 3 (his counter now).
    """
    queue = PriorityManager(CLASSES, aging_s=60)
    first, second = _request(user="ann", created_at=0), _request(user="ann", created_at=1)
    bob = _request(user="bob", created_at=2)
    for request, cost in ((first, 5), (second, 5), (bob, 3)):
        queue.push(request, cost=cost)
    for request in (first, second, bob):
        queue.dispatched(request.id)
    assert (queue.counter("ann"), queue.counter("bob")) == (10, 3)
    newcomer = _request(user="cat", created_at=3)
    queue.push(newcomer, cost=1)
    assert queue.counter("cat") == 5


def test_remove_and_depths() -> None:
    """Removing takes a request out without charging; depths count per class."""
    queue = PriorityManager(CLASSES, aging_s=60)
    a = _request(priority="high")
    b = _request(priority="batch")
    queue.push(a, cost=3)
    queue.push(b, cost=3)
    assert queue.depths() == {"critical": 0, "high": 1, "normal": 0, "low": 0, "batch": 1}
    assert queue.remove(a.id) is a
    assert queue.remove(a.id) is None
    assert queue.counter("u") == 0
    assert a.id not in queue and b.id in queue
    assert queue.queued("u") == 1
    assert _order(queue, 0) == [b.id]


def test_bad_pushes_are_refused() -> None:
    """A duplicate id or an unknown class is an error and changes nothing."""
    queue = PriorityManager(CLASSES, aging_s=60)
    request = _request()
    queue.push(request, cost=1)
    with pytest.raises(ValueError, match="queued already"):
        queue.push(request, cost=1)
    with pytest.raises(ValueError, match="unknown priority"):
        queue.push(_request(priority="vip"), cost=1)
    assert len(queue) == 1
    with pytest.raises(ValueError, match="positive"):
        PriorityManager(CLASSES, aging_s=0)


def test_pushing_while_iterating_is_an_error() -> None:
    """The order of an iteration cannot silently go stale: pushing mid-iteration raises."""
    queue = PriorityManager(CLASSES, aging_s=60)
    queue.push(_request(created_at=0), cost=1)
    queue.push(_request(created_at=1), cost=1)
    iterator = queue.candidates(5)
    next(iterator)
    queue.push(_request(created_at=2), cost=1)
    with pytest.raises(RuntimeError, match="changed"):
        next(iterator)


def test_users_going_idle_and_coming_back_leave_no_garbage() -> None:
    """Fifty users each sending one request at a time: a drained queue holds nothing stale.

    Every push files the user's counter anew; those of users gone idle must be dropped, which
    needs the count of users with work waiting to go down as each goes idle.
    """
    queue = PriorityManager(CLASSES, aging_s=60)
    for step in range(5_000):
        queue.push(_request(user=f"u{step % 50}", created_at=step), cost=1)
        queue.dispatched(next(iter(queue.candidates(step))).id)
    assert len(queue) == 0
    assert len(queue._counters) <= 64 + 1
    assert sum(len(user.heap) for user in queue._users.values()) <= 64 + 1


def test_compacting_around_a_waiting_backlog_keeps_every_waiting_request() -> None:
    """Compaction drops what was taken and nothing that waits: a backlog stays whole, in order.

    Of 300 requests of one user, 250 behind the first are cancelled: the removed entries sit
    inside the user's heap and outnumber the waiting ones, so the next push rebuilds the heaps.
    """
    queue = PriorityManager(CLASSES, aging_s=60)
    backlog = [_request(user="ann", created_at=float(step)) for step in range(300)]
    for request in backlog:
        queue.push(request, cost=1)
    for request in backlog[1:251]:
        queue.remove(request.id)
    late = _request(user="bob", created_at=300.0)
    queue.push(late, cost=1)
    kept = [backlog[0], *backlog[251:]]
    assert sorted(_order(queue, 300.0)) == sorted(request.id for request in [*kept, late])
    assert [r for r in _order(queue, 300.0) if r != late.id] == [r.id for r in kept]


@pytest.mark.parametrize("aging_s", [60, 10**7])
def test_long_churn_keeps_internal_heaps_bounded(aging_s: int) -> None:
    """Many push/dispatch cycles leave no unbounded garbage behind (lazy deletion compacts).

    With slow aging no level crossing ever falls due: only compaction bounds them.
    """
    queue = PriorityManager(CLASSES, aging_s=aging_s)
    for step in range(20_000):
        request = _request(user=f"u{step % 7}", created_at=step)
        queue.push(request, cost=1)
        if step % 3:
            head = next(iter(queue.candidates(step)))
            queue.dispatched(head.id)
    live = len(queue)
    assert live == 20_000 - sum(1 for step in range(20_000) if step % 3)
    filed = sum(len(bucket) for bucket in queue._buckets.values())
    assert queue._bucketed == filed <= 2 * 7 + 64, "counted as filed, and compacted"
    assert len(queue._crossings) <= 2 * 7 + 64
    assert sum(len(user.heap) for user in queue._users.values()) <= 2 * live + 64 + 7
    assert len(_order(queue, 20_000)) == live


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "push", "push", "remove", "dispatch"]),
            st.sampled_from(["ann", "bob", "cat"]),
            st.sampled_from(SAME_CLASS_OFTEN),
            st.integers(0, 2_000).map(lambda quarters: quarters / 4),
        ),
        max_size=60,
    ),
    now=st.integers(2_000, 4_000).map(lambda quarters: quarters / 4),
)
def test_iteration_order_is_level_then_counter_then_key(
    ops: list[tuple[str, str, str, float]], now: float
) -> None:
    """Without dispatches, candidates() yields the whole queue in the documented order.

    The order is checked against :class:`DocumentedOrder`, which restates the rule, not against
    the queue's own ``level``, ``counter`` and ``key``.
    """
    queue = PriorityManager(CLASSES, aging_s=60)
    oracle = DocumentedOrder(aging_s=60)
    for op, user, priority, created in ops:
        if op == "push":
            request = _request(user, priority, created)
            cost = created % 7 + 1
            queue.push(request, cost=cost)
            oracle.push(request, cost)
        elif oracle.queued:
            victim = sorted(oracle.queued)[int(created) % len(oracle.queued)]
            if op == "remove":
                queue.remove(victim)
                oracle.remove(victim)
            else:
                queue.dispatched(victim)
                oracle.dispatched(victim)
    oracle.check(queue, now)


def test_assumed_dispatch_orders_like_serving_without_changing_anything() -> None:
    """With assume_dispatched the walk charges counters as it goes, but only for itself."""
    queue = PriorityManager(CLASSES, aging_s=60)
    ann = [_request(user="ann", created_at=t) for t in range(3)]
    bob = _request(user="bob", created_at=5)
    for request in [*ann, bob]:
        queue.push(request, cost=2)
    plain = [r.id for r in queue.candidates(10)]
    assert plain == [ann[0].id, ann[1].id, ann[2].id, bob.id], "counters tie: key order"
    served = [r.id for r in queue.candidates(10, assume_dispatched=True)]
    assert served == [ann[0].id, bob.id, ann[1].id, ann[2].id]
    assert queue.counter("ann") == queue.counter("bob") == 0
    assert [r.id for r in queue.candidates(10)] == plain


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "push", "dispatch_head", "remove", "walk", "walk"]),
            st.sampled_from(["ann", "bob", "cat", "dan"]),
            st.sampled_from(SAME_CLASS_OFTEN),
            # Steps of whole aging periods land exactly on level boundaries.
            st.one_of(
                st.integers(0, 4).map(lambda n: n * 60.0),
                st.integers(0, 800).map(lambda quarters: quarters / 4),
            ),
        ),
        max_size=80,
    ),
    backwards=st.booleans(),
)
def test_order_stays_exact_as_time_passes_and_users_are_served(
    ops: list[tuple[str, str, str, float]], backwards: bool
) -> None:
    """Across walks at later (or, once, earlier) times, each walk is in the documented order.

    The buckets follow requests across level boundaries by their crossing times; any stale
    bucket would show up as a walk out of the order :class:`DocumentedOrder` computes.
    """
    queue = PriorityManager(CLASSES, aging_s=60)
    oracle = DocumentedOrder(aging_s=60)
    now = 1_000.0
    for op, user, priority, amount in ops:
        if op == "push":
            request = _request(user, priority, now - amount)
            cost = amount % 5 + 1
            queue.push(request, cost=cost)
            oracle.push(request, cost)
        elif op == "walk":
            now += amount
            if backwards and amount > 150:
                now -= 2 * amount
            oracle.check(queue, now)
        elif len(queue):
            head = next(queue.candidates(now))
            assert oracle.rank(head.id, now) == min(oracle.rank(i, now) for i in oracle.queued)
            if op == "dispatch_head":
                queue.dispatched(head.id)
                oracle.dispatched(head.id)
            else:
                queue.remove(head.id)
                oracle.remove(head.id)

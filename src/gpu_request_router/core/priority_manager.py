"""The queue: priority classes with aging, fair share between users, O(log n) operations.

**Order.** A queued request ``r`` of class rank ``k`` (0 = highest) submitted at ``t0`` has, at
time ``t``, the *effective level* ``k - floor((t - t0) / aging_s)``: every full ``aging_s`` of
waiting lifts it one class. Lower levels go first. Because
``level = ceil((key - t) / aging_s)`` with the static ``key = k * aging_s + t0``, the order of
levels never needs re-sorting as time passes: a heap on ``key`` serves all times.

**Fair share.** Within one level, users take turns by a virtual counter (VTC, Sheng et al.,
OSDI 2024): the user with the smallest counter goes first, and each dispatch adds the request's
estimated GPU cost to its user's counter. A user who becomes backlogged again is lifted to the
smallest counter among the backlogged users (or, when none is, to the largest counter a dispatch
has been charged from), so idle time banks no credit and a heavy user cannot starve a light one.
A user's own requests keep their ``key`` order; between users of equal counters the earlier
``key`` goes first.

**Cost.** ``push``, ``dispatched`` and ``remove`` are O(log n). The users with queued work are
kept in buckets by the level of their first request, each bucket a heap on the fair-share
counter, so the walk never has to look at every user of a level to find the next one; a heap of
*crossing times* moves a user to the next bucket when its first request ages past a level
boundary (each user once per ``aging_s``). ``candidates()`` yields the queue in dispatch order
lazily, O(log n) per item, so a dispatch pass that looks at ``d`` requests costs O(d log n)
however deep the queue is and however many users wait.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpu_request_router.models.request import Request

__all__ = ["PriorityManager"]

_HeapItem = tuple[float, int, str]
"""An entry of a user's heap: (key, sequence number, request id)."""
_BucketItem = tuple[float, float, int, int, str]
"""An entry of a level's bucket: (counter, key, sequence number, user version, user)."""
_Crossing = tuple[float, int, str]
"""When a user's first request ages into the next level: (time, user version, user)."""


def _ascending(heap: list[Any]) -> Iterator[Any]:
    """Yield a heap's items in ascending order without changing the heap."""
    if not heap:
        return
    size = len(heap)
    frontier: list[tuple[Any, int]] = [(heap[0], 0)]
    while frontier:
        item, index = heapq.heappop(frontier)
        yield item
        for child in (2 * index + 1, 2 * index + 2):
            if child < size:
                heapq.heappush(frontier, (heap[child], child))


@dataclass(slots=True)
class _UserQueue:
    """One user's queued requests (a heap on key, with lazily removed entries) and counter.

    ``version`` changes whenever the user's bucket entry is replaced; entries of older versions
    (in the buckets and the crossing heap) are stale and skipped. ``level`` is the bucket the
    current entry is in.
    """

    heap: list[_HeapItem] = field(default_factory=list)
    live: int = 0
    counter: float = 0.0
    version: int = 0
    level: int | None = None


@dataclass(slots=True)
class _Entry:
    request: Request
    key: float
    seq: int
    cost: float


class PriorityManager:
    """Orders queued requests by aged priority, then fair share between users.

    Example::

        queue = PriorityManager(["high", "normal", "batch"], aging_s=60)
        queue.push(request, cost=12.0)
        for candidate in queue.candidates(now):
            if fits(candidate):
                queue.dispatched(candidate.id)
    """

    def __init__(self, classes: Sequence[str], aging_s: float) -> None:
        if aging_s <= 0:
            raise ValueError("aging_s must be positive")
        self._rank = {name: rank for rank, name in enumerate(classes)}
        self._aging_s = aging_s
        self._entries: dict[str, _Entry] = {}
        self._users: dict[str, _UserQueue] = {}
        self._counters: list[_HeapItem] = []
        self._depth = dict.fromkeys(classes, 0)
        self._seq = itertools.count()
        self._virtual_time = 0.0
        self._generation = 0
        self._removed = 0
        self._backlogged = 0
        # Users bucketed by the level of their first request at ``_now``: level -> heap.
        self._buckets: dict[int, list[_BucketItem]] = {}
        self._bucketed = 0
        self._crossings: list[_Crossing] = []
        self._dirty: set[str] = set()
        self._now: float | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    # Keys and levels ---------------------------------------------------------------------------

    def key(self, request: Request) -> float:
        """The static sort key: class rank × aging period + submission time."""
        return self._rank[request.priority] * self._aging_s + request.created_at

    def level(self, request: Request, now: float) -> int:
        """The effective class of ``request`` at ``now`` (lower goes first; may be negative)."""
        return self.level_of_key(self.key(request), now)

    def level_of_key(self, key: float, now: float) -> int:
        """The effective class at ``now`` of a request of sort key ``key`` (:meth:`key`)."""
        return math.ceil((key - now) / self._aging_s - 1e-9)

    def _crossing(self, key: float, level: int) -> float:
        """When ``key`` drops below ``level`` (a little early, so rounding never makes it late)."""
        return key - (level - 1 + 1e-6) * self._aging_s

    # Mutations -----------------------------------------------------------------------------------

    def push(self, request: Request, cost: float) -> None:
        """Queue ``request``; ``cost`` is charged to its user's counter when it is dispatched."""
        if request.id in self._entries:
            raise ValueError(f"request {request.id} is queued already")
        if request.priority not in self._rank:
            raise ValueError(f"unknown priority class {request.priority!r}")
        self._generation += 1
        user = self._users.get(request.user)
        if user is None:
            user = self._users[request.user] = _UserQueue()
        if user.live == 0:
            self._backlogged += 1
            user.counter = max(user.counter, self._lift_floor())
            heapq.heappush(self._counters, (user.counter, next(self._seq), request.user))
        key = self.key(request)
        seq = next(self._seq)
        entry = _Entry(request, key, seq, cost)
        self._entries[request.id] = entry
        head = self._head(user)
        heapq.heappush(user.heap, (key, seq, request.id))
        user.live += 1
        if head is None or (key, seq) < head[:2]:
            self._dirty.add(request.user)
        self._depth[request.priority] += 1
        self._compact()

    def dispatched(self, request_id: str) -> Request:
        """Take a request out of the queue because it was dispatched; charge its user's counter."""
        entry = self._take(request_id)
        user = self._users[entry.request.user]
        self._virtual_time = max(self._virtual_time, user.counter)
        user.counter += entry.cost
        if user.live:
            heapq.heappush(self._counters, (user.counter, next(self._seq), entry.request.user))
        return entry.request

    def remove(self, request_id: str) -> Request | None:
        """Take a request out without charging (cancelled, expired); ``None`` if absent."""
        if request_id not in self._entries:
            return None
        return self._take(request_id).request

    def _take(self, request_id: str) -> _Entry:
        # Only marks the user for re-bucketing: a walk in progress may be reading the buckets.
        entry = self._entries.pop(request_id)
        user = self._users[entry.request.user]
        user.live -= 1
        if user.live == 0:
            self._backlogged -= 1
        self._dirty.add(entry.request.user)
        self._depth[entry.request.priority] -= 1
        self._removed += 1
        return entry

    def _lift_floor(self) -> float:
        """The counter a user returning from idle is lifted to."""
        counters = self._counters
        while counters:
            counter, _, name = counters[0]
            user = self._users[name]
            if user.live and user.counter == counter:
                return counter
            heapq.heappop(counters)
        return self._virtual_time

    def _head(self, user: _UserQueue) -> _HeapItem | None:
        """The user's first live entry, dropping removed ones from the top of its heap."""
        heap = user.heap
        while heap and heap[0][2] not in self._entries:
            heapq.heappop(heap)
            self._removed -= 1
        return heap[0] if heap else None

    def _compact(self) -> None:
        """Rebuild a heap once its stale entries outnumber its live ones (amortised O(1))."""
        backlogged = self._backlogged
        if len(self._counters) > 2 * backlogged + 64:
            self._counters = [
                (user.counter, next(self._seq), name)
                for name, user in self._users.items()
                if user.live
            ]
            heapq.heapify(self._counters)
        if self._removed > len(self._entries) + 64:
            for user in self._users.values():
                user.heap = [item for item in user.heap if item[2] in self._entries]
                heapq.heapify(user.heap)
            self._removed = 0

    # Buckets -------------------------------------------------------------------------------------

    def _bucket(self, name: str, user: _UserQueue, now: float) -> None:
        """File the user under the level of its first request at ``now`` (if it has one)."""
        user.version += 1
        user.level = None
        head = self._head(user)
        if head is None:
            return
        key, seq, _ = head
        level = user.level = self.level_of_key(key, now)
        bucket = self._buckets.get(level)
        if bucket is None:
            bucket = self._buckets[level] = []
        heapq.heappush(bucket, (user.counter, key, seq, user.version, name))
        self._bucketed += 1
        heapq.heappush(self._crossings, (self._crossing(key, level), user.version, name))

    def _refresh(self, now: float) -> None:
        """Bring the buckets to ``now``: changed users, and users whose level has dropped."""
        if self._now is None or now < self._now:
            self._rebucket_all(now)
            return
        self._now = now
        crossings, users, dirty = self._crossings, self._users, self._dirty
        while crossings and crossings[0][0] <= now:
            _, version, name = heapq.heappop(crossings)
            if users[name].version == version:
                dirty.add(name)
        if not dirty:
            return
        self._generation += 1
        left: set[int] = set()
        for name in dirty:
            user = users[name]
            if user.level is not None:
                left.add(user.level)
            self._bucket(name, user, now)
        dirty.clear()
        # Stale entries gather at the top of the buckets users left (counters only grow).
        for level in left:
            bucket = self._buckets[level]
            while bucket and users[bucket[0][4]].version != bucket[0][3]:
                heapq.heappop(bucket)
                self._bucketed -= 1
            if not bucket:
                del self._buckets[level]
        backlogged = self._backlogged
        if self._bucketed > 2 * backlogged + 64 or len(crossings) > 2 * backlogged + 64:
            self._rebucket_all(now)

    def _rebucket_all(self, now: float) -> None:
        self._generation += 1
        self._now = now
        self._buckets = {}
        self._bucketed = 0
        self._crossings = []
        self._dirty.clear()
        for name, user in self._users.items():
            self._bucket(name, user, now)

    def _bucket_order(self) -> Iterator[tuple[int, float, float, str]]:
        """Every user's current bucket entry as (level, counter, key, user), ascending."""
        users = self._users
        for level in sorted(self._buckets):
            for counter, key, _, version, name in _ascending(self._buckets[level]):
                if users[name].version == version:
                    yield level, counter, key, name

    # Reading -------------------------------------------------------------------------------------

    def candidates(self, now: float, *, assume_dispatched: bool = False) -> Iterator[Request]:
        """Yield queued requests in dispatch order at time ``now``.

        The consumer may call :meth:`dispatched` or :meth:`remove` between items (the order of the
        rest adapts to the charged counter), but must not :meth:`push` until it is done. With
        ``assume_dispatched``, each yielded request is charged to its user's counter for the
        rest of the walk (nothing is changed): the order in which the queue would be served if
        everything fitted, i.e. the queue positions.
        """
        self._refresh(now)
        generation = self._generation
        entries = self._entries
        charged: dict[str, float] = {}
        heads = self._bucket_order()
        pending = next(heads, None)
        seen: set[str] = set()
        merge: list[tuple[int, float, float, int, str, Iterator[_HeapItem]]] = []
        tiebreak = itertools.count()

        def advance(name: str, cursor: Iterator[_HeapItem]) -> None:
            for key, _, request_id in cursor:
                if request_id in entries:
                    counter = self._users[name].counter + charged.get(name, 0.0)
                    item = (
                        self.level_of_key(key, now),
                        counter,
                        key,
                        next(tiebreak),
                        request_id,
                        cursor,
                    )
                    heapq.heappush(merge, item)
                    return

        while True:
            # A user's first request enters the merge once nothing before it is left there.
            while pending is not None and (not merge or pending[:3] <= merge[0][:3]):
                name = pending[3]
                if name not in seen:
                    seen.add(name)
                    advance(name, _ascending(self._users[name].heap))
                pending = next(heads, None)
            if not merge:
                return
            _, _, _, _, request_id, cursor = heapq.heappop(merge)
            if request_id not in entries:
                continue
            entry = entries[request_id]
            request = entry.request
            yield request
            if self._generation != generation:
                raise RuntimeError("the queue changed while it was being iterated")
            if assume_dispatched:
                charged[request.user] = charged.get(request.user, 0.0) + entry.cost
            advance(request.user, cursor)

    def depths(self) -> dict[str, int]:
        """Queued requests per priority class."""
        return dict(self._depth)

    def queued(self, user: str) -> int:
        """How many requests ``user`` has in the queue."""
        queue = self._users.get(user)
        return queue.live if queue is not None else 0

    def counter(self, user: str) -> float:
        """The fair-share counter of ``user`` (GPU cost charged so far, after lifts)."""
        queue = self._users.get(user)
        return queue.counter if queue is not None else 0.0

    def get(self, request_id: str) -> Request | None:
        """The queued request with this id, or ``None``."""
        entry = self._entries.get(request_id)
        return entry.request if entry is not None else None

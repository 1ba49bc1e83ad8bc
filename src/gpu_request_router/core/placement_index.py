"""The schedulable GPUs, indexed so that one placement need not look at every GPU.

The :class:`~gpu_request_router.core.gpu_state_monitor.GPUStateMonitor` owns one
:class:`PlacementIndex` and hands it every GPU whose placement attributes it recomputes (the one
funnel through which readings, health, staleness, cordons, circuits, reservations and releases
all pass), so the index is never stale.

It keeps:

- :attr:`PlacementIndex.schedulable`: the schedulable GPUs by id, in the order they became
  schedulable (a GPU that leaves and comes back goes to the end), with that position as a number
  (``order``): every policy breaks its last tie by it, as a scan of the mapping does;
- the schedulable GPUs with a free slot, in *shelves*: one per GPU type and memory, served
  models, loaded and cached models, slots and health (healthy or degraded). On one shelf a need
  reserves the same memory on every GPU (the weights are loaded on all or on none), so "fits" is
  "room ≥ that memory". Each shelf holds two bisect-maintained lists: by
  ``(room, busy, order)``, and per distinct ``busy`` value by ``(-room, order)``.

A fleet has as many shelves as distinct (type, memory, models, loaded and cached models, slots,
health) among its GPUs with a free slot, a handful in a fleet of few models and types whatever
its size; an empty shelf is dropped. The queries are :class:`Shelf`'s methods, their costs in
docs/architecture.md ("Placement"). Where GPUs load models on demand and keep them, each
distinct set of resident models is a shelf of its own: a fleet in which every GPU holds another
set has as many shelves as GPUs, and a search is then as costly as a scan.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gpu_request_router.models.gpu_state import GPUHealth, GPUState

__all__ = ["Best", "PlacementIndex", "Shelf"]

_GIB = 1024
_ABOVE = float("inf")

_ByRoom = tuple[int, float, int, str]
"""``(room, busy, order, GPU id)``. Plain values only: the garbage collector need not track
the entries, so a large index does not slow down collections (and with them every scan)."""
_ByLevel = tuple[int, int, str]
"""``(-room, order, GPU id)`` within one busy level."""

_ShelfKey = tuple[str, int, tuple[str, ...], tuple[str, ...], tuple[str, ...], int, bool]
"""GPU type, memory, served models, loaded models, cached models, slots, degraded."""

Best = tuple[tuple[float, ...], str]
"""A shelf's best GPU for a query: its full ranking key (ending in its order) and its id."""


@dataclass(slots=True)
class Shelf:
    """The schedulable GPUs with a free slot alike in type, memory, models, slots and health.

    The models are the served, the loaded and the cached ones.
    """

    type: str
    memory_total_mb: int
    models: tuple[str, ...]
    models_loaded: tuple[str, ...]
    models_cached: tuple[str, ...]
    slots: int
    degraded: bool
    by_room: list[_ByRoom] = field(default_factory=list)
    levels: list[float] = field(default_factory=list)
    by_level: dict[float, list[_ByLevel]] = field(default_factory=dict)

    def serves(self, model: str) -> bool:
        """Whether the GPUs of this shelf serve ``model``."""
        return "*" in self.models or model in self.models

    def add(self, entry: _ByRoom) -> None:
        """File one GPU."""
        room, busy, order, gpu_id = entry
        insort(self.by_room, entry)
        level = self.by_level.get(busy)
        if level is None:
            self.by_level[busy] = [(-room, order, gpu_id)]
            insort(self.levels, busy)
        else:
            insort(level, (-room, order, gpu_id))

    def remove(self, entry: _ByRoom) -> None:
        """Take one filed GPU out (``entry`` is what :meth:`add` was given)."""
        room, busy, order, gpu_id = entry
        del self.by_room[bisect_left(self.by_room, entry)]
        level = self.by_level[busy]
        del level[bisect_left(level, (-room, order, gpu_id))]
        if not level:
            del self.by_level[busy]
            del self.levels[bisect_left(self.levels, busy)]

    # Queries: each returns the best GPU with room ≥ ``memory`` that ``skip`` lets through ---------

    def tightest(self, memory: int, skip: Callable[[str], bool]) -> Best | None:
        """Least room left after ``memory``, then least busy, then order."""
        by_room = self.by_room
        for position in range(bisect_left(by_room, (memory,)), len(by_room)):
            room, busy, order, gpu_id = by_room[position]
            if not skip(gpu_id):
                return (room - memory, busy, order), gpu_id
        return None

    def least_cost_gib(
        self,
        memory: int,
        skip: Callable[[str], bool],
        breaks: Sequence[int] = (),
        cost: Callable[[int], int] | None = None,
    ) -> Best | None:
        """Least ``cost(room)``, then least room left in whole GiB, then least busy, then order.

        Without ``cost``: the tightest fit in whole GiB. ``breaks`` (ascending, each ≥
        ``memory``): rooms where ``cost`` may jump; between two of them (and past the last) it
        must never decrease as the room grows. Then the best GPU is, for one of ``memory`` and
        the breaks, among those left with the same whole GiB as the tightest room ≥ it; within
        each distinct room the list is in (busy, order), so one look per distinct room of each
        such window suffices.
        """
        by_room = self.by_room
        size = len(by_room)
        best: tuple[tuple[int, int, float, int], str] | None = None
        examined = 0  # the windows examined so far end before this position
        for floor in (memory, *breaks):
            position = bisect_left(by_room, (floor,))
            while position < size and skip(by_room[position][3]):
                position += 1
            if position == size:
                break
            if position < examined:
                continue  # in a window already examined
            ceiling = memory + ((by_room[position][0] - memory) // _GIB + 1) * _GIB
            while position < size:
                room, busy, order, gpu_id = by_room[position]
                if room >= ceiling:
                    break
                if skip(gpu_id):
                    position += 1
                    continue
                key = (0 if cost is None else cost(room), (room - memory) // _GIB, busy, order)
                if best is None or key < best[0]:
                    best = (key, gpu_id)
                position = bisect_right(by_room, (room, _ABOVE), position)
            examined = position
        return best

    def roomiest(self, memory: int, skip: Callable[[str], bool]) -> Best | None:
        """Most room, then least busy, then order."""
        by_room = self.by_room
        end = len(by_room)
        while end:
            room = by_room[end - 1][0]
            if room < memory:
                return None
            start = bisect_left(by_room, (room,), 0, end)
            for position in range(start, end):
                _, busy, order, gpu_id = by_room[position]
                if not skip(gpu_id):
                    return (memory - room, busy, order), gpu_id
            end = start
        return None

    def least_busy(self, memory: int, skip: Callable[[str], bool]) -> Best | None:
        """Least busy, then most room, then order: the first busy level with a fitting GPU."""
        for busy in self.levels:
            for negative_room, order, gpu_id in self.by_level[busy]:
                if -negative_room < memory:
                    break
                if not skip(gpu_id):
                    return (busy, memory + negative_room, order), gpu_id
        return None


class PlacementIndex:
    """The schedulable GPUs, in the order they became schedulable, and shelved for placement."""

    def __init__(self) -> None:
        self._schedulable: dict[str, GPUState] = {}
        self._order: dict[str, int] = {}
        self._next_order = 0
        self._filed: dict[str, tuple[_ShelfKey, _ByRoom]] = {}
        self._shelves: dict[_ShelfKey, Shelf] = {}

    @property
    def schedulable(self) -> Mapping[str, GPUState]:
        """The schedulable GPUs by id, in the order they became schedulable."""
        return self._schedulable

    @property
    def any_free_slot(self) -> bool:
        """Whether any schedulable GPU has a free slot."""
        return bool(self._filed)

    def shelves(self) -> Iterable[Shelf]:
        """The shelves (none is empty)."""
        return self._shelves.values()

    def most_room(self) -> int | None:
        """The most room of a schedulable GPU with a free slot, or ``None`` when there is none."""
        return max((shelf.by_room[-1][0] for shelf in self._shelves.values()), default=None)

    def update(self, state: GPUState) -> None:
        """Re-file ``state`` after its placement attributes were recomputed (if they changed)."""
        gpu_id = state.id
        filed = self._filed.get(gpu_id)
        if filed is not None and state.schedulable and state.free_slots > 0:
            key, entry = filed
            if key == _shelf_key(state) and entry == (state.room_mb, state.busy, entry[2], gpu_id):
                return  # filed as it is: most readings change nothing placement looks at
        filed = self._filed.pop(gpu_id, None)
        if filed is not None:
            key, entry = filed
            shelf = self._shelves[key]
            shelf.remove(entry)
            if not shelf.by_room:
                del self._shelves[key]
        if not state.schedulable:
            if self._schedulable.pop(gpu_id, None) is not None:
                del self._order[gpu_id]
            return
        order = self._order.get(gpu_id)
        if order is None:
            self._schedulable[gpu_id] = state
            order = self._order[gpu_id] = self._next_order
            self._next_order += 1
        if state.free_slots <= 0:
            return
        key = _shelf_key(state)
        target = self._shelves.get(key)
        if target is None:
            target = self._shelves[key] = Shelf(*key)
        entry = (state.room_mb, state.busy, order, gpu_id)
        target.add(entry)
        self._filed[gpu_id] = (key, entry)


def _shelf_key(state: GPUState) -> _ShelfKey:
    """The shelf a GPU belongs on: type, memory, served, loaded and cached models, slots, health."""
    reading = state.reading
    return (
        reading.type,
        reading.memory_total_mb,
        reading.models,
        reading.models_loaded,
        reading.models_cached,
        reading.slots,
        state.health is GPUHealth.DEGRADED,
    )

"""The placement index chooses what a scan of every GPU would, however the fleet changes.

Random fleets (GPU types, served, loaded and cached models, memory used by others, health,
backend load) go through random changes on the monitor's own paths: reservations, releases (with
out-of-memory cuts), new readings, complete worker reports, staleness, silent workers, cordons,
drains and circuits. After every change, each indexed policy's choice for random needs (model,
size, exact or estimated, durations, task, GPU type, GPUs to avoid, held GPUs) must be the one
a brute-force oracle written here from the policies' documented rankings picks, scanning every
GPU. ``balanced`` learns the typical exact sizes from the needs it places; the oracle keeps its
own count of them (:class:`TypicalSizes`), from the documented rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_request_router.core.fragmentation import Demand, cost_bucket, share_breaks, share_cost
from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.core.load_balancer import Chosen, LoadBalancer, Need, NoFit, make_policy
from gpu_request_router.core.placement_index import Shelf
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading, GPUState
from gpu_request_router.models.request import Task

MARGIN = 1024
STALE_S = 10.0
TYPES = {"L4-24GB": 24_576, "A100-40GB": 40_960, "H100-80GB": 81_920}
MODELS = ("m1", "m2", "m3")
SERVED = [("*",), ("*",), ("m1",), ("m1", "m2")]
GIB = 1024

Key = Callable[[GPUState, int, bool], tuple[float, ...]]

# The service model's documented defaults (core/service_model.py): sharing slowdown per other
# execution for an inference server and for a generic job, and the load bandwidth.
BATCH_SLOWDOWN, JOB_SLOWDOWN, LOAD_BYTES_PER_S = 0.03, 1.0, 1.7e9


def expected_finish(need: Need, gpu: GPUState) -> float:
    """Load (where the GPU holds no copy) + duration alone × (1 + α × executions beside it)."""
    reading = gpu.reading
    held = need.model in reading.models_loaded or need.model in reading.models_cached
    load = 0.0 if held else need.weights_mb * 2**20 / LOAD_BYTES_PER_S
    durations = need.duration_s
    duration = durations.get(gpu.type, max(durations.values(), default=1.0))
    alpha = JOB_SLOWDOWN if need.task is Task.GENERIC else BATCH_SLOWDOWN
    return load + duration * (1 + alpha * gpu.busy * gpu.slots)


class TypicalSizes:
    """The typical exact sizes as ``BalancedPolicy`` documents them, counted here independently.

    Each exact need placed counts as (memory rounded up to whole GiB, GPU count), if its memory
    is positive; after the 1st, 2nd, 4th, … count (fewer than 256 here) the most counted shapes
    (ties: first seen) covering 95 % of the counts, at most 16, weighted by their counts, become
    the typical ones.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], int] = {}
        self.total = 0
        self.typical: list[tuple[int, float]] = []  # (size in MiB, weight)

    def count(self, need: Need) -> None:
        if not need.exact or need.memory_mb <= 0:
            return
        shape = (-(-need.memory_mb // GIB) * GIB, need.gpu_count)
        self.counts[shape] = self.counts.get(shape, 0) + 1
        self.total += 1
        if self.total & (self.total - 1) == 0:  # a power of two
            ranked = sorted(self.counts.items(), key=lambda item: -item[1])
            chosen: list[tuple[tuple[int, int], int]] = []
            for shape_count in ranked:
                if sum(c for _, c in chosen) >= 0.95 * self.total or len(chosen) == 16:
                    break
                chosen.append(shape_count)
            covered = sum(c for _, c in chosen)
            self.typical = [(size, c / covered) for (size, _), c in chosen]

    def bucket(self, gpu: GPUState, memory: int) -> int:
        """The fragmentation bucket: the mix-weighted growth of the GPU's unusable free memory.

        Free memory is unusable to a typical size if it is below it; the growth, in units of
        7 % of the GPU's memory, rounded to the nearest (halves up).
        """
        before, after = gpu.room_mb, gpu.room_mb - memory
        grown = sum(
            weight * ((after if after < size else 0) - (before if before < size else 0))
            for size, weight in self.typical
        )
        return math.floor(grown / (0.07 * gpu.memory_total_mb) + 0.5)


# Each indexed policy's ranking as documented (load_balancer's module docstring), smallest first.
RANKINGS: dict[str, Callable[[Need, TypicalSizes], Key]] = {
    "balanced": lambda need, sizes: (
        (
            lambda gpu, memory, loaded: (
                not loaded,
                gpu.health is GPUHealth.DEGRADED,
                sizes.bucket(gpu, memory),
                (gpu.room_mb - memory) // GIB,
                gpu.busy,
            )
        )
        if need.exact
        else (
            lambda gpu, memory, loaded: (
                gpu.health is GPUHealth.DEGRADED,
                expected_finish(need, gpu),
                -(gpu.room_mb - memory),
                gpu.busy,
            )
        )
    ),
    "best_fit": lambda need, sizes: lambda gpu, memory, loaded: (gpu.room_mb - memory, gpu.busy),
    "least_loaded": lambda need, sizes: (
        lambda gpu, memory, loaded: (
            gpu.busy,
            -(gpu.room_mb - memory),
        )
    ),
}


def oracle(
    policy: str,
    need: Need,
    gpus: list[GPUState],
    held: Collection[str],
    sizes: TypicalSizes | None = None,
) -> tuple[str, int] | None:
    """Scan ``gpus`` (schedulable, in the order they became so): the GPU and memory to take."""
    candidates = []
    for gpu in gpus:
        assert gpu.schedulable
        if gpu.slots - len(gpu.running) <= 0 or gpu.id in held:
            continue
        if need.gpu_type is not None and gpu.type != need.gpu_type:
            continue
        if not gpu.serves(need.model):
            continue
        loaded = need.model in gpu.reading.models_loaded
        memory = need.memory_mb - need.weights_mb if loaded else need.memory_mb
        if memory <= gpu.room_mb:
            candidates.append((gpu, memory, loaded))
    preferred = [c for c in candidates if c[0].id not in need.avoid] or candidates
    if not preferred:
        return None
    rank = RANKINGS[policy](need, sizes or TypicalSizes())
    best = preferred[0]
    for candidate in preferred[1:]:  # the first of equals wins, as in a scan
        if rank(*candidate) < rank(*best):
            best = candidate
    return best[0].id, best[1]


class Fleet:
    """A monitor and, kept here independently, the order in which its GPUs became schedulable."""

    def __init__(self, readings: list[GPUReading]) -> None:
        self.monitor = GPUStateMonitor(
            stale_after_s=STALE_S, safety_margin_mb=MARGIN, max_temperature_c=90.0
        )
        self.readings = {r.gpu_id: r for r in readings}
        self.order: list[str] = []
        self.now = 0.0
        self.holders: list[str] = []
        self.count = 0
        self.apply(readings)

    def apply(self, readings: list[GPUReading], worker: str | None = None) -> None:
        self.monitor.apply(readings, self.now, worker=worker)
        self.settle([reading.gpu_id for reading in readings])

    def settle(self, changed: list[str] | None = None) -> None:
        """Note GPUs that stopped being schedulable, and those that became so (at the end).

        Only readings make several GPUs schedulable at once, in the order they are given.
        """
        gpus = self.monitor.gpus
        self.order = [g for g in self.order if gpus[g].schedulable]
        self.order += [g for g in changed or gpus if gpus[g].schedulable and g not in self.order]

    def schedulable(self) -> list[GPUState]:
        return [self.monitor.gpus[g] for g in self.order]


@st.composite
def gpu_readings(draw: st.DrawFn) -> list[GPUReading]:
    """A fleet of 1-4 workers of 1-6 GPUs; a worker's GPUs share a type and served models."""
    readings = []
    for worker in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(sorted(TYPES)))
        served = draw(st.sampled_from(SERVED))
        readings += [
            draw(a_reading(f"w{worker}", index, kind, served))
            for index in range(draw(st.integers(1, 6)))
        ]
    return readings


def a_reading(
    worker: str, index: int, kind: str, served: tuple[str, ...]
) -> st.SearchStrategy[GPUReading]:
    """One reading: few distinct values of used memory, health and load, so that ties abound."""
    return st.builds(
        GPUReading,
        worker=st.just(worker),
        index=st.just(index),
        type=st.just(kind),
        memory_total_mb=st.just(TYPES[kind]),
        memory_used_mb=st.sampled_from([0, 0, 0, GIB, 4 * GIB, 4 * GIB + 333]),
        health=st.sampled_from([GPUHealth.HEALTHY] * 5 + [GPUHealth.DEGRADED, GPUHealth.UNHEALTHY]),
        temperature_c=st.sampled_from([None, None, 95.0]),
        slots=st.integers(1, 3),
        models=st.just(served),
        models_loaded=st.sampled_from([(), (), ("m1",), ("m2",), ("m1", "m2")]),
        models_cached=st.sampled_from([(), (), ("m3",), ("m1", "m3")]),
        load=st.sampled_from([None, None, None, 0.5, 0.9]),
    )


needs = st.builds(
    Need,
    model=st.sampled_from(MODELS),
    memory_mb=st.sampled_from([0, 1, 2 * GIB, 6 * GIB, 6 * GIB + 100, 16 * GIB, 21 * GIB]),
    weights_mb=st.sampled_from([0, GIB, 2 * GIB]),
    gpu_type=st.sampled_from([None, None, *sorted(TYPES)]),
    exact=st.booleans(),
    duration_s=st.sampled_from(
        [{}, {"H100-80GB": 2.0, "A100-40GB": 3.0, "L4-24GB": 12.0}, {"H100-80GB": 0.0}]
    ),
    task=st.sampled_from([Task.CHAT, Task.GENERIC]),
)


def change(draw: st.DrawFn, fleet: Fleet) -> None:
    """One random change to the fleet, through the monitor's public paths."""
    monitor = fleet.monitor
    gpu_ids = sorted(monitor.gpus)
    op = draw(
        st.sampled_from(
            ["reserve"] * 4
            + ["release"] * 3
            + ["reading", "report", "cordon", "uncordon", "drain", "circuit", "time"]
        )
    )
    if op == "reserve":
        fleet.count += 1
        holder = f"exe{fleet.count}"
        memory = draw(st.sampled_from([0, GIB, GIB, 3 * GIB, 5 * GIB + 7, 12 * GIB]))
        placed = False
        for gpu_id in draw(st.lists(st.sampled_from(gpu_ids), min_size=1, max_size=2, unique=True)):
            placed = monitor.reserve(gpu_id, holder, memory) or placed
        if placed:
            fleet.holders.append(holder)
    elif op == "release" and fleet.holders:
        holder = fleet.holders.pop(draw(st.integers(0, len(fleet.holders) - 1)))
        monitor.release(
            holder,
            peak_mb=draw(st.sampled_from([None, 0, 2 * GIB])),
            size_mb=draw(st.sampled_from([None, 8 * GIB])),
            out_of_memory=draw(st.booleans()),
        )
    elif op == "reading":
        old = fleet.readings[draw(st.sampled_from(gpu_ids))]
        kind = draw(st.sampled_from([old.type, old.type, *sorted(TYPES)]))
        new = draw(a_reading(old.worker, old.index, kind, draw(st.sampled_from(SERVED))))
        fleet.readings[new.gpu_id] = new
        fleet.now += 1.0
        fleet.apply([new])
        return
    elif op == "report":
        worker = draw(st.sampled_from(sorted({r.worker for r in fleet.readings.values()})))
        mine = [r for r in fleet.readings.values() if r.worker == worker]
        kept = draw(st.lists(st.sampled_from(mine), unique=True))
        fleet.now += 1.0
        fleet.apply(kept, worker=worker)
        return
    elif op in ("cordon", "uncordon", "drain"):
        getattr(monitor, op)(draw(st.sampled_from(gpu_ids)))
    elif op == "circuit":
        monitor.set_circuit(draw(st.sampled_from(gpu_ids)), draw(st.booleans()))
    elif op == "time":
        if draw(st.booleans()):
            workers = sorted({r.worker for r in fleet.readings.values()})
            monitor.source_failed(draw(st.sampled_from(workers)), fleet.now)
        fleet.now += draw(st.sampled_from([1.0, STALE_S]))
        monitor.refresh(fleet.now)
    fleet.settle()


def outcome(chosen: Chosen | NoFit) -> tuple[str, int] | None:
    """The one GPU chosen and the memory reserved on it, or ``None`` for no fit."""
    if isinstance(chosen, NoFit):
        return None
    assert chosen.gpu_ids == (chosen.gpu_ids[0],)
    return chosen.gpu_ids[0], chosen.reservations[chosen.gpu_ids[0]]


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_indexed_policies_choose_what_a_scan_of_every_gpu_chooses(data: st.DataObject) -> None:
    """After every change, each indexed policy picks the oracle's GPU (ties: schedulable order).

    The index also knows the most room of a GPU with a free slot, and keeps no empty shelf.
    """
    fleet = Fleet(data.draw(gpu_readings()))
    balancers = {name: LoadBalancer(make_policy(name)) for name in RANKINGS}
    sizes = TypicalSizes()
    for _ in range(data.draw(st.integers(1, 25))):
        change(data.draw, fleet)
        assert list(fleet.monitor.schedulable) == fleet.order
        gpus = fleet.schedulable()
        index = fleet.monitor.index
        rooms = [gpu.room_mb for gpu in gpus if gpu.slots > len(gpu.running)]
        assert index.most_room() == max(rooms, default=None)
        assert all(shelf.by_room for shelf in index.shelves())
        ids = [gpu.id for gpu in gpus] or ["none"]
        for _ in range(3):
            need = data.draw(needs)
            need = Need(
                model=need.model,
                memory_mb=need.memory_mb + need.weights_mb,
                weights_mb=need.weights_mb,
                gpu_type=need.gpu_type,
                avoid=frozenset(data.draw(st.sets(st.sampled_from(ids), max_size=2))),
                exact=need.exact,
                duration_s=need.duration_s,
                task=need.task,
            )
            held = data.draw(st.sets(st.sampled_from(ids), max_size=2))
            for name, balancer in balancers.items():
                expected = oracle(name, need, gpus, held, sizes)
                assert outcome(balancer.place(need, fleet.monitor.index, held)) == expected, name
                if name == "balanced" and expected is not None:
                    sizes.count(need)


def test_no_gpu_with_a_free_slot_is_no_fit_without_free_slots() -> None:
    """A fleet whose every slot is taken answers "no free slot", as a scan does."""
    fleet = Fleet(
        [GPUReading(worker="w", index=0, type="L4-24GB", memory_total_mb=24_576, slots=1)]
    )
    need = Need(model="m1", memory_mb=GIB)
    balancer = LoadBalancer(make_policy("best_fit"))
    assert outcome(balancer.place(need, fleet.monitor.index)) == ("w:0", GIB)
    assert fleet.monitor.reserve("w:0", "exe", GIB)
    assert balancer.place(need, fleet.monitor.index) == NoFit(free_slots=False)
    assert balancer.place(need, fleet.monitor.index, held={"w:0"}) == NoFit(free_slots=False)
    fleet.monitor.release("exe")
    assert balancer.place(need, fleet.monitor.index, held={"w:0"}) == NoFit(free_slots=True)


def test_an_exact_size_takes_the_tightest_whole_gib_even_from_a_less_busy_gpu() -> None:
    """A GPU left with exactly one GiB more than the tightest is a GiB looser, however idle."""
    busy = GPUReading(
        worker="w", index=0, type="L4-24GB", memory_total_mb=24_576, memory_used_mb=333, load=0.9
    )
    idle = GPUReading(worker="w", index=1, type="L4-24GB", memory_total_mb=24_576)
    fleet = Fleet([busy, idle])
    need = Need(model="m1", memory_mb=22 * GIB, exact=True)
    # Room: 23,219 MiB (691 MiB left over) against 23,552 MiB (exactly 1 GiB left over).
    chosen = LoadBalancer(make_policy("balanced")).place(need, fleet.monitor.index)
    assert outcome(chosen) == oracle("balanced", need, fleet.schedulable(), ()) == ("w:0", 22 * GIB)


def test_a_gpu_that_comes_back_loses_ties_to_those_that_stayed() -> None:
    """Cordoned and uncordoned, a GPU goes to the end of the order, as in a scan of the mapping."""
    twins = [
        GPUReading(worker="w", index=index, type="L4-24GB", memory_total_mb=24_576)
        for index in (0, 1)
    ]
    fleet = Fleet(twins)
    need = Need(model="m1", memory_mb=GIB)
    balancer = LoadBalancer(make_policy("best_fit"))
    assert outcome(balancer.place(need, fleet.monitor.index)) == ("w:0", GIB)
    fleet.monitor.cordon("w:0")
    fleet.monitor.uncordon("w:0")
    assert list(fleet.monitor.schedulable) == ["w:1", "w:0"]
    assert outcome(balancer.place(need, fleet.monitor.index)) == ("w:1", GIB)


@settings(max_examples=300, deadline=None)
@given(
    rooms=st.lists(
        st.tuples(st.integers(0, 40 * GIB), st.sampled_from([0.0, 0.5, 1.0])), max_size=30
    ),
    memory=st.integers(1, 12 * GIB),
    sizes=st.lists(st.tuples(st.integers(1, 30 * GIB), st.integers(1, 5)), min_size=1, max_size=6),
    skipped=st.sets(st.integers(0, 29), max_size=5),
)
def test_a_shelf_finds_the_least_fragmenting_fit_by_looking_at_the_break_points_only(
    rooms: list[tuple[int, float]],
    memory: int,
    sizes: list[tuple[int, int]],
    skipped: set[int],
) -> None:
    """Searching from each break point finds the GPU a scan ranks first by the documented key.

    Key: the growth of the GPU's free memory that is below a typical size (weighted), in buckets
    of 7 % of 40 GiB; then the whole GiB left; then busy; then order. Rooms spread widely, so
    that the least fragmenting GPU is often far from the tightest.
    """
    total = sum(weight for _, weight in sizes)
    typical = [Demand(size, 1, weight / total) for size, weight in sizes]
    shelf = Shelf("A100-40GB", 40 * GIB, ("*",), (), (), 1, False)
    for order, (room, busy) in enumerate(rooms):
        shelf.add((room, busy, order, f"g{order}"))

    def bucket(room: int) -> int:
        left = room - memory
        grown = sum(
            d.weight * ((left if left < d.size else 0) - (room if room < d.size else 0))
            for d in typical
        )
        return math.floor(grown / (0.07 * 40 * GIB) + 0.5)

    def skip(gpu_id: str) -> bool:
        return int(gpu_id[1:]) in skipped

    expected = min(
        (
            ((bucket(room), (room - memory) // GIB, busy, order), f"g{order}")
            for order, (room, busy) in enumerate(rooms)
            if room >= memory and order not in skipped
        ),
        default=None,
    )
    found = shelf.least_cost_gib(
        memory,
        skip,
        share_breaks(memory, typical),
        lambda room: cost_bucket(share_cost(room, memory, typical), 40 * GIB),
    )
    assert found == expected

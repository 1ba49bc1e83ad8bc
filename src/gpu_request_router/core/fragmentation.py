"""Fragmentation of free GPU shares, against the mix of requests a fleet typically sees.

The measure is the FGD paper's (Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing
Workloads with Fragmentation Gradient Descent", USENIX ATC 2023): a node's free GPU shares are
fragmented, for one typical request, by the part of them that request could not use — all of
them when it cannot run on the node at all (it asks for no GPU, another model, or more GPUs of its
size than the node has free), else the GPUs with less free than it asks. Weighted by each typical
request's share of the mix, that is the node's *fragmentation*: the idle GPU a typical request
would find unusable. A placement is scored by how much it changes its node's fragmentation
(:func:`placement_cost`): the smaller, the better. Units are whatever the caller's GPU shares are
(GPU milli in the packing benchmark, free bytes in the router).

Unlike FGD, which uses the whole trace's mix, the mix here is learnt online from the requests seen
so far (:class:`RequestMix`): a router cannot see the requests to come.

Pure functions and one small bounded class; no I/O.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "DEFAULT_COVERAGE",
    "DEFAULT_QUANTUM",
    "DEFAULT_SHAPES",
    "Demand",
    "RequestMix",
    "cost_bucket",
    "fragmentation",
    "placement_cost",
    "share_breaks",
    "share_cost",
    "unusable",
]

K = TypeVar("K", bound=Hashable)

DEFAULT_SHAPES = 256
"""How many distinct request shapes :class:`RequestMix` counts at most."""

DEFAULT_COVERAGE = 0.95
"""The share of the requests seen that the typical shapes cover (FGD's 95 % popularity)."""


DEFAULT_QUANTUM = 0.07
"""The width of one :func:`cost_bucket`, as a share of one GPU's capacity."""


@dataclass(frozen=True, slots=True)
class Demand:
    """A typical request: ``count`` GPUs with ``size`` free each, and its ``weight`` in the mix.

    ``size`` 0 is a request that asks for no GPU: to it every idle GPU share is unusable.
    ``runs`` is False where the request cannot run on the node at all (another GPU model, too
    little CPU): all the node's idle GPU share is unusable to it too.
    """

    size: int
    count: int
    weight: float
    runs: bool = True


def unusable(free: Sequence[int], demand: Demand) -> int:
    """The free GPU share (``free`` sorted ascending) that ``demand`` could not use on this node."""
    if demand.size <= 0 or not demand.runs:
        return sum(free)
    first = bisect_left(free, demand.size)
    if len(free) - first < demand.count:
        return sum(free)
    return sum(free[:first])


def fragmentation(free: Sequence[int], mix: Iterable[Demand]) -> float:
    """The node's expected unusable free GPU share: the mix-weighted sum of :func:`unusable`.

    ``free``: the free share of each of the node's GPUs, sorted ascending.
    """
    return sum(demand.weight * unusable(free, demand) for demand in mix)


def placement_cost(
    before: Sequence[int],
    after: Sequence[int],
    mix_before: Iterable[Demand],
    mix_after: Iterable[Demand] | None = None,
) -> float:
    """How much a placement grows its node's fragmentation (negative: it shrinks it).

    ``before`` and ``after`` are the node's free shares (sorted ascending) without and with the
    placement; ``mix_after`` is the mix as the node would see it afterwards, when the placement
    also changes which typical requests can run there (it uses up CPU); default: ``mix_before``.
    """
    demands = list(mix_before)
    after_mix = demands if mix_after is None else mix_after
    return fragmentation(after, after_mix) - fragmentation(before, demands)


def share_cost(room: int, memory: int, mix: Iterable[Demand]) -> float:
    """How much taking ``memory`` of one GPU's ``room`` grows what the mix could not use of it.

    Each typical request is taken as one GPU of its size: the GPU's free share is unusable to it
    before if ``room`` < its size, after if ``room - memory`` < its size (always, for a demand
    that asks for no GPU or cannot run there). For a mix of one-GPU requests this is exactly
    :func:`placement_cost` on the GPU's node, whatever the node's other GPUs: what a one-GPU
    request cannot use of a node is the sum of its GPUs' free shares below its size, GPU by GPU.
    For a typical request of ``count`` > 1 GPUs it is an approximation: it ignores whether the
    node keeps ``count`` GPUs that fit (and charges the node's other GPUs nothing).
    """
    left = room - memory
    cost = 0.0
    for demand in mix:
        size = demand.size
        if size <= 0 or not demand.runs:
            cost -= demand.weight * memory
        else:
            cost += demand.weight * ((left if left < size else 0) - (room if room < size else 0))
    return cost


def share_breaks(memory: int, mix: Iterable[Demand]) -> list[int]:
    """The rooms ≥ ``memory`` where :func:`share_cost` may jump, ascending, ``memory`` first.

    Between two consecutive breaks (and past the last) :func:`share_cost` never decreases as
    the room grows: for each typical size s it is −``memory`` below s, ``room − memory`` from s
    to s + ``memory``, and 0 beyond. So the least cost among rooms from a break up to the next
    is at the smallest of those rooms.
    """
    breaks = {memory}
    for demand in mix:
        if demand.size > 0 and demand.runs:
            breaks.add(demand.size + memory)
            if demand.size > memory:
                breaks.add(demand.size)
    return sorted(breaks)


def cost_bucket(cost: float, gpu_capacity: int, quantum: float = DEFAULT_QUANTUM) -> int:
    """:func:`placement_cost` in whole buckets of ``quantum`` × one GPU's capacity.

    Placements whose costs fall in one bucket are equal in fragmentation, and the caller breaks
    the tie by the tightest fit, then by a fixed node order. Exact costs would let differences of
    a few thousandths of a GPU decide, and scatter requests over nodes; FGD's integer sigmoid
    score groups them too (buckets of about 4 % of a GPU near zero, wider beyond). Monotone: a
    larger cost never gets a smaller bucket.
    """
    return math.floor(cost / (quantum * gpu_capacity) + 0.5)


@dataclass(slots=True)
class _Count:
    count: int
    error: int


class RequestMix(Generic[K]):
    """A bounded online histogram of request shapes: the typical requests seen so far.

    Counts at most ``shapes`` distinct shapes (any hashable key). When a new shape arrives and the
    table is full, the least counted shape gives up its place and the newcomer inherits its count
    (the Space-Saving algorithm of Metwally et al., ICDT 2005): a shape seen more than
    ``total / shapes`` times is always in the table, and each count overestimates by at most the
    ``error`` it inherited. Memory is O(``shapes``), observing is O(1) (O(``shapes``) on eviction).

    :meth:`typical` returns the most counted shapes that together cover ``coverage`` of the
    requests seen, weights renormalised to sum to 1, as FGD's typical pods.
    """

    def __init__(self, shapes: int = DEFAULT_SHAPES, coverage: float = DEFAULT_COVERAGE) -> None:
        if shapes < 1:
            raise ValueError("a request mix needs room for at least one shape")
        if not 0 < coverage <= 1:
            raise ValueError("coverage is a share in (0, 1]")
        self.shapes = shapes
        self.coverage = coverage
        self.total = 0
        self._counts: dict[K, _Count] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def observe(self, shape: K) -> None:
        """Count one request of ``shape``."""
        self.total += 1
        found = self._counts.get(shape)
        if found is not None:
            found.count += 1
            return
        if len(self._counts) < self.shapes:
            self._counts[shape] = _Count(1, 0)
            return
        victim = min(self._counts, key=lambda key: self._counts[key].count)
        floor = self._counts.pop(victim).count
        self._counts[shape] = _Count(floor + 1, floor)

    def typical(self) -> list[tuple[K, float]]:
        """The most frequent shapes covering ``coverage`` of the requests, and their weights.

        Ordered by count, most first (ties: insertion order); weights sum to 1.
        """
        ranked = sorted(self._counts.items(), key=lambda item: -item[1].count)
        counted = sum(entry.count for _, entry in ranked)
        if counted == 0:
            return []
        chosen: list[tuple[K, int]] = []
        covered = 0
        for key, entry in ranked:
            if covered >= self.coverage * counted:
                break
            chosen.append((key, entry.count))
            covered += entry.count
        return [(key, count / covered) for key, count in chosen]

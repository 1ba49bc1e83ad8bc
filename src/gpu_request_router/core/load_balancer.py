"""Placement: filter the GPUs that can take a request now, then let a policy choose.

The filter is shared by every policy: the GPU is schedulable (healthy or degraded, not cordoned,
circuit closed), serves the model, is of the requested type, has a free slot, has room for the
request's memory (without the weights where the model is loaded already), and is neither held for
a starving request nor, when others qualify, one the request already failed on. A request for
``gpu_count`` > 1 needs that many such GPUs on one worker.

Policies (:data:`POLICIES`) only rank the survivors; each is a small class with ``choose()``:

- ``balanced`` (default): by how sure the request's size is. An exact size (a client's memory
  hint, or no working memory to guess: weights only): model already loaded first, then healthy
  before degraded, then where it fragments least, as FGD does: the GPU whose free memory it
  leaves least unusable to the typical exact sizes this policy has placed (learnt online,
  bounded: :class:`BalancedPolicy`), in buckets of 7 % of the GPU's memory; then the tightest
  fit (whole GiB), keeping large holes whole for large requests; then the least busy. Before it
  has placed an exact size, the tightest fit alone decides. An estimated size (KV cache and
  activations of an answer whose length is a guess): healthy before degraded, then the soonest
  expected finish (a cold start where the GPU holds no copy of the weights, plus the duration on
  the GPU's type slowed by what shares the GPU: :class:`BalancedPolicy`), then the most room
  left, which absorbs the estimate's error, then the least busy. ``gpurouter bench replay``
  measures both (docs/benchmarks.md);
- ``best_fit``: the least memory left over;
- ``least_loaded``: the fewest busy slots, then the most room;
- ``power_of_two``: two random candidates, the less loaded of them;
- ``round_robin``: the next candidate after the last one chosen, in GPU order;
- ``random``: any candidate.

A one-GPU decision of ``balanced``, ``best_fit`` and ``least_loaded`` searches the monitor's
:class:`~gpu_request_router.core.placement_index.PlacementIndex` (GPUs shelved by type, memory,
models, loaded and cached models, slots and health, sorted by room and by load) in time
logarithmic in the GPUs and choosing exactly the GPU a scan would, ties broken by the order in
which GPUs became schedulable.
For an exact size, ``balanced``'s fragmentation cost is one GPU's own (the growth of its free
memory below each typical size), a function of its room alone, that never decreases between
the rooms where it jumps (each typical size s and s + the need): so a shelf need only look at
the tightest fits from the need and from each of those rooms. It equals the growth of the
worker's fragmentation for one-GPU typical sizes; for a typical size of several GPUs it ignores
whether the worker keeps enough GPUs that fit (an approximation).
``power_of_two``, ``round_robin`` and ``random`` pick by position among all candidates, and a
multi-GPU request ranks whole workers: those scan every schedulable GPU, O(GPUs).
``gpurouter bench decisions`` measures both (docs/architecture.md, "Placement").

Each choice comes with the candidates the policy weighed (:class:`Weighed`, at most
:data:`WEIGHED`, best first, with its ranking key), for ``explain``: a search's best GPU of each
shelf it looked at, a scan's best options by the policy's key, ``power_of_two``'s sampled pair,
or the choice alone where a policy does not rank (``random``, ``round_robin``).
"""

from __future__ import annotations

import heapq
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from gpu_request_router.core.fragmentation import (
    Demand,
    RequestMix,
    cost_bucket,
    share_breaks,
    share_cost,
)
from gpu_request_router.core.placement_index import Best, PlacementIndex, Shelf
from gpu_request_router.core.service_model import ServiceModel
from gpu_request_router.models.gpu_state import GPUHealth, GPUState
from gpu_request_router.models.request import Task, duration_on

__all__ = [
    "POLICIES",
    "Chosen",
    "GPUGroup",
    "IndexedPolicy",
    "LoadBalancer",
    "Need",
    "NoFit",
    "Option",
    "Policy",
    "Weighed",
    "make_policy",
]

_GIB = 1024
_DEGRADED = GPUHealth.DEGRADED

TYPICAL_SHAPES = 16
"""At most this many typical request shapes score an exact-size placement (the most counted)."""

REFRESH_EVERY = 256
"""Exact-size placements between two refreshes of the typical shapes, once past that many."""

WEIGHED = 8
"""At most this many candidates a placement keeps, best first, for ``explain``."""


@dataclass(frozen=True, slots=True)
class Need:
    """What a request needs from the fleet: per-GPU memory (with its weights share) and GPUs.

    ``exact``: the memory is known (a client's hint, or weights only), not a guess.
    ``duration_s``: the estimated duration alone on each GPU type; ``task``: how it shares a GPU.
    """

    model: str
    memory_mb: int
    weights_mb: int = 0
    gpu_count: int = 1
    gpu_type: str | None = None
    avoid: frozenset[str] = frozenset()
    exact: bool = False
    duration_s: Mapping[str, float] = field(default_factory=dict)
    task: Task = Task.CHAT

    def runs_on(self, gpu: GPUState) -> bool:
        """Whether ``gpu`` is of the asked type (if any) and its backend serves the model."""
        return (self.gpu_type is None or gpu.type == self.gpu_type) and gpu.serves(self.model)

    def memory_on(self, gpu: GPUState) -> int:
        """Memory to reserve on ``gpu``: no weights where the model is loaded already."""
        return self.memory_mb - self.weights_mb if gpu.has_loaded(self.model) else self.memory_mb

    def duration_on(self, gpu_type: str) -> float:
        """The estimated duration alone on ``gpu_type`` (the slowest known type if not listed)."""
        return duration_on(self.duration_s, gpu_type)


Option = tuple["GPUState | GPUGroup", int, bool]
"""A feasible choice: one GPU or a :class:`GPUGroup`, the memory it would reserve in all, and
whether the model is loaded there. Policies rank options; nothing is built per GPU."""


class GPUGroup:
    """Several GPUs of one worker taken together by a multi-GPU request, ranked as one unit.

    Rooms and slots add up, the busiest GPU sets ``busy``, any degraded GPU makes it degraded.
    Built once per worker and decision, so it is a plain class filled in one loop.
    """

    __slots__ = (
        "busy",
        "free_slots",
        "gpus",
        "health",
        "index",
        "reservations",
        "room_mb",
        "slots",
        "worker",
    )

    def __init__(self, group: Sequence[tuple[GPUState, int]]) -> None:
        """The group of ``(gpu, memory to reserve)`` pairs, all on one worker."""
        room = free = slots = 0
        busy = 0.0
        degraded = False
        for gpu, _ in group:
            room += gpu.room_mb
            free += gpu.free_slots
            slots += gpu.reading.slots
            busy = max(busy, gpu.busy)
            degraded = degraded or gpu.health is _DEGRADED
        first = group[0][0]
        self.gpus = tuple(gpu for gpu, _ in group)
        self.reservations = tuple(memory for _, memory in group)
        self.worker = first.reading.worker
        self.index = first.reading.index
        self.room_mb = room
        self.busy = busy
        self.health = _DEGRADED if degraded else GPUHealth.HEALTHY
        self.free_slots = free
        self.slots = slots


class Weighed(NamedTuple):
    """A candidate a policy weighed: its GPUs, its ranking key (lower is better), a note.

    The key is the policy's own; :meth:`Policy.scores` names its parts. An empty key: the policy
    did not rank the candidate (it chose by position or at random). ``note`` may hold
    ``{count}``, which :meth:`describe` fills with ``among`` (how many it was the best of, or
    chosen among). A tuple, its note formatted only when asked: made on every decision, it must
    cost next to nothing.
    """

    gpu_ids: tuple[str, ...]
    key: tuple[float, ...]
    note: str = ""
    among: int = 0

    def describe(self) -> str:
        """The note, with ``{count}`` replaced (formatted when asked, not at decision time)."""
        return self.note.format(count=self.among)


_ALIKE = "the best of {count} alike with a free slot"


def _weighed(option: Option, key: tuple[float, ...], note: str = "", among: int = 0) -> Weighed:
    unit = option[0]
    gpu_ids = tuple(gpu.id for gpu in unit.gpus) if isinstance(unit, GPUGroup) else (unit.id,)
    return Weighed(gpu_ids, key, note, among)


@dataclass(frozen=True, slots=True)
class Chosen:
    """The policy's choice: a worker, its GPUs, the memory to reserve on each, and why.

    ``weighed``: the candidates the policy weighed, best first (at most :data:`WEIGHED`).
    """

    worker: str
    gpu_ids: tuple[str, ...]
    reservations: Mapping[str, int]
    reason: str
    weighed: tuple[Weighed, ...] = ()

    @classmethod
    def of(
        cls, option: Option, policy: str, why: str = "", weighed: Sequence[Weighed] = ()
    ) -> Chosen:
        """The placement for ``option``, chosen by ``policy``, with the reason in a few words.

        ``why``: what the policy weighed, put before the memory and slots the choice leaves.
        """
        unit, memory, loaded = option
        if isinstance(unit, GPUGroup):
            gpu_ids = tuple(gpu.id for gpu in unit.gpus)
            reservations = dict(zip(gpu_ids, unit.reservations, strict=True))
        else:
            gpu_ids = (unit.id,)
            reservations = {gpu_ids[0]: memory}
        affinity = "model loaded; " if loaded else ""
        leftover = (unit.room_mb - memory) / _GIB
        busy = unit.slots - unit.free_slots
        return cls(
            worker=unit.worker,
            gpu_ids=gpu_ids,
            reservations=reservations,
            reason=(
                f"{policy}: {why}{affinity}leaves {leftover:.1f} GiB, "
                f"{busy}/{unit.slots} slots busy"
            ),
            weighed=tuple(weighed),
        )


@dataclass(frozen=True, slots=True)
class NoFit:
    """No GPU can take the request now; ``free_slots`` says whether any had a free slot at all."""

    free_slots: bool


class Policy(ABC):
    """Ranks feasible options; filtering is done before a policy is asked."""

    name: str = ""

    @abstractmethod
    def choose(self, options: Sequence[Option], need: Need) -> Option:
        """Pick one of ``options`` (never empty) for ``need``."""

    def explain(self, option: Option, need: Need) -> str:
        """What the policy weighed in choosing ``option``, for the placement reason."""
        return ""

    def choose_weighed(self, options: Sequence[Option], need: Need) -> tuple[Option, list[Weighed]]:
        """:meth:`choose`, with the candidates weighed in choosing, best first.

        By default only the choice, unranked: a policy that picks by position or at random
        weighs no other option.
        """
        chosen = self.choose(options, need)
        note = f"chosen by {self.name} among {{count}} feasible"
        return chosen, [_weighed(chosen, (), note, len(options))]

    def scores(self, key: tuple[float, ...], need: Need) -> dict[str, float]:
        """The parts of a ranking key of this policy, by name (for ``explain``)."""
        return {}

    def placed(self, need: Need) -> None:
        """Learn from ``need``, just placed (most policies learn nothing)."""
        return None


class IndexedPolicy(Policy):
    """A policy whose ranking is a key of one GPU's room, load, health and model affinity.

    It also answers :meth:`search` on one shelf of the placement index; the best of the
    shelves' answers is then what :meth:`choose` would pick among every fitting GPU, so a
    one-GPU placement need not scan. The other policies pick by position among all candidates,
    and scan.
    """

    @abstractmethod
    def search(
        self, shelf: Shelf, memory: int, need: Need, skip: Callable[[str], bool]
    ) -> Best | None:
        """The shelf's best GPU for ``need`` (reserving ``memory``), with its full ranking key."""

    @abstractmethod
    def key(self, option: Option, need: Need) -> tuple[float, ...]:
        """The ranking key of ``option`` (lower is better); :meth:`choose` takes the least."""

    def choose(self, options: Sequence[Option], need: Need) -> Option:
        """Pick the option of the least :meth:`key`."""
        return min(options, key=lambda option: self.key(option, need))

    def choose_weighed(self, options: Sequence[Option], need: Need) -> tuple[Option, list[Weighed]]:
        """The option of the least :meth:`key` and the best ones, each key computed once."""
        keyed = [(self.key(option, need), position) for position, option in enumerate(options)]
        best = heapq.nsmallest(WEIGHED, keyed)  # ties go to the earlier option, as min() does
        return options[best[0][1]], [_weighed(options[p], key) for key, p in best]


class BalancedPolicy(IndexedPolicy):
    """Health first; then exact sizes pack tightly, estimated ones go where they finish first.

    An exact size goes, after model affinity and health, where it fragments least: the GPU
    whose free memory it leaves least unusable to the typical exact-size requests (the FGD
    measure, :func:`~gpu_request_router.core.fragmentation.share_cost`, in buckets of
    :data:`~gpu_request_router.core.fragmentation.DEFAULT_QUANTUM` of the GPU's memory,
    :func:`~gpu_request_router.core.fragmentation.cost_bucket`), then the tightest fit in whole
    GiB, then the least busy. The typical requests are learnt from the exact-size needs this
    policy placed (:meth:`placed`): shapes (per-GPU memory rounded up to whole GiB, GPU count)
    in a :class:`~gpu_request_router.core.fragmentation.RequestMix` of at most
    :data:`~gpu_request_router.core.fragmentation.DEFAULT_SHAPES` shapes; the most counted
    ones covering 95 % of them, at most :data:`TYPICAL_SHAPES`, weights renormalised over
    those, are taken after the 1st, 2nd, 4th, … placement and every :data:`REFRESH_EVERY`
    past 256. Until then nothing is typical, every cost is 0, and the tightest fit decides.

    The expected finish of an estimated request on a GPU (``service``,
    :class:`~gpu_request_router.core.service_model.ServiceModel`) is its load time where the
    GPU holds no copy of its model's weights (neither loaded nor cached), plus its duration alone
    on the GPU's type times the slowdown of sharing the GPU with what runs there (its busy share
    of slots); among equal finishes, the most room left (the room absorbs the estimate's error),
    then the least busy.
    """

    name = "balanced"

    def __init__(self, service: ServiceModel | None = None) -> None:
        self.service = service or ServiceModel.of()
        self.mix: RequestMix[tuple[int, int]] = RequestMix()
        self.typical: tuple[Demand, ...] = ()
        self._refresh_at = 1

    def placed(self, need: Need) -> None:
        """Count an exact-size need's shape; refresh the typical shapes when it is time."""
        if not need.exact or need.memory_mb <= 0:
            return
        mix = self.mix
        mix.observe((-(-need.memory_mb // _GIB) * _GIB, need.gpu_count))
        if mix.total >= self._refresh_at:
            self._refresh_at = min(2 * self._refresh_at, self._refresh_at + REFRESH_EVERY)
            typical = mix.typical()
            total = (
                1.0
                if len(typical) <= TYPICAL_SHAPES
                else sum(w for _, w in typical[:TYPICAL_SHAPES])
            )
            self.typical = tuple(
                Demand(size, count, weight / total)
                for (size, count), weight in typical[:TYPICAL_SHAPES]
            )

    def share_bucket(self, unit: GPUState | GPUGroup, memory: int) -> int:
        """The fragmentation bucket of an exact-size placement on ``unit`` (class docstring)."""
        typical = self.typical
        if not typical:
            return 0
        if isinstance(unit, GPUGroup):
            return cost_bucket(self._grown(unit, memory), unit.gpus[0].memory_total_mb)
        return cost_bucket(share_cost(unit.room_mb, memory, typical), unit.memory_total_mb)

    def _grown(self, unit: GPUState | GPUGroup, memory: int) -> float:
        """The growth of the free memory the typical sizes could not use, over ``unit``'s GPUs."""
        if isinstance(unit, GPUGroup):
            pairs = zip(unit.gpus, unit.reservations, strict=True)
            return sum(share_cost(gpu.room_mb, taken, self.typical) for gpu, taken in pairs)
        return share_cost(unit.room_mb, memory, self.typical)

    def key(self, option: Option, need: Need) -> tuple[float, ...]:
        """Pack what is known, send the rest where it finishes first (class docstring)."""
        unit, memory, loaded = option
        if need.exact:
            return (
                not loaded,
                unit.health is _DEGRADED,
                self.share_bucket(unit, memory),
                (unit.room_mb - memory) // _GIB,
                unit.busy,
            )
        return (
            unit.health is _DEGRADED,
            self.finish_s(need, unit),
            memory - unit.room_mb,
            unit.busy,
        )

    def scores(self, key: tuple[float, ...], need: Need) -> dict[str, float]:
        """Exact: affinity, health, fragmentation, GiB left, load; estimated: finish time first."""
        if need.exact:
            return {
                "model_loaded": float(not key[0]),
                "degraded": float(key[1]),
                "fragmentation_bucket": float(key[2]),
                "room_left_gib": float(key[3]),
                "busy": float(key[4]),
            }
        return {
            "degraded": float(key[0]),
            "expected_finish_s": round(float(key[1]), 3),
            "room_left_mb": -float(key[2]),
            "busy": float(key[3]),
        }

    def finish_s(self, need: Need, unit: GPUState | GPUGroup) -> float:
        """Seconds until ``need`` would finish on ``unit`` if started now (class docstring)."""
        gpus = unit.gpus if isinstance(unit, GPUGroup) else (unit,)
        first = gpus[0].reading
        cold = not all(gpu.holds(need.model) for gpu in gpus)
        return self._finish(need, first.type, cold, unit.busy * first.slots)

    def _finish(self, need: Need, gpu_type: str, cold: bool, running: float) -> float:
        service = self.service
        load = service.load_s(need.weights_mb) if cold else 0.0
        return load + need.duration_on(gpu_type) * service.slowdown(need.task, running + 1)

    def search(
        self, shelf: Shelf, memory: int, need: Need, skip: Callable[[str], bool]
    ) -> Best | None:
        """The shelf's least fragmenting fit (exact) or its soonest finish (estimated).

        Exact: :meth:`Shelf.least_cost_gib
        <gpu_request_router.core.placement_index.Shelf.least_cost_gib>` with the rooms where the
        fragmentation cost jumps (:func:`~gpu_request_router.core.fragmentation.share_breaks`).

        On one shelf the finish grows with the busy share alone: the least busy GPU with the
        most room is the shelf's best, or the roomiest where sharing costs nothing.
        """
        if need.exact:
            typical = self.typical
            if typical:
                capacity = shelf.memory_total_mb

                def bucket(room: int) -> int:
                    return cost_bucket(share_cost(room, memory, typical), capacity)

                found = shelf.least_cost_gib(memory, skip, share_breaks(memory, typical), bucket)
            else:
                found = shelf.least_cost_gib(memory, skip)
            if found is None:
                return None
            key, gpu_id = found
            return (need.model not in shelf.models_loaded, shelf.degraded, *key), gpu_id
        duration = need.duration_on(shelf.type)
        sharing_costs = duration * (self.service.slowdown(need.task, 2) - 1) > 0
        found = (shelf.least_busy if sharing_costs else shelf.roomiest)(memory, skip)
        if found is None:
            return None
        key, gpu_id = found
        busy, spread = (key[0], key[1]) if sharing_costs else (key[1], key[0])
        cold = need.model not in shelf.models_loaded and need.model not in shelf.models_cached
        finish = self._finish(need, shelf.type, cold, busy * shelf.slots)
        return (shelf.degraded, finish, spread, busy, key[2]), gpu_id

    def explain(self, option: Option, need: Need) -> str:
        """The fragmentation behind an exact size's placement; an estimated one's finish."""
        if need.exact:
            if not self.typical:
                return ""
            grown = self._grown(option[0], option[1]) / _GIB
            return f"fragmentation {grown:+.1f} GiB for the typical sizes; "
        unit = option[0]
        first = unit.gpus[0] if isinstance(unit, GPUGroup) else unit
        gpus = unit.gpus if isinstance(unit, GPUGroup) else (unit,)
        sharing = unit.busy * first.slots
        load = "" if all(gpu.holds(need.model) for gpu in gpus) else ", a cold start"
        return (
            f"expected to finish in {self.finish_s(need, unit):.1f} s "
            f"({first.type}, {sharing:g} running beside it{load}); "
        )


class BestFitPolicy(IndexedPolicy):
    """The least memory left over."""

    name = "best_fit"

    def key(self, option: Option, need: Need) -> tuple[float, ...]:
        """The room left after placement, then the load."""
        return option[0].room_mb - option[1], option[0].busy

    def scores(self, key: tuple[float, ...], need: Need) -> dict[str, float]:
        """The room left and the load."""
        return {"room_left_mb": float(key[0]), "busy": float(key[1])}

    def search(
        self, shelf: Shelf, memory: int, need: Need, skip: Callable[[str], bool]
    ) -> Best | None:
        """The shelf's GPU with the least room left."""
        return shelf.tightest(memory, skip)


def _least_busy(option: Option) -> tuple[float, int]:
    return option[0].busy, option[1] - option[0].room_mb


def _load_scores(key: tuple[float, ...]) -> dict[str, float]:
    return {"busy": float(key[0]), "room_left_mb": -float(key[1])}


class LeastLoadedPolicy(IndexedPolicy):
    """The fewest busy slots, then the most room."""

    name = "least_loaded"

    def key(self, option: Option, need: Need) -> tuple[float, ...]:
        """The load, then the most room."""
        return _least_busy(option)

    def scores(self, key: tuple[float, ...], need: Need) -> dict[str, float]:
        """The load and the room left."""
        return _load_scores(key)

    def search(
        self, shelf: Shelf, memory: int, need: Need, skip: Callable[[str], bool]
    ) -> Best | None:
        """The shelf's least busy fitting GPU."""
        return shelf.least_busy(memory, skip)


class PowerOfTwoPolicy(Policy):
    """Two options at random, the less loaded of them."""

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, options: Sequence[Option], need: Need) -> Option:
        """Sample two options and pick the less busy one."""
        return self.choose_weighed(options, need)[0]

    def choose_weighed(self, options: Sequence[Option], need: Need) -> tuple[Option, list[Weighed]]:
        """The less busy of two options sampled, and the pair as weighed (the choice first)."""
        pair = self._rng.sample(options, 2) if len(options) > 1 else list(options)
        pair.sort(key=_least_busy)
        note, count = "sampled among {count} feasible", len(options)
        return pair[0], [_weighed(option, _least_busy(option), note, count) for option in pair]

    def scores(self, key: tuple[float, ...], need: Need) -> dict[str, float]:
        """The load and the room left."""
        return _load_scores(key)


class RoundRobinPolicy(Policy):
    """The next option after the last one chosen, in GPU order (worker, then index)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last: tuple[str, int] = ("", -1)

    def choose(self, options: Sequence[Option], need: Need) -> Option:
        """Pick the first option whose (first) GPU comes after the previous choice, wrapping."""
        last = self._last

        def order(option: Option) -> tuple[bool, tuple[str, int]]:
            position = (option[0].worker, option[0].index)
            return position <= last, position

        best = min(options, key=order)
        self._last = (best[0].worker, best[0].index)
        return best


class RandomPolicy(Policy):
    """Any option, uniformly."""

    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, options: Sequence[Option], need: Need) -> Option:
        """Pick an option at random."""
        return self._rng.choice(options)


POLICIES: Mapping[str, Callable[[random.Random, ServiceModel], Policy]] = {
    "balanced": lambda rng, service: BalancedPolicy(service),
    "best_fit": lambda rng, service: BestFitPolicy(),
    "least_loaded": lambda rng, service: LeastLoadedPolicy(),
    "power_of_two": lambda rng, service: PowerOfTwoPolicy(rng),
    "round_robin": lambda rng, service: RoundRobinPolicy(),
    "random": lambda rng, service: RandomPolicy(rng),
}


def make_policy(name: str, seed: int = 0, service: ServiceModel | None = None) -> Policy:
    """The policy called ``name``, its random choices seeded with ``seed``.

    ``service``: how GPUs serve work, for the policies that predict finish times (``balanced``).
    """
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}") from None
    return factory(random.Random(seed), service or ServiceModel.of())


class LoadBalancer:
    """Filters GPUs for a request and asks the policy to choose among the rest."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def place(
        self,
        need: Need,
        fleet: PlacementIndex,
        held: Collection[str] = (),
        *,
        learn: bool = True,
    ) -> Chosen | NoFit:
        """Choose GPUs for ``need`` among ``fleet``'s schedulable GPUs, skipping ``held`` ones.

        A need placed is shown to the policy (:meth:`Policy.placed`), which may learn from it;
        without ``learn`` (a choice that places nothing) it is not.
        """
        if not fleet.any_free_slot:
            return NoFit(free_slots=False)
        policy = self.policy
        if need.gpu_count == 1 and isinstance(policy, IndexedPolicy):
            chosen = self._search(policy, need, fleet, held)
        else:
            chosen = self._scan(need, fleet.schedulable.values(), held)
        if learn and isinstance(chosen, Chosen):
            policy.placed(need)
        return chosen

    @staticmethod
    def _search(
        policy: IndexedPolicy, need: Need, fleet: PlacementIndex, held: Collection[str]
    ) -> Chosen | NoFit:
        """The policy's best GPU over the index's shelves: GPUs to avoid only if nothing else fits.

        The same choice as :meth:`_scan`, since every shelf answers with its best by the
        policy's full key, ties broken by the order the scan would meet the GPUs in.
        """
        avoid = need.avoid

        def skip_avoided(gpu_id: str) -> bool:
            return gpu_id in held or gpu_id in avoid

        def skip_held(gpu_id: str) -> bool:
            return gpu_id in held

        without_weights = need.memory_mb - need.weights_mb
        candidates: list[tuple[Shelf, int, bool]] = []  # once, not once per skip rule
        for shelf in fleet.shelves():
            if (need.gpu_type is None or shelf.type == need.gpu_type) and shelf.serves(need.model):
                loaded = need.model in shelf.models_loaded
                candidates.append((shelf, without_weights if loaded else need.memory_mb, loaded))
        for skip in (skip_avoided, skip_held) if avoid else (skip_held,):
            best: Best | None = None
            found_on: list[tuple[tuple[float, ...], str, int]] = []
            for shelf, memory, loaded in candidates:
                found = policy.search(shelf, memory, need, skip)
                if found is not None:
                    found_on.append((found[0], found[1], len(shelf.by_room)))
                    if best is None or found[0] < best[0]:
                        best = found
                        best_memory, best_loaded = memory, loaded
            if best is not None:
                option: Option = (fleet.schedulable[best[1]], best_memory, best_loaded)
                ranked = heapq.nsmallest(WEIGHED, found_on)
                weighed = [Weighed((gpu_id,), key, _ALIKE, alike) for key, gpu_id, alike in ranked]
                return Chosen.of(option, policy.name, policy.explain(option, need), weighed)
        return NoFit(free_slots=True)

    def _scan(self, need: Need, gpus: Iterable[GPUState], held: Collection[str]) -> Chosen | NoFit:
        """Filter every GPU, then let the policy choose among the survivors: O(GPUs)."""
        # The hot loop of the router: plain attribute reads, one small tuple per feasible GPU.
        fitting: list[tuple[GPUState, int, bool]] = []
        feasible: list[tuple[GPUState, int, bool]] = []
        free_slots = False
        model, gpu_type, avoid = need.model, need.gpu_type, need.avoid
        full, without_weights = need.memory_mb, need.memory_mb - need.weights_mb
        for gpu in gpus:
            if gpu.free_slots <= 0:
                continue
            free_slots = True
            if gpu.id in held:
                continue
            reading = gpu.reading
            if gpu_type is not None and reading.type != gpu_type:
                continue
            models = reading.models
            if "*" not in models and model not in models:
                continue
            loaded = model in reading.models_loaded
            memory = without_weights if loaded else full
            if memory > gpu.room_mb:
                continue
            option = (gpu, memory, loaded)
            feasible.append(option)
            if gpu.id not in avoid:
                fitting.append(option)
        options: Sequence[Option] = (
            self._groups(feasible, need) if need.gpu_count > 1 else fitting or feasible
        )
        if not options:
            return NoFit(free_slots=free_slots)
        policy = self.policy
        chosen, weighed = policy.choose_weighed(options, need)
        return Chosen.of(chosen, policy.name, policy.explain(chosen, need), weighed)

    @staticmethod
    def _groups(options: Iterable[tuple[GPUState, int, bool]], need: Need) -> list[Option]:
        """One group per worker with enough GPUs: its tightest-fitting ones, in index order.

        Tight groups leave big holes intact. GPUs the request should avoid are taken only when
        no worker has enough without them; a group may then mix both (the avoided ones are
        taken last).
        """
        count, avoid = need.gpu_count, need.avoid
        by_worker: dict[str, list[tuple[bool, int, str, GPUState, int, bool]]] = {}
        for gpu, memory, loaded in options:
            ranked = (gpu.id in avoid, gpu.room_mb - memory, gpu.id, gpu, memory, loaded)
            worker = by_worker.get(gpu.reading.worker)
            if worker is None:
                by_worker[gpu.reading.worker] = [ranked]
            else:
                worker.append(ranked)
        clean: list[list[tuple[bool, int, str, GPUState, int, bool]]] = []
        mixed: list[list[tuple[bool, int, str, GPUState, int, bool]]] = []
        for ranked_options in by_worker.values():
            if len(ranked_options) < count:
                continue
            ranked_options.sort()
            chosen = ranked_options[:count]
            (mixed if chosen[-1][0] else clean).append(chosen)
        groups: list[Option] = []
        for chosen in clean or mixed:
            in_order = sorted(chosen, key=lambda ranked: ranked[3].reading.index)
            group = GPUGroup([(gpu, memory) for _, _, _, gpu, memory, _ in in_order])
            groups.append((group, sum(group.reservations), all(o[5] for o in chosen)))
        return groups

    def prospect(
        self,
        need: Need,
        gpus: Iterable[GPUState],
        frees_at: Callable[[GPUState, int], float] | None = None,
    ) -> tuple[str, ...] | None:
        """GPUs where ``need`` would fit once their current work drains: the soonest to fit.

        ``frees_at(gpu, short_mb)`` tells when a GPU is expected to have freed ``short_mb``
        more (the router knows its executions' starts and estimated durations); the prospect is
        the worker's ``gpu_count`` GPUs expected to fit soonest, then the least memory still to
        be freed, then the least reserved, then GPU id. Without ``frees_at``, the least memory
        still to be freed comes first. GPUs the request should avoid (it failed there) are taken
        last.
        """
        by_worker: dict[str, list[GPUState]] = {}
        for gpu in gpus:
            if not need.runs_on(gpu):
                continue
            # What drains: this router's reservations, and other routers' (a shared store).
            if need.memory_on(gpu) > gpu.room_mb + gpu.reserved_mb + gpu.elsewhere_mb:
                continue
            by_worker.setdefault(gpu.worker, []).append(gpu)

        def rank(gpu: GPUState) -> tuple[bool, float, int, int, str]:
            short = max(0, need.memory_on(gpu) - gpu.room_mb)
            fits_at = 0.0 if frees_at is None else frees_at(gpu, short)
            return gpu.id in need.avoid, fits_at, short, gpu.reserved_mb, gpu.id

        best: tuple[int, float, int, int, tuple[str, ...]] | None = None
        for options in by_worker.values():
            if len(options) < need.gpu_count:
                continue
            ranked = sorted(rank(gpu) for gpu in options)
            group = ranked[: need.gpu_count]
            score = (
                sum(entry[0] for entry in group),
                max(entry[1] for entry in group),
                sum(entry[2] for entry in group),
                sum(entry[3] for entry in group),
                tuple(entry[4] for entry in group),
            )
            if best is None or score < best:
                best = score
        return None if best is None else best[4]

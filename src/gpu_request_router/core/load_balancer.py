"""Placement: filter the GPUs that can take a request now, then let a policy choose.

The filter is shared by every policy: the GPU is schedulable (healthy or degraded, not cordoned,
circuit closed), serves the model, is of the requested type, has a free slot, has room for the
request's memory (without the weights where the model is loaded already), and is neither held for
a starving request nor, when others qualify, one the request already failed on. A request for
``gpu_count`` > 1 needs that many such GPUs on one worker.

Policies (:data:`POLICIES`) only rank the survivors; each is a small class with ``choose()``:

- ``balanced`` (default): model already loaded first, then healthy before degraded, then the
  tightest memory fit (whole GiB), then the least busy;
- ``best_fit``: the least memory left over;
- ``least_loaded``: the fewest busy slots, then the most room;
- ``power_of_two``: two random candidates, the less loaded of them;
- ``round_robin``: the next candidate after the last one chosen, in GPU order;
- ``random``: any candidate.

One decision costs O(GPUs).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from gpu_request_router.models.gpu_state import GPUHealth, GPUState

__all__ = [
    "POLICIES",
    "Candidate",
    "Chosen",
    "LoadBalancer",
    "Need",
    "NoFit",
    "Policy",
    "make_policy",
]

_GIB = 1024


@dataclass(frozen=True, slots=True)
class Need:
    """What a request needs from the fleet: per-GPU memory (with its weights share) and GPUs."""

    model: str
    memory_mb: int
    weights_mb: int = 0
    gpu_count: int = 1
    gpu_type: str | None = None
    avoid: frozenset[str] = frozenset()

    def memory_on(self, gpu: GPUState) -> int:
        """Memory to reserve on ``gpu``: no weights where the model is loaded already."""
        return self.memory_mb - self.weights_mb if gpu.has_loaded(self.model) else self.memory_mb


@dataclass(frozen=True, slots=True)
class Candidate:
    """A feasible choice: one worker's GPUs, the memory to reserve on each, model affinity."""

    worker: str
    gpus: tuple[GPUState, ...]
    reservations: tuple[int, ...]
    loaded: bool = False

    @property
    def leftover_mb(self) -> int:
        """Memory left for placement after this request, summed over its GPUs."""
        return sum(gpu.room_mb - mb for gpu, mb in zip(self.gpus, self.reservations, strict=True))

    @property
    def busy(self) -> float:
        """The busiest of its GPUs (0..1): slots in use, or the backend's own load if higher."""
        return max(
            max((gpu.slots - gpu.free_slots) / gpu.slots, gpu.reading.load or 0.0)
            for gpu in self.gpus
        )


@dataclass(frozen=True, slots=True)
class Chosen:
    """The policy's choice: a worker, its GPUs, the memory to reserve on each, and why."""

    worker: str
    gpu_ids: tuple[str, ...]
    reservations: Mapping[str, int]
    reason: str


@dataclass(frozen=True, slots=True)
class NoFit:
    """No GPU can take the request now; ``free_slots`` says whether any had a free slot at all."""

    free_slots: bool


class Policy(ABC):
    """Ranks feasible candidates; filtering is done before a policy is asked."""

    name: str = ""

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
        """Pick one of ``candidates`` (never empty) and say why, in a few words."""


def _describe(candidate: Candidate) -> str:
    leftover = candidate.leftover_mb / _GIB
    busy = sum(gpu.slots - gpu.free_slots for gpu in candidate.gpus)
    slots = sum(gpu.slots for gpu in candidate.gpus)
    return f"leaves {leftover:.1f} GiB, {busy}/{slots} slots busy"


class BalancedPolicy(Policy):
    """Model affinity, then health, then the tightest memory fit (whole GiB), then load."""

    name = "balanced"

    def choose(self, candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
        """Pick the candidate that keeps large holes free without piling onto busy GPUs."""
        best = min(
            candidates,
            key=lambda c: (
                not c.loaded,
                any(gpu.health is GPUHealth.DEGRADED for gpu in c.gpus),
                c.leftover_mb // _GIB,
                c.busy,
            ),
        )
        affinity = "model loaded; " if best.loaded else ""
        return best, f"balanced: {affinity}{_describe(best)}"


class BestFitPolicy(Policy):
    """The least memory left over."""

    name = "best_fit"

    def choose(self, candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
        """Pick the candidate with the least room left after placement."""
        best = min(candidates, key=lambda c: (c.leftover_mb, c.busy))
        return best, f"best_fit: {_describe(best)}"


class LeastLoadedPolicy(Policy):
    """The fewest busy slots, then the most room."""

    name = "least_loaded"

    def choose(self, candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
        """Pick the least busy candidate."""
        best = min(candidates, key=lambda c: (c.busy, -c.leftover_mb))
        return best, f"least_loaded: {_describe(best)}"


class PowerOfTwoPolicy(Policy):
    """Two candidates at random, the less loaded of them."""

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
        """Sample two candidates and pick the less busy one."""
        pair = self._rng.sample(list(candidates), 2) if len(candidates) > 1 else [candidates[0]]
        best = min(pair, key=lambda c: (c.busy, -c.leftover_mb))
        return best, f"power_of_two: {_describe(best)}"


def _position(candidate: Candidate) -> tuple[str, int]:
    """Where a candidate stands in GPU order: worker name, then GPU index as a number."""
    first = candidate.gpus[0]
    return first.worker, first.reading.index


class RoundRobinPolicy(Policy):
    """The next candidate after the last one chosen, in GPU order (worker, then index)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last: tuple[str, int] = ("", -1)

    def choose(self, candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
        """Pick the first candidate whose first GPU comes after the previous choice."""
        ordered = sorted(candidates, key=_position)
        best = next((c for c in ordered if _position(c) > self._last), ordered[0])
        self._last = _position(best)
        return best, f"round_robin: {_describe(best)}"


class RandomPolicy(Policy):
    """Any candidate, uniformly."""

    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[Candidate]) -> tuple[Candidate, str]:
        """Pick a candidate at random."""
        best = self._rng.choice(list(candidates))
        return best, f"random: {_describe(best)}"


POLICIES: Mapping[str, Callable[[random.Random], Policy]] = {
    "balanced": lambda rng: BalancedPolicy(),
    "best_fit": lambda rng: BestFitPolicy(),
    "least_loaded": lambda rng: LeastLoadedPolicy(),
    "power_of_two": PowerOfTwoPolicy,
    "round_robin": lambda rng: RoundRobinPolicy(),
    "random": RandomPolicy,
}


def make_policy(name: str, seed: int = 0) -> Policy:
    """The policy called ``name``, its random choices seeded with ``seed``."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}") from None
    return factory(random.Random(seed))


class LoadBalancer:
    """Filters GPUs for a request and asks the policy to choose among the rest."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def place(
        self,
        need: Need,
        gpus: Iterable[GPUState],
        held: Collection[str] = (),
    ) -> Chosen | NoFit:
        """Choose GPUs for ``need`` among ``gpus`` (schedulable ones), skipping ``held`` GPUs."""
        fitting: dict[str, list[tuple[GPUState, int]]] = {}
        feasible: dict[str, list[tuple[GPUState, int]]] = {}
        free_slots = False
        model, gpu_type, avoid = need.model, need.gpu_type, need.avoid
        for gpu in gpus:
            if gpu.free_slots <= 0 or gpu.id in held:
                continue
            free_slots = True
            if gpu_type is not None and gpu.reading.type != gpu_type:
                continue
            if not gpu.serves(model):
                continue
            memory = need.memory_on(gpu)
            if memory > gpu.room_mb:
                continue
            feasible.setdefault(gpu.worker, []).append((gpu, memory))
            if gpu.id not in avoid:
                fitting.setdefault(gpu.worker, []).append((gpu, memory))
        # Avoided GPUs only when nothing fits without them; a multi-GPU group may then mix both.
        candidates = self._candidates(fitting, need) or self._candidates(feasible, need)
        if not candidates:
            return NoFit(free_slots=free_slots)
        chosen, reason = self.policy.choose(candidates)
        gpu_ids = tuple(gpu.id for gpu in chosen.gpus)
        return Chosen(
            worker=chosen.worker,
            gpu_ids=gpu_ids,
            reservations=dict(zip(gpu_ids, chosen.reservations, strict=True)),
            reason=reason,
        )

    def _candidates(
        self, by_worker: Mapping[str, list[tuple[GPUState, int]]], need: Need
    ) -> list[Candidate]:
        count = need.gpu_count
        candidates = []
        for worker, options in by_worker.items():
            if len(options) < count:
                continue
            if count == 1:
                groups = [[option] for option in options]
            else:
                # The tightest-fitting GPUs of the worker, so that a group leaves big holes intact
                # (GPUs the request should avoid last).
                groups = [
                    sorted(
                        options,
                        key=lambda o: (o[0].id in need.avoid, o[0].room_mb - o[1], o[0].id),
                    )[:count]
                ]
            for group in groups:
                gpus = tuple(gpu for gpu, _ in group)
                candidates.append(
                    Candidate(
                        worker=worker,
                        gpus=gpus,
                        reservations=tuple(mb for _, mb in group),
                        loaded=all(gpu.has_loaded(need.model) for gpu in gpus),
                    )
                )
        return candidates

    def prospect(self, need: Need, gpus: Iterable[GPUState]) -> tuple[str, ...] | None:
        """GPUs where ``need`` would fit once their current work drains (the fewest reserved)."""
        by_worker: dict[str, list[GPUState]] = {}
        for gpu in gpus:
            if need.gpu_type is not None and gpu.reading.type != need.gpu_type:
                continue
            if not gpu.serves(need.model):
                continue
            if need.memory_on(gpu) > gpu.room_mb + gpu.reserved_mb:
                continue
            by_worker.setdefault(gpu.worker, []).append(gpu)
        best: tuple[int, tuple[str, ...]] | None = None
        for options in by_worker.values():
            if len(options) < need.gpu_count:
                continue
            group = sorted(options, key=lambda gpu: (gpu.reserved_mb, gpu.id))[: need.gpu_count]
            score = (sum(gpu.reserved_mb for gpu in group), tuple(gpu.id for gpu in group))
            if best is None or score < best:
                best = score
        return None if best is None else best[1]

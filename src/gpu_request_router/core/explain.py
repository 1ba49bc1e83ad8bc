"""Explain a request: where it was placed and why, or why it still waits and until when.

Computed from the core's state alone (no I/O), at the time the driver gives:

- **Placed** (dispatching, running or ended after a placement): the placement and its reason
  (persisted with the request), and the candidates the policy weighed, best first, with the parts
  of its ranking key by name. The candidates are kept in memory at decision time for the latest
  :data:`DECISIONS_KEPT` dispatches (:class:`DecisionLog`); after a restart, or once evicted, only
  the reason is left.
- **Waiting** (queued): what blocks it — a retry's backoff, its user's quota (``max_concurrent``,
  ``gpu_seconds_per_hour``), no schedulable GPU that could hold it (``no_gpu``), GPUs that would
  take it held for an older starving request (``starvation_hold``), no free slot where it fits
  (``slots``), not enough free memory (``memory``), or requests ahead of it served first
  (``priority``) — its queue position and an ETA.

**The ETA** (:func:`project_start`) replays the queue forward in the router's own estimates: the
running executions end at their start plus their estimated duration on their GPU's type (one past
that is expected to run a tenth as long again as it has run: :func:`expected_end`), and the
queued requests start in queue order on the GPUs the request could use — the ones ahead of it,
it, and up to :data:`ETA_AHEAD` behind it, which take what fits before it does (backfill) — each
on the fitting GPU with the most room, holding its estimated memory for its estimated duration.
GPUs held for a starving request stay its own until it starts, and a request that has waited
``placement.starvation_bound_s`` without fitting holds the GPU with the most room, as the router
would. The ETA is when it starts (or when its user's quota frees, if later). It knows nothing of
arrivals to come, nor of answers longer than estimated: it is a forecast, and ``gpurouter bench
replay --eta`` measures its error (docs/benchmarks.md, "Explain: how good is the ETA").
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gpu_request_router.core.fit import need_of
from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.core.holds import Holds
from gpu_request_router.core.load_balancer import Need, Policy, Weighed
from gpu_request_router.core.priority_manager import PriorityManager
from gpu_request_router.core.quota import QuotaEnforcer
from gpu_request_router.core.state_store import QueueHead
from gpu_request_router.models.gpu_state import GPUState
from gpu_request_router.models.request import Request, RequestStatus

__all__ = [
    "DECISIONS_KEPT",
    "ETA_AHEAD",
    "POSITION_LIMIT",
    "Candidate",
    "Decided",
    "DecisionLog",
    "Explainer",
    "Explanation",
    "Queued",
    "Waiting",
    "project_start",
]

DECISIONS_KEPT = 4096
"""Placement decisions whose candidates are kept for ``explain`` (the latest ones)."""

POSITION_LIMIT = 1_000
"""A queue position is counted this far at most (the walk costs O(position × log n))."""

ETA_AHEAD = 256
"""The ETA is projected for requests at most this many places back (else it is unknown)."""

_VISITS = 500_000
"""GPU visits a projection may make before it gives up (no ETA): a bound on explain's time
(about 60 ms on a 2-core x86 machine), however large the fleet and the queue."""

_GIB = 1024


@dataclass(frozen=True, slots=True)
class Decided:
    """A placement decision as kept for ``explain``: when, for what need, what it weighed."""

    at: float
    need: Need
    gpu_ids: tuple[str, ...]
    weighed: tuple[Weighed, ...]


class DecisionLog:
    """The latest placement decision of each request, for the latest ``limit`` dispatches."""

    def __init__(self, limit: int = DECISIONS_KEPT) -> None:
        self._limit = limit
        self._decided: OrderedDict[str, Decided] = OrderedDict()

    def __len__(self) -> int:
        return len(self._decided)

    def record(self, request_id: str, decided: Decided) -> None:
        """Keep ``decided`` as the request's latest decision; forget the oldest beyond the limit."""
        decisions = self._decided
        decisions[request_id] = decided
        decisions.move_to_end(request_id)
        if len(decisions) > self._limit:
            decisions.popitem(last=False)

    def get(self, request_id: str) -> Decided | None:
        """The request's latest decision, if still kept."""
        return self._decided.get(request_id)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A candidate GPU (the first of a group) as explained: where, whether chosen, its scores."""

    gpu_id: str
    worker: str
    type: str
    chosen: bool
    score: Mapping[str, float]
    note: str


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why a queued request waits, its position (``None`` while backing off) and its ETA (s)."""

    blocked_by: str
    detail: str
    queue_position: int | None
    eta_s: float | None


@dataclass(frozen=True, slots=True)
class Explanation:
    """Where a request was placed and why, or why it waits (module docstring)."""

    id: str
    status: str
    summary: str
    worker: str | None = None
    gpu_id: str | None = None
    reason: str | None = None
    policy: str | None = None
    candidates: tuple[Candidate, ...] = ()
    waiting: Waiting | None = None
    decided_at: float | None = None


class Running(Protocol):
    """A live execution as the explainer reads it: whose, and when it was dispatched."""

    request_id: str
    dispatched_at: float


@dataclass(slots=True)
class _Slot:
    """A GPU in a projection: its room and free slots as they evolve."""

    gpu: GPUState
    room_mb: int
    free_slots: int


@dataclass(order=True, slots=True)
class _Release:
    at: float
    gpu_id: str = field(compare=False)
    memory_mb: int = field(compare=False)


def expected_end(request: Request, started: float, gpu_type: str, now: float) -> float:
    """When an execution started at ``started`` is expected to end, seen at ``now``.

    At its start plus its estimated duration on ``gpu_type``; once past that, a tenth of the time
    it has run from ``now`` (an answer longer than estimated is likely a long one). The tenth was
    chosen on the first 3,000 rows of the headline replay among 0, 0.1, 0.25 and 0.5 (median /
    p90 absolute error 0.09 / 1.59, 0.21 / 1.26, 0.42 / 1.19 and 0.69 / 2.16 s; at 0 nearly
    every ETA is 0, and 0.5 is the holds' rule).
    """
    estimate = request.estimate
    duration = estimate.duration_s.get(gpu_type, estimate.typical_duration_s)
    due = started + duration
    return max(due, now + 0.1 * (now - started))


def _fits(
    request_id: str, need: Need, slots: Iterable[_Slot], held: Mapping[str, str]
) -> list[_Slot] | None:
    """The GPUs ``need`` takes now in a projection: the roomiest that fit, on one worker.

    GPUs ``held`` (GPU id → holder) for another request are left out.
    """
    by_worker: dict[str, list[_Slot]] = {}
    for slot in slots:
        gpu = slot.gpu
        if slot.free_slots <= 0 or need.memory_on(gpu) > slot.room_mb:
            continue
        if held.get(gpu.id, request_id) != request_id or not need.runs_on(gpu):
            continue
        by_worker.setdefault(gpu.worker, []).append(slot)
    best: list[_Slot] | None = None
    for group in by_worker.values():
        if len(group) < need.gpu_count:
            continue
        group.sort(key=lambda slot: (-slot.room_mb, slot.gpu.id))
        taken = group[: need.gpu_count]
        if best is None or taken[-1].room_mb > best[-1].room_mb:
            best = taken
    return best


@dataclass(frozen=True, slots=True)
class Queued:
    """A queued request as a projection sees it: its id, its need, when it was submitted."""

    request_id: str
    need: Need
    created_at: float


def _hold(entry: Queued, slots: Mapping[str, _Slot], holds: dict[str, str]) -> None:
    """A starving request holds the free-of-holds GPU that could hold it with the most room."""
    need = entry.need
    if need.gpu_count != 1 or entry.request_id in holds.values():
        return
    best: _Slot | None = None
    for slot in slots.values():
        if slot.gpu.id in holds or not need.runs_on(slot.gpu):
            continue
        if best is None or slot.room_mb > best.room_mb:
            best = slot
    if best is not None:
        holds[best.gpu.id] = entry.request_id


def project_start(
    now: float,
    ahead: Sequence[Queued],
    target: Queued,
    gpus: Iterable[GPUState],
    releases: Iterable[tuple[float, str, int]],
    depth: int,
    held: Mapping[str, str] | None = None,
    bound_s: float = math.inf,
    behind: Sequence[Queued] = (),
) -> float | None:
    """When ``target`` is expected to start, the requests ``ahead`` of it starting first.

    ``gpus``: the GPUs the projection places on (their room and free slots now); ``releases``:
    (time, GPU id, MiB) of the running executions' expected ends; ``depth``: how many requests
    that do not fit one pass skips before it stops (``placement.backfill_depth``); ``held``: GPU
    id → the request it is held for (a starvation hold), kept from the others until that request
    starts; ``bound_s``: ``placement.starvation_bound_s``, past which a request that does not
    fit holds a GPU (the one with the most room) in the projection too; ``behind``: the requests
    served after it, which take what fits before it does (backfill). ``None`` when it would
    never start on these GPUs, or when the projection would take more than :data:`_VISITS`
    GPU visits.
    """
    slots = {gpu.id: _Slot(gpu, gpu.room_mb, gpu.free_slots) for gpu in gpus}
    heap = [_Release(at, gpu_id, mb) for at, gpu_id, mb in releases if gpu_id in slots]
    heapq.heapify(heap)
    holds = dict(held or {})
    pending: list[Queued | None] = [*ahead, target, *behind]
    starving = (
        sorted(entry.created_at + bound_s for entry in [*ahead, target, *behind])
        if math.isfinite(bound_s)
        else []
    )
    at = now
    visits = 0
    while True:
        misses = 0
        for position, entry in enumerate(pending):
            if entry is None:
                continue
            taken = _fits(entry.request_id, entry.need, slots.values(), holds)
            visits += len(slots)
            if taken is None:
                if at - entry.created_at >= bound_s:
                    _hold(entry, slots, holds)
                misses += 1
                if misses >= depth:
                    break
                continue
            if entry is target:
                return at
            pending[position] = None
            for gpu_id in [g for g, holder in holds.items() if holder == entry.request_id]:
                del holds[gpu_id]
            for slot in taken:
                memory = entry.need.memory_on(slot.gpu)
                slot.room_mb -= memory
                slot.free_slots -= 1
                end = at + entry.need.duration_on(slot.gpu.type)
                heapq.heappush(heap, _Release(end, slot.gpu.id, memory))
        pending = [entry for entry in pending if entry is not None]
        crossing = next((t for t in starving if t > at), math.inf)
        if (not heap and crossing == math.inf) or visits > _VISITS:
            return None
        at = min(heap[0].at if heap else math.inf, crossing)
        while heap and heap[0].at <= at:
            release = heapq.heappop(heap)
            slot = slots[release.gpu_id]
            slot.room_mb += release.memory_mb
            slot.free_slots += 1
            visits += 1


class Explainer:
    """Explains requests from the router's live state, which it reads and never changes.

    ``cost(request)``: the GPU-seconds the quota charges it at dispatch; ``depth`` and
    ``bound_s``: ``placement.backfill_depth`` and ``placement.starvation_bound_s``;
    ``held_elsewhere`` and ``heads_elsewhere`` (a shared store): the GPUs other routers hold for
    their starving requests and their requests waiting for room, kept current by the router.
    """

    def __init__(
        self,
        *,
        monitor: GPUStateMonitor,
        queue: PriorityManager,
        holds: Holds,
        quotas: QuotaEnforcer,
        policy: Policy,
        decisions: DecisionLog,
        requests: Mapping[str, Request],
        executions: Mapping[str, Running],
        active: Mapping[str, int],
        avoid: Mapping[str, Collection[str]],
        backoff: Sequence[tuple[float, int, str]],
        cost: Callable[[Request], float],
        depth: int,
        bound_s: float,
        held_elsewhere: Mapping[str, float] | None = None,
        heads_elsewhere: Sequence[QueueHead] = (),
    ) -> None:
        self._monitor = monitor
        self._held_elsewhere = held_elsewhere if held_elsewhere is not None else {}
        self._heads_elsewhere = heads_elsewhere
        self._queue = queue
        self._holds = holds
        self._quotas = quotas
        self._policy = policy
        self._decisions = decisions
        self._requests = requests
        self._executions = executions
        self._active = active
        self._avoid = avoid
        self._backoff = backoff
        self._cost = cost
        self._depth = depth
        self._bound = bound_s

    def explain(self, request: Request, now: float, *, project: bool = True) -> Explanation:
        """Explain ``request`` (live or ended) at ``now``; without ``project``, waits get no ETA."""
        live = self._requests.get(request.id)
        if live is not None and live.status is RequestStatus.QUEUED:
            return self._waiting(live, now, project)
        request = live if live is not None else request
        placement = request.placement
        status = request.status.value
        if placement is None or request.status is RequestStatus.QUEUED:
            return Explanation(request.id, status, f"It was never placed; it is {status}.")
        gpu = self._monitor.gpus.get(placement.gpu_id)
        where = placement.gpu_id if gpu is None else f"{placement.gpu_id} ({gpu.type})"
        decided = self._decisions.get(request.id)
        if decided is not None and decided.gpu_ids != placement.gpu_ids:
            decided = None  # a decision of another attempt
        policy, _, why = placement.reason.partition(": ")
        tense = "is" if request.status.active else "was"
        summary = f"It {tense} placed on {where} by the {policy} policy: {why}."
        if request.status.terminal:
            summary += f" It ended {status}."
        return Explanation(
            request.id,
            status,
            summary,
            worker=placement.worker,
            gpu_id=placement.gpu_id,
            reason=placement.reason,
            policy=policy,
            candidates=self._candidates(decided, placement.gpu_ids) if decided else (),
            decided_at=decided.at if decided is not None else None,
        )

    def _candidates(self, decided: Decided, chosen: tuple[str, ...]) -> tuple[Candidate, ...]:
        gpus = self._monitor.gpus
        out = []
        for weighed in decided.weighed:
            first = weighed.gpu_ids[0]
            gpu = gpus.get(first)
            note = weighed.describe()
            if len(weighed.gpu_ids) > 1:
                together = f"with {', '.join(weighed.gpu_ids[1:])}"
                note = f"{together}; {note}" if note else together
            out.append(
                Candidate(
                    gpu_id=first,
                    worker=gpu.worker if gpu is not None else "",
                    type=gpu.type if gpu is not None else "",
                    chosen=weighed.gpu_ids == chosen,
                    score=self._policy.scores(weighed.key, decided.need) if weighed.key else {},
                    note=note,
                )
            )
        return tuple(out)

    # Waiting -------------------------------------------------------------------------------------

    def _waiting(self, request: Request, now: float, project: bool) -> Explanation:
        waiting = self.waiting(request, now, project=project)
        if waiting.eta_s is not None:
            eta = f"; expected to start in about {waiting.eta_s:.1f} s"
        elif not project:
            eta = "; no ETA now, as the router is busy (ask again shortly)"
        else:
            eta = ""
        position = "" if waiting.queue_position is None else f" (position {waiting.queue_position})"
        summary = f"It waits{position}: {waiting.detail}{eta}."
        return Explanation(request.id, request.status.value, summary, waiting=waiting)

    def waiting(self, request: Request, now: float, *, project: bool = True) -> Waiting:
        """Why a queued request waits, where it stands and (``project``) when it should start."""
        for until, _, request_id in self._backoff:
            if request_id == request.id and request.id not in self._queue:
                error = request.error.type if request.error is not None else "a failure"
                detail = f"retried after {error}, it returns to the queue after a backoff"
                return Waiting("retry_backoff", detail, None, max(0.0, until - now))
        ahead, behind = self._around(request, now)
        position = len(ahead) if ahead is not None else None
        need = need_of(request, avoid=self._avoid.get(request.id, ()))
        gpus = self._monitor.schedulable
        usable = [gpu for gpu in gpus.values() if self._could_hold(need, gpu)]
        eta = self._eta(request, need, ahead, behind, usable, now) if project else None
        user = request.user
        blocked = self._quotas.blocks_dispatch(user, self._active[user], self._cost(request), now)
        if blocked is not None:
            quota = self._quotas.quota_for(user)
            if blocked == "max_concurrent":
                detail = (
                    f"{user} has {self._active[user]} requests running, the quota's "
                    f"max_concurrent is {quota.max_concurrent}"
                )
                frees = self._user_frees_at(user, now)
            else:
                detail = (
                    f"{user} would pass the quota's gpu_seconds_per_hour "
                    f"({quota.gpu_seconds_per_hour:g})"
                )
                frees = self._quotas.gpu_seconds_frees_at(user, now)
            if eta is not None and frees is not None:
                eta = max(eta, frees - now)
            elif frees is None:
                eta = None
            return Waiting("quota", detail, position, eta)
        size = f"{need.memory_mb / _GIB:.1f} GiB{' per GPU' if need.gpu_count > 1 else ''}"
        if not usable:
            return Waiting("no_gpu", self._no_gpu(need, size), position, None)
        fitting = [gpu for gpu in usable if need.memory_on(gpu) <= gpu.room_mb]
        free = [gpu for gpu in fitting if gpu.free_slots > 0]
        own = self._holds.of(request.id)
        if free:
            held = {
                gpu_id: holder
                for holder, gpu_ids in self._holds.items()
                if holder != request.id
                for gpu_id in gpu_ids
            }
            elsewhere = self._held_elsewhere
            if all(gpu.id in held or gpu.id in elsewhere for gpu in free):
                holder = self._requests.get(held.get(free[0].id, ""))
                waited = "" if holder is None else f", queued {now - holder.created_at:.0f} s ago"
                where = "" if free[0].id in held else " of another router"
                detail = (
                    f"the GPUs that fit it ({', '.join(gpu.id for gpu in free[:4])}) are held "
                    f"for an older request{where}{waited}"
                )
                return Waiting("starvation_hold", detail, position, eta)
            ahead_of_it = f"{position}" if position is not None else f"over {POSITION_LIMIT:,}"
            detail = f"{ahead_of_it} requests ahead of it in the queue are served first"
            level = self._queue.level(request, now)
            above = sum(
                1
                for head in self._heads_elsewhere
                if self._queue.level_of_key(head.key, now) < level
            )
            if above:
                detail += (
                    f", and other routers keep room for {above} of a higher priority waiting there"
                )
            return Waiting("priority", detail, position, eta)
        if fitting:
            detail = (
                f"the GPUs with {size} free for it have no free slot "
                f"({', '.join(gpu.id for gpu in fitting[:4])})"
            )
            return Waiting("slots", detail, position, eta)
        roomiest = max(usable, key=lambda gpu: gpu.room_mb)
        detail = (
            f"it needs {size}; the roomiest GPU that could hold it, {roomiest.id}, has "
            f"{roomiest.room_mb / _GIB:.1f} GiB free"
        )
        if own:
            detail += f"; {', '.join(own)} are held for it"
        return Waiting("memory", detail, position, eta)

    def _around(self, request: Request, now: float) -> tuple[list[Request] | None, list[Request]]:
        """The queued requests served before ``request``, and some served after it.

        Before it: ``None`` when more than :data:`POSITION_LIMIT`; after it: up to
        :data:`ETA_AHEAD` (they backfill what it does not fit).
        """
        ahead: list[Request] = []
        behind: list[Request] = []
        found = False
        for position, queued in enumerate(self._queue.candidates(now, assume_dispatched=True)):
            if found:
                behind.append(queued)
                if len(behind) >= ETA_AHEAD:
                    break
            elif queued.id == request.id:
                found = True
            elif position >= POSITION_LIMIT:
                return None, []
            else:
                ahead.append(queued)
        return (ahead if found else None), behind

    @staticmethod
    def _could_hold(need: Need, gpu: GPUState) -> bool:
        """Whether ``gpu`` could hold ``need`` once the router's work on it drains."""
        return need.runs_on(gpu) and need.memory_on(gpu) <= gpu.room_mb + gpu.reserved_mb

    def _no_gpu(self, need: Need, size: str) -> str:
        gpus = self._monitor.gpus.values()
        kinds = [gpu for gpu in gpus if need.gpu_type is None or gpu.type == need.gpu_type]
        serving = [gpu for gpu in kinds if gpu.serves(need.model)]
        cordoned = sum(1 for gpu in serving if gpu.cordoned)
        unhealthy = sum(1 for gpu in serving if not gpu.cordoned and not gpu.schedulable)
        parts = [f"{len(serving)} serve {need.model}"]
        if need.gpu_type is not None:
            parts.insert(0, f"{len(kinds)} are {need.gpu_type}")
        if cordoned:
            parts.append(f"{cordoned} cordoned")
        if unhealthy:
            parts.append(f"{unhealthy} unhealthy or unknown")
        return (
            f"no schedulable GPU could hold {size} of {need.model} now "
            f"(of {len(self._monitor.gpus)} GPUs: {', '.join(parts)})"
        )

    def _user_frees_at(self, user: str, now: float) -> float | None:
        """When the user's first running execution is expected to end."""
        ends = [
            self._end_of(execution, now)
            for execution in self._executions.values()
            if (owner := self._requests.get(execution.request_id)) is not None
            and owner.user == user
        ]
        return min((end for end in ends if end is not None), default=None)

    def _end_of(self, execution: Running, now: float) -> float | None:
        request = self._requests.get(execution.request_id)
        if request is None or request.placement is None:
            return None
        gpu = self._monitor.gpus.get(request.placement.gpu_id)
        gpu_type = gpu.type if gpu is not None else ""
        started = request.started_at if request.started_at is not None else execution.dispatched_at
        return expected_end(request, started, gpu_type, now)

    def _eta(
        self,
        request: Request,
        need: Need,
        ahead: list[Request] | None,
        behind: list[Request],
        usable: list[GPUState],
        now: float,
    ) -> float | None:
        """Seconds until ``request`` is expected to start (module docstring), or ``None``."""
        if ahead is None or len(ahead) > ETA_AHEAD or not usable:
            return None
        releases: list[tuple[float, str, int]] = []
        executions = self._executions
        for gpu in usable:
            for execution_id, memory_mb in gpu.running.items():
                execution = executions.get(execution_id)
                end = None if execution is None else self._end_of(execution, now)
                if end is not None and math.isfinite(end):
                    releases.append((end, gpu.id, memory_mb))
        queue = self._queue
        level = queue.level(request, now)
        ahead_ids = {other.id for other in [*ahead, *behind]}
        # Holders not ahead of it but binding it (of its level or higher) go first on their GPUs.
        binding = [
            holder
            for holder_id in self._holds
            if holder_id not in ahead_ids
            and holder_id != request.id
            and (holder := self._requests.get(holder_id)) is not None
            and queue.level(holder, now) <= level
        ]
        counted = ahead_ids | {holder.id for holder in binding} | {request.id}
        held = {
            gpu_id: holder
            for holder, gpu_ids in self._holds.items()
            if holder in counted
            for gpu_id in gpu_ids
        }
        queued = [
            Queued(other.id, need_of(other, avoid=self._avoid.get(other.id, ())), other.created_at)
            for other in [*ahead, *binding]
        ]
        target = Queued(request.id, need, request.created_at)
        after = [
            Queued(other.id, need_of(other, avoid=self._avoid.get(other.id, ())), other.created_at)
            for other in behind
        ]
        start = project_start(
            now, queued, target, usable, releases, self._depth, held, self._bound, after
        )
        return None if start is None else start - now

"""The invariant tests' own account of the fleet, built only from what the core decided.

The stateful tests (``test_invariants_modelled.py``) check SPEC §2 against this model, never
against the core's bookkeeping: which executions are live (from the ``Dispatch`` and
``CancelExecution`` decisions, and from what the test itself finished or failed), the memory they
reserve on each GPU, the GPU-seconds charged to each user in the last hour, and which waiting
request must go before which (priority classes with aging, then arrival order per user).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from gpu_request_router.core.events import Dispatch
from gpu_request_router.models.request import Request

HOUR_S = 3600.0
# Sums of GPU-seconds taken in another order differ in the last bits; closer than this to a
# limit, the model does not say which side the core must be on.
_CLOSE = 1e-6


@dataclass(frozen=True, slots=True)
class GPU:
    """One GPU as the test set the fleet up: its worker, type, memory and slots."""

    id: str
    worker: str
    type: str
    memory_mb: int
    slots: int


@dataclass(slots=True)
class Submitted:
    """An accepted request as the test submitted it (and the estimate the core gave it)."""

    id: str
    user: str
    rank: int  # of its priority class, 0 the highest
    created_at: float
    arrival: int  # acceptance order over the whole run
    deadline: float
    memory_mb: int
    gpu_count: int
    gpu_type: str | None
    gpu_seconds: float
    dispatched: bool = False
    cancelled: bool = False


@dataclass(slots=True)
class Live:
    """A live execution: the dispatch that began it, and when the backend started it."""

    dispatch: Dispatch
    started_at: float | None = None


@dataclass(slots=True)
class Charge:
    """GPU-seconds charged to ``user`` at dispatch time ``at`` (the estimate until settled)."""

    user: str
    at: float
    gpu_seconds: float


class FleetModel:
    """Live executions, reservations, charges and queue order, from decisions alone."""

    def __init__(
        self,
        gpus: Iterable[GPU],
        *,
        classes: list[str],
        aging_s: float,
        margin_mb: int,
        max_concurrent: int | None,
        gpu_seconds_per_hour: float | None = None,
    ) -> None:
        self.gpus = {gpu.id: gpu for gpu in gpus}
        self._rank = {name: rank for rank, name in enumerate(classes)}
        self._aging_s = aging_s
        self._margin_mb = margin_mb
        self.max_concurrent = max_concurrent
        self.gpu_seconds_per_hour = gpu_seconds_per_hour
        self.requests: dict[str, Submitted] = {}
        self.live: dict[str, Live] = {}
        self.charges: dict[str, Charge] = {}
        self.cordoned: set[str] = set()
        self.lost: set[str] = set()

    # What happened ---------------------------------------------------------------------------

    def accept(
        self, request: Request, user: str, priority: str, timeout_s: float, now: float
    ) -> Submitted:
        """Record a request the test submitted at ``now`` and the core accepted."""
        estimate = request.estimate
        count = request.resources.gpu_count
        submitted = Submitted(
            id=request.id,
            user=user,
            rank=self._rank[priority],
            created_at=now,
            arrival=len(self.requests),
            deadline=now + timeout_s,
            memory_mb=estimate.gpu_memory_mb,
            gpu_count=count,
            gpu_type=request.resources.gpu_type,
            gpu_seconds=estimate.typical_duration_s * count,
        )
        self.requests[request.id] = submitted
        return submitted

    def dispatch(self, dispatch: Dispatch, now: float) -> None:
        """An execution began: it holds its reservations and is charged its estimate."""
        self.live[dispatch.execution_id] = Live(dispatch)
        self.requests[dispatch.request.id].dispatched = True
        estimate = dispatch.request.estimate.typical_duration_s * len(dispatch.placement.gpu_ids)
        self.charges[dispatch.execution_id] = Charge(dispatch.request.user, now, estimate)

    def started(self, execution_id: str, now: float) -> None:
        """The backend started a live execution (the first report counts)."""
        live = self.live.get(execution_id)
        if live is not None and live.started_at is None:
            live.started_at = now

    def end(self, execution_id: str, now: float, reported: float | None = None) -> None:
        """An execution ended: its reservations go, its charge settles.

        The settled charge is what the backend reported, else the time it ran × its GPUs
        (nothing if it never started).
        """
        live = self.live.pop(execution_id, None)
        if live is None:
            return
        used = reported
        if used is None:
            started = live.started_at if live.started_at is not None else now
            used = max(0.0, now - started) * len(live.dispatch.placement.gpu_ids)
        self.charges[execution_id].gpu_seconds = used

    # Views ------------------------------------------------------------------------------------

    def holders_on(self, gpu_id: str) -> set[str]:
        """The live executions with a reservation on a GPU."""
        return {e for e, live in self.live.items() if gpu_id in live.dispatch.reservations}

    def reserved_on(self, gpu_id: str) -> int:
        """The memory the live executions reserve on a GPU."""
        return sum(live.dispatch.reservations.get(gpu_id, 0) for live in self.live.values())

    def room(self, gpu_id: str) -> int:
        """Memory free for placement: total − safety margin − live reservations."""
        return self.gpus[gpu_id].memory_mb - self._margin_mb - self.reserved_on(gpu_id)

    def free_slots(self, gpu_id: str) -> int:
        """Slots not taken by live executions."""
        return self.gpus[gpu_id].slots - len(self.holders_on(gpu_id))

    def active(self, user: str) -> int:
        """How many live executions ``user`` has."""
        return sum(1 for live in self.live.values() if live.dispatch.request.user == user)

    def used(self, user: str, now: float) -> float:
        """GPU-seconds charged to ``user`` at times within the last hour."""
        cutoff = now - HOUR_S
        return sum(c.gpu_seconds for c in self.charges.values() if c.user == user and c.at > cutoff)

    def waiting(self, now: float) -> list[Submitted]:
        """Requests that must be in the queue: never dispatched, not cancelled, not yet due."""
        return [
            r
            for r in self.requests.values()
            if not r.dispatched and not r.cancelled and r.deadline > now
        ]

    # Queue order ------------------------------------------------------------------------------

    def level(self, request: Submitted, now: float) -> int:
        """The effective class: its rank, lifted one class per full ``aging_s`` waited."""
        waited = (now - request.created_at) / self._aging_s
        return request.rank - math.floor(waited + _CLOSE)

    def goes_before(self, first: Submitted, then: Submitted, now: float) -> bool | None:
        """Whether ``first`` must be dispatched before ``then`` when both fit.

        A lower effective class goes first, whoever the users are. Within one class, requests of
        one user go by aged priority (rank − waited / ``aging_s``), ties in arrival order; between
        users of one class, fair share decides (``False``: no order required). ``None`` where
        the aged priorities are too close to tell apart in floating point.
        """
        level_first, level_then = self.level(first, now), self.level(then, now)
        if level_first != level_then:
            return level_first < level_then
        if first.user != then.user:
            return False
        if first.rank == then.rank and first.created_at == then.created_at:
            return first.arrival < then.arrival
        aged_first = first.rank - (now - first.created_at) / self._aging_s
        aged_then = then.rank - (now - then.created_at) / self._aging_s
        if abs(aged_first - aged_then) < _CLOSE:
            return None
        return aged_first < aged_then

    def may_start(self, request: Submitted, now: float) -> bool | None:
        """Whether ``request``'s quota lets it start now (``None``: too close to the limit)."""
        if self.max_concurrent is not None and self.active(request.user) >= self.max_concurrent:
            return False
        limit = self.gpu_seconds_per_hour
        if limit is None:
            return True
        total = self.used(request.user, now) + request.gpu_seconds
        if abs(total - limit) < _CLOSE:
            return None
        return total <= limit

    def within_gpu_seconds(self, user: str, gpu_seconds: float, now: float) -> bool:
        """Whether charging ``gpu_seconds`` now keeps ``user`` within the hour's limit (I4)."""
        limit = self.gpu_seconds_per_hour
        return limit is None or self.used(user, now) + gpu_seconds <= limit + _CLOSE

    # Fitting ----------------------------------------------------------------------------------

    def _takes(self, request: Submitted, gpu_id: str) -> bool:
        gpu = self.gpus[gpu_id]
        return (
            (request.gpu_type is None or gpu.type == request.gpu_type)
            and self.free_slots(gpu_id) > 0
            and request.memory_mb <= self.room(gpu_id)
        )

    def fits_on(self, request: Submitted, gpu_ids: Iterable[str]) -> bool:
        """Whether ``request`` fits on enough of ``gpu_ids`` (GPUs of one worker) now."""
        return sum(1 for gpu_id in gpu_ids if self._takes(request, gpu_id)) >= request.gpu_count

    def fits_anywhere(self, request: Submitted) -> bool:
        """Whether ``request`` fits now on GPUs of one worker that are neither lost nor cordoned."""
        by_worker: dict[str, int] = {}
        for gpu_id, gpu in self.gpus.items():
            if gpu_id in self.lost or gpu_id in self.cordoned or not self._takes(request, gpu_id):
                continue
            by_worker[gpu.worker] = by_worker.get(gpu.worker, 0) + 1
        return any(count >= request.gpu_count for count in by_worker.values())

"""Starvation holds: GPUs kept for a request that has waited too long to fit anywhere.

A dispatch pass (:class:`~gpu_request_router.core.request_router.RequestRouter`) walks the queue
in priority order and places what fits. A request that fits nowhere does not block the ones
behind it (backfill), but once it has waited ``placement.starvation_bound_s`` it *holds* the GPUs
expected to fit it soonest (:meth:`LoadBalancer.prospect`, :meth:`Holds._frees_at`), across
passes, until it starts or leaves the queue: nothing of its priority level or below is placed
there, so the memory they free accumulates for it. A pass looks at no more than
``placement.backfill_depth`` requests that cannot start (holds of requests beyond are dropped),
and stops early when no GPU has a free slot.

:class:`Holds` keeps the holds and decides which GPUs a new one takes and whether an old one
still makes sense; the pass decides when to make and drop them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Protocol

import structlog

from gpu_request_router.core.fit import need_of
from gpu_request_router.core.load_balancer import LoadBalancer, Need
from gpu_request_router.core.priority_manager import PriorityManager
from gpu_request_router.models.gpu_state import GPUState
from gpu_request_router.models.request import Request

__all__ = ["ELSEWHERE_S", "Holds", "Running"]

_log = structlog.get_logger(__name__)

ELSEWHERE_S = 3600.0
"""When other routers' reservations on a GPU are taken to free, after this router's own work
(their durations are not known here): late enough to rank such a GPU after any this router frees."""


class Running(Protocol):
    """A live execution, as far as holds look at it: whose, and when it was dispatched."""

    request_id: str
    dispatched_at: float


class Holds(Mapping[str, tuple[str, ...]]):
    """The GPUs held for starving requests, by request id; holds never overlap.

    It reads, and never changes, the router's live ``requests`` and ``executions`` (by id: when
    held GPUs are expected to free memory), its ``queue`` (whether a holder still waits there)
    and ``avoid`` (the GPUs each request failed on).
    """

    def __init__(
        self,
        balancer: LoadBalancer,
        queue: PriorityManager,
        *,
        requests: Mapping[str, Request],
        executions: Mapping[str, Running],
        avoid: Mapping[str, Collection[str]],
    ) -> None:
        self._balancer = balancer
        self._queue = queue
        self._requests = requests
        self._executions = executions
        self._avoid = avoid
        self._held: dict[str, tuple[str, ...]] = {}

    def __getitem__(self, request_id: str) -> tuple[str, ...]:
        return self._held[request_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def of(self, request_id: str) -> tuple[str, ...]:
        """The GPUs held for a request (none: empty)."""
        return self._held.get(request_id, ())

    def drop(self, request_id: str) -> tuple[str, ...]:
        """End a request's hold (if it has one); return the GPUs it held."""
        return self._held.pop(request_id, ())

    def keep_only(self, request_ids: Collection[str]) -> None:
        """Drop the holds of requests not among ``request_ids``."""
        for request_id in [r for r in self._held if r not in request_ids]:
            del self._held[request_id]

    def prune(self, schedulable: Mapping[str, GPUState]) -> None:
        """Drop the holds that no longer make sense (see :meth:`_still_holds`)."""
        for request_id, gpu_ids in list(self._held.items()):
            if not self._still_holds(request_id, gpu_ids, schedulable):
                del self._held[request_id]

    def hold(
        self,
        request: Request,
        need: Need,
        gpus: Iterable[GPUState],
        taken: set[str],
        now: float,
    ) -> tuple[str, ...]:
        """Hold the GPUs expected to fit a starving request soonest; return them (none: none).

        Nothing of the request's priority level or below is placed on them, across passes,
        until it starts (anywhere) or leaves the queue, so the memory they free accumulates for
        it instead of going to the smaller requests that kept passing it; higher levels still
        may. ``taken`` (GPUs held already) is never offered again: holds never overlap. The
        soonest (:meth:`_frees_at`), not the closest in memory: a GPU a few GB short whose work
        runs long would keep the request and the held memory waiting.
        """
        prospect = self._balancer.prospect(
            need,
            (gpu for gpu in gpus if gpu.id not in taken),
            lambda gpu, short_mb: self._frees_at(gpu, short_mb, now),
        )
        if prospect is None:
            return ()
        self._held[request.id] = prospect
        taken.update(prospect)
        _log.debug("gpus_held", request_id=request.id, gpu_ids=list(prospect))
        return prospect

    def _frees_at(self, gpu: GPUState, short_mb: int, now: float) -> float:
        """When ``gpu`` is expected to have freed ``short_mb`` more: ``now`` if nothing is short.

        Its executions are expected to end, soonest first, at their start plus their estimated
        duration on this GPU's type; one already past that is expected to run half as long again
        as it has (an answer longer than assumed is likely a long one). What other routers
        sharing the store hold there (``elsewhere_mb``) frees too, at a time this router cannot
        know: it counts last, :data:`ELSEWHERE_S` after the rest (so a GPU this router's own
        work frees is preferred). Memory of anything else is not expected to free; if what is
        expected cannot cover the shortfall, never (infinity).
        """
        if short_mb <= 0:
            return now
        ends: list[tuple[float, int]] = []
        for execution_id, memory_mb in gpu.running.items():
            execution = self._executions.get(execution_id)
            request = None if execution is None else self._requests.get(execution.request_id)
            if execution is None or request is None:
                continue
            start = (
                request.started_at if request.started_at is not None else execution.dispatched_at
            )
            estimate = request.estimate
            duration = estimate.duration_s.get(gpu.type, estimate.typical_duration_s)
            ends.append((start + max(duration, 1.5 * max(0.0, now - start)), memory_mb))
        ends.sort()
        for end, memory_mb in ends:
            short_mb -= memory_mb
            if short_mb <= 0:
                return max(end, now)
        if gpu.elsewhere_mb >= short_mb:
            return max([now, *(end for end, _ in ends)]) + ELSEWHERE_S
        return math.inf

    def _still_holds(
        self, request_id: str, gpu_ids: tuple[str, ...], schedulable: Mapping[str, GPUState]
    ) -> bool:
        """Whether a hold still makes sense: its request is queued, its GPUs still a prospect.

        Memory used by others may have grown since the hold began; then the hold is dropped.
        """
        request = self._queue.get(request_id)
        if request is None or not all(gpu_id in schedulable for gpu_id in gpu_ids):
            return False
        need = need_of(request, avoid=self._avoid.get(request_id, ()))
        return self._balancer.prospect(need, [schedulable[g] for g in gpu_ids]) is not None

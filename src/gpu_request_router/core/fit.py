"""What a request needs from the fleet, and which GPUs could hold it, now or ever.

:func:`need_of` turns a request into the :class:`~gpu_request_router.core.load_balancer.Need`
that placement works with. :class:`FleetFit` answers the two questions asked of the fleet as a
whole rather than of one placement: whether any worker could ever hold a need (admission refuses
what none could, and a retry that grew out of every GPU fails) and which GPUs could take it right
now (the estimate dry run).
"""

from __future__ import annotations

from collections.abc import Iterable

from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.core.load_balancer import Need
from gpu_request_router.models.request import Request

__all__ = ["FleetFit", "need_of"]


def need_of(request: Request, *, avoid: Iterable[str] = ()) -> Need:
    """What ``request`` needs from the fleet, kept off the GPUs of ``avoid``.

    Its memory is exact when the client gave it (and no out-of-memory failure has proved it
    short since) or there is nothing to guess (weights only).
    """
    estimate = request.estimate
    return Need(
        model=request.model,
        memory_mb=estimate.gpu_memory_mb,
        weights_mb=estimate.weights_mb,
        gpu_count=request.gpu_count,
        gpu_type=request.resources.gpu_type,
        avoid=frozenset(avoid),
        exact=estimate.gpu_memory_mb
        <= max(request.resources.gpu_memory_mb or 0, estimate.weights_mb),
        duration_s=estimate.duration_s,
        task=request.task,
    )


class FleetFit:
    """Whether the monitor's fleet could hold a need: ever (on an idle worker), or right now."""

    def __init__(self, monitor: GPUStateMonitor, safety_margin_mb: int) -> None:
        self._monitor = monitor
        self._margin = safety_margin_mb
        self._limits: dict[tuple[object, ...], int] = {}
        self._version = -1

    def could_ever_fit(self, need: Need) -> bool:
        """Whether a worker of the fleet could hold ``need`` when idle (True if none is known).

        The answer for a kind of request (model, GPU type and count, weights) is the most
        memory per GPU it may ask for; that is kept until the fleet's make-up changes, so
        admission does not look at every GPU of a large fleet each time.
        """
        monitor = self._monitor
        if not monitor.gpus:
            return True
        if self._version != monitor.fleet_version or len(self._limits) > 1024:
            self._limits.clear()
            self._version = monitor.fleet_version
        kind = (need.model, need.gpu_type, need.gpu_count, need.weights_mb)
        limit = self._limits.get(kind)
        if limit is None:
            limit = self._limits[kind] = self._largest_fit(need)
        return need.memory_mb <= limit

    def _largest_fit(self, need: Need) -> int:
        """The most memory per GPU a request of ``need``'s kind may ask for on an idle worker.

        A GPU holds it when memory ≤ total − margin (+ the weights, where they are loaded), so a
        worker holds it up to its ``gpu_count``-th largest such capacity; -1 when none can.
        """
        capacities: dict[str, list[int]] = {}
        for gpu in self._monitor.gpus.values():
            if not need.runs_on(gpu):
                continue
            capacity = gpu.memory_total_mb - self._margin
            if gpu.has_loaded(need.model):
                capacity += need.weights_mb
            capacities.setdefault(gpu.worker, []).append(capacity)
        return max(
            (
                sorted(worker, reverse=True)[need.gpu_count - 1]
                for worker in capacities.values()
                if len(worker) >= need.gpu_count
            ),
            default=-1,
        )

    def fitting_gpus(self, need: Need) -> list[str]:
        """GPUs that could take ``need`` right now, in id order (for the estimate dry run).

        With ``gpu_count`` > 1, only GPUs of workers that have enough such GPUs count.
        """
        by_worker: dict[str, list[str]] = {}
        for gpu in self._monitor.schedulable.values():
            if gpu.free_slots > 0 and need.runs_on(gpu) and need.memory_on(gpu) <= gpu.room_mb:
                by_worker.setdefault(gpu.worker, []).append(gpu.id)
        return sorted(
            gpu_id
            for gpu_ids in by_worker.values()
            if len(gpu_ids) >= need.gpu_count
            for gpu_id in gpu_ids
        )

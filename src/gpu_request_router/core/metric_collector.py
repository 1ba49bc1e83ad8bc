"""The router's Prometheus metrics (SPEC §9) and a bounded in-memory summary for the JSON endpoint.

:class:`MetricCollector` is pure: it never reads a clock. Every method where time matters takes
``now`` (epoch seconds) from the caller. The metrics live on the registry passed in, never on the
process-wide default registry, so that several routers (and tests) can coexist in one process.

The per-event methods run on the scheduler's hot path: they do O(1) work (a label lookup, a
counter increment, a deque append). Sorting happens only in :meth:`MetricCollector.summary`.
The collector is not thread-safe on its own; call it from the scheduler's event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gpu_request_router.models.gpu_state import GPUHealth, GPUState
from gpu_request_router.models.request import Request, RequestStatus

__all__ = [
    "DECISION_BUCKETS",
    "DURATION_BUCKETS",
    "QUEUE_WAIT_BUCKETS",
    "MetricCollector",
    "percentile",
]

_MIB = 2**20

#: Buckets for the time one dispatch decision takes: 10 µs .. 100 ms.
DECISION_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)

#: Buckets for time spent queued: 10 ms .. 1 h.
QUEUE_WAIT_BUCKETS: tuple[float, ...] = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)

#: Buckets for execution time (started -> finished): 100 ms .. 1 h.
DURATION_BUCKETS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)

_PERCENTILES = (50, 90, 99)
# Shortest span a throughput rate is computed over, so that a burst at a single instant does not
# divide by zero (or by a few microseconds).
_MIN_THROUGHPUT_SPAN_S = 1.0


def percentile(ordered: list[float], p: int) -> float | None:
    """The ``p``-th percentile (nearest-rank) of an ascending list, or ``None`` when empty."""
    n = len(ordered)
    if n == 0:
        return None
    rank = max(1, -(-p * n // 100))  # ceil(p/100 · n) in integer arithmetic
    return ordered[min(rank, n) - 1]


def _add(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


@dataclass(slots=True)
class _Counts:
    """One user's counts: ended requests by status, rejections and retries by reason."""

    requests: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)


def _percentiles(samples: deque[float]) -> dict[str, float | None]:
    """p50, p90 and p99 of the samples (``None`` each when there are none)."""
    ordered = sorted(samples)
    return {f"p{p}": percentile(ordered, p) for p in _PERCENTILES}


class MetricCollector:
    """Owns the router's Prometheus metrics and a bounded summary of recent activity.

    ``window_s`` is the span :meth:`summary` computes throughput over; ``max_samples`` bounds
    each in-memory sample deque (queue waits, latencies, completion timestamps).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        window_s: float = 300.0,
        max_samples: int = 10_000,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}")
        self._window_s = window_s
        self._max_samples = max_samples

        self._requests = Counter(
            "gpurouter_requests",
            "Requests that reached a terminal status.",
            ("status", "priority", "model"),
            registry=registry,
        )
        self._rejected = Counter(
            "gpurouter_requests_rejected",
            "Requests refused at admission.",
            ("reason",),
            registry=registry,
        )
        self._queue_depth = Gauge(
            "gpurouter_queue_depth",
            "Requests waiting in the queue, per priority class.",
            ("priority",),
            registry=registry,
        )
        self._queue_wait = Histogram(
            "gpurouter_queue_wait_seconds",
            "Time a request spent queued before a dispatch.",
            ("priority",),
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self._duration = Histogram(
            "gpurouter_request_duration_seconds",
            "Execution time (started -> finished) of succeeded requests.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._decision = Histogram(
            "gpurouter_dispatch_decision_seconds",
            "Time one dispatch decision took.",
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self._retries = Counter(
            "gpurouter_retries",
            "Requests put back in the queue after a retryable failure.",
            ("reason",),
            registry=registry,
        )
        self._gpu_used = Gauge(
            "gpurouter_gpu_memory_used_bytes",
            "GPU memory in use as reported by the device.",
            ("gpu",),
            registry=registry,
        )
        self._gpu_reserved = Gauge(
            "gpurouter_gpu_memory_reserved_bytes",
            "GPU memory the router has reserved for its placements.",
            ("gpu",),
            registry=registry,
        )
        self._gpu_util = Gauge(
            "gpurouter_gpu_utilization_ratio",
            "GPU utilisation (0..1).",
            ("gpu",),
            registry=registry,
        )
        self._gpu_healthy = Gauge(
            "gpurouter_gpu_healthy",
            "Whether the GPU takes new work (1) or not (0).",
            ("gpu",),
            registry=registry,
        )
        self._estimate_error = Gauge(
            "gpurouter_estimate_error_ratio",
            "Observed / estimated (1 is exact), averaged over recent executions; kind is duration "
            "or memory.",
            ("model", "kind"),
            registry=registry,
        )
        self._gpus_held = Gauge(
            "gpurouter_gpus_held",
            "GPUs held for requests blocked longer than the starvation bound.",
            registry=registry,
        )
        self._circuit = Gauge(
            "gpurouter_circuit_open",
            "Whether the circuit breaker for a backend is open (1) or closed (0).",
            ("backend",),
            registry=registry,
        )

        self._status_counts: dict[str, int] = {}
        self._rejected_counts: dict[str, int] = {}
        self._retry_counts: dict[str, int] = {}
        self._own: dict[str, _Counts] = {}
        self._depths: dict[str, int] = {}
        self._gpus: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._queue_waits: deque[float] = deque(maxlen=max_samples)
        self._latencies: deque[float] = deque(maxlen=max_samples)
        self._completions: deque[float] = deque(maxlen=max_samples)
        self._first_completion: float | None = None

    # -- requests -----------------------------------------------------------------------------

    def request_finished(self, request: Request, now: float) -> None:
        """Count a request that reached a terminal status; sample latency if it succeeded."""
        status = request.status
        if not status.terminal:
            raise ValueError(f"request {request.id} is {status.value}, not terminal")
        self._requests.labels(status.value, request.priority, request.model).inc()
        _add(self._status_counts, status.value)
        _add(self._counts_of(request.user).requests, status.value)
        if status is not RequestStatus.SUCCEEDED:
            return
        finished = request.finished_at if request.finished_at is not None else now
        self._latencies.append(max(0.0, finished - request.created_at))
        if request.started_at is not None:
            self._duration.observe(max(0.0, finished - request.started_at))
        if self._first_completion is None:
            self._first_completion = finished
        self._completions.append(finished)
        self._prune_completions(now)

    def request_rejected(self, reason: str, user: str) -> None:
        """Count a request of ``user`` refused at admission for ``reason``."""
        self._rejected.labels(reason).inc()
        _add(self._rejected_counts, reason)
        _add(self._counts_of(user).rejected, reason)

    def request_dispatched(self, request: Request, wait_s: float) -> None:
        """Record the time a request waited in the queue before this dispatch."""
        self._queue_wait.labels(request.priority).observe(wait_s)
        self._queue_waits.append(wait_s)

    def set_queue_depth(self, depths: Mapping[str, int]) -> None:
        """Set the queue depth per priority class; classes seen before but missing go to 0."""
        for priority in self._depths.keys() - depths.keys():
            self._queue_depth.labels(priority).set(0)
            self._depths[priority] = 0
        for priority, depth in depths.items():
            if self._depths.get(priority) != depth:
                self._queue_depth.labels(priority).set(depth)
                self._depths[priority] = depth

    def retry(self, reason: str, user: str) -> None:
        """Count a request of ``user`` put back in the queue for ``reason``."""
        self._retries.labels(reason).inc()
        _add(self._retry_counts, reason)
        _add(self._counts_of(user).retries, reason)

    def decision(self, seconds: float) -> None:
        """Record the time one dispatch decision took."""
        self._decision.observe(seconds)

    # -- GPUs, estimates, backends ------------------------------------------------------------

    def gpu(self, state: GPUState) -> None:
        """Publish one GPU's memory in use, reservations, utilisation and health."""
        gpu_id = state.id
        series = self._gpus.get(gpu_id)
        if series is None:
            series = self._gpus[gpu_id] = (
                self._gpu_used.labels(gpu_id),
                self._gpu_reserved.labels(gpu_id),
                self._gpu_util.labels(gpu_id),
                self._gpu_healthy.labels(gpu_id),
            )
        used, reserved, utilization, healthy = series
        reading = state.reading
        util = reading.utilization_pct
        used.set(reading.memory_used_mb * _MIB)
        reserved.set(state.reserved_mb * _MIB)
        utilization.set(0.0 if util is None else util / 100.0)
        healthy.set(1 if state.health in (GPUHealth.HEALTHY, GPUHealth.DEGRADED) else 0)

    def forget_gpu(self, gpu_id: str) -> None:
        """Remove a GPU's series (it left the fleet); unknown ids are ignored."""
        if self._gpus.pop(gpu_id, None) is None:
            return
        for gauge in (self._gpu_used, self._gpu_reserved, self._gpu_util, self._gpu_healthy):
            gauge.remove(gpu_id)

    def estimate_error(self, model: str, kind: str, ratio: float) -> None:
        """Publish the latest relative estimate error for ``model`` and ``kind`` of estimate."""
        self._estimate_error.labels(model, kind).set(ratio)

    def set_gpus_held(self, count: int) -> None:
        """Publish how many GPUs are held for starving requests."""
        self._gpus_held.set(count)

    def circuit(self, backend: str, is_open: bool) -> None:
        """Publish whether the circuit breaker for ``backend`` is open."""
        self._circuit.labels(backend).set(1 if is_open else 0)

    # -- summary ------------------------------------------------------------------------------

    def summary(self, now: float) -> dict[str, Any]:
        """A JSON-ready summary: counts, queue depths, percentiles and recent throughput."""
        self._prune_completions(now)
        return {
            "requests": dict(self._status_counts),
            "rejected": dict(self._rejected_counts),
            "queue_depth": dict(self._depths),
            "queue_wait_s": _percentiles(self._queue_waits),
            "latency_s": _percentiles(self._latencies),
            "throughput_rps": self._throughput(now),
            "retries": dict(self._retry_counts),
        }

    def counts_of(self, user: str) -> dict[str, dict[str, int]]:
        """One user's share of the summary's counts: ended requests, rejections and retries."""
        own = self._own.get(user) or _Counts()
        return {
            "requests": dict(own.requests),
            "rejected": dict(own.rejected),
            "retries": dict(own.retries),
        }

    def _counts_of(self, user: str) -> _Counts:
        own = self._own.get(user)
        if own is None:
            own = self._own[user] = _Counts()
        return own

    def _prune_completions(self, now: float) -> None:
        """Drop completion timestamps older than the throughput window."""
        horizon = now - self._window_s
        completions = self._completions
        while completions and completions[0] < horizon:
            completions.popleft()

    def _throughput(self, now: float) -> float:
        """Succeeded requests per second over the window (or since the first, if shorter)."""
        completions = self._completions
        if not completions or self._first_completion is None:
            return 0.0
        span = min(self._window_s, now - self._first_completion)
        if len(completions) == self._max_samples:
            # The deque overflowed: it covers less than the window; rate over what it covers.
            span = min(span, now - completions[0])
        return len(completions) / max(span, _MIN_THROUGHPUT_SPAN_S)

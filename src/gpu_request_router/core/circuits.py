"""The circuit breakers as placement sees them: executions' outcomes in, blocked GPUs out.

Every execution counts against two kinds of circuit (:class:`CircuitBreaker`, in
``error_handler``): its backend's (``backend:<name>``) and each of its GPUs' (``gpu:<id>``). When
one changes, :class:`Circuits` pushes it to the GPUs it covers (a GPU is blocked while its own
circuit or its backend's is) and a backend's to the ``gpurouter_circuit_open`` gauge.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from gpu_request_router.core.error_handler import CircuitBreaker
from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.core.metric_collector import MetricCollector
from gpu_request_router.models.gpu_state import GPUState

__all__ = ["Circuits"]

_log = structlog.get_logger(__name__)


class Circuits:
    """Records executions' outcomes in the breakers and publishes what changed."""

    def __init__(
        self, breaker: CircuitBreaker, monitor: GPUStateMonitor, metrics: MetricCollector
    ) -> None:
        self._breaker = breaker
        self._monitor = monitor
        self._metrics = metrics

    def dispatched(self, backend: str, gpu_ids: Iterable[str]) -> None:
        """Work went to ``gpu_ids`` of ``backend``: a half-open circuit's probe is under way."""
        for key in self._keys(backend, gpu_ids):
            if self._breaker.probe(key):
                self._refresh(key)

    def failed(self, backend: str, gpu_ids: Iterable[str], now: float) -> None:
        """An execution there failed in a way that counts against its circuits."""
        for key in self._keys(backend, gpu_ids):
            if self._breaker.failure(key, now):
                _log.warning("circuit_opened", circuit=key)
            self._refresh(key)

    def succeeded(self, backend: str, gpu_ids: Iterable[str]) -> None:
        """An execution there succeeded: its circuits close."""
        for key in self._keys(backend, gpu_ids):
            if self._breaker.success(key):
                _log.info("circuit_closed", circuit=key)
                self._refresh(key)

    def advance(self, now: float) -> None:
        """Time passed: circuits whose open period ended are half-open, and let a probe through."""
        for key in self._breaker.advance(now):
            self._refresh(key)

    @staticmethod
    def _keys(backend: str, gpu_ids: Iterable[str]) -> list[str]:
        return [f"backend:{backend}"] + [f"gpu:{gpu}" for gpu in gpu_ids]

    def _refresh(self, key: str) -> None:
        """Push a circuit's state to the GPUs it covers (and the backend gauge)."""
        kind, _, name = key.partition(":")
        breaker = self._breaker
        monitor = self._monitor
        if kind == "backend":
            self._metrics.circuit(name, breaker.blocked(key))
            gpus: Iterable[GPUState] = [
                gpu for gpu in monitor.gpus.values() if gpu.reading.backend == name
            ]
        else:
            gpus = [monitor.gpus[name]] if name in monitor.gpus else []
        for gpu in gpus:
            blocked = breaker.blocked(f"gpu:{gpu.id}") or breaker.blocked(
                f"backend:{gpu.reading.backend}"
            )
            monitor.set_circuit(gpu.id, blocked)

"""The assembled core: every core module wired together from one :class:`Settings`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.error_handler import ErrorHandler
from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.core.load_balancer import LoadBalancer, make_policy
from gpu_request_router.core.metric_collector import MetricCollector
from gpu_request_router.core.quota import QuotaEnforcer
from gpu_request_router.core.request_receiver import RequestReceiver
from gpu_request_router.core.request_router import RequestRouter
from gpu_request_router.core.resource_estimator import ResourceEstimator
from gpu_request_router.core.service_model import ServiceModel
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES, GPUType, gpu_type
from gpu_request_router.utils.ids import IdFactory

__all__ = ["Engine", "fleet_gpu_types"]


def fleet_gpu_types(settings: Settings) -> dict[str, GPUType]:
    """The GPU types the configured backends declare (the built-in ones when none declares any)."""
    types: dict[str, GPUType] = {}
    for backend in settings.backends:
        groups = list(backend.gpus) + ([backend.gpu] if backend.gpu is not None else [])
        for group in groups:
            types[group.type] = gpu_type(group.type, group.memory_mb)
    return types or dict(BUILTIN_GPU_TYPES)


@dataclass(frozen=True, slots=True)
class Engine:
    """The receiver (admission) and the router (everything after), deciding in memory.

    The engine holds no store: what must persist comes out with the router's decisions
    (:class:`~gpu_request_router.core.state_store.StateChange`), for the driver to hand to one.

    Example::

        engine = Engine.build(load_settings(), seed=7)
        admission = engine.receiver.submit(Submission(model="llama-3-8b"), Caller("alice"), now)
    """

    settings: Settings
    router: RequestRouter
    receiver: RequestReceiver
    metrics: MetricCollector
    registry: CollectorRegistry

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        seed: int | None = None,
    ) -> Engine:
        """Wire the core for ``settings``.

        With ``seed``, every random choice (request ids, backoff jitter) is reproducible, as
        simulation needs; without it ids come from the operating system's randomness. The
        placement policy's choices are always seeded by ``placement.seed``.
        """
        registry = registry if registry is not None else CollectorRegistry()
        metrics = MetricCollector(registry)
        rng = random.Random(seed)
        monitor = GPUStateMonitor(
            stale_after_s=settings.monitor.stale_after_s,
            safety_margin_mb=settings.placement.memory_safety_margin_mb,
            max_temperature_c=settings.monitor.max_temperature_c,
        )
        router = RequestRouter(
            settings,
            monitor=monitor,
            estimator=ResourceEstimator(settings.models, fleet_gpu_types(settings)),
            balancer=LoadBalancer(
                make_policy(
                    settings.placement.policy,
                    settings.placement.seed,
                    ServiceModel.of(settings.placement.service),
                )
            ),
            errors=ErrorHandler(settings.retries, rng),
            quotas=QuotaEnforcer(settings.quotas, settings.priorities.classes),
            metrics=metrics,
        )
        ids = IdFactory(random.Random(rng.getrandbits(64)) if seed is not None else None)
        receiver = RequestReceiver(settings, router, ids)
        return cls(settings, router, receiver, metrics, registry)

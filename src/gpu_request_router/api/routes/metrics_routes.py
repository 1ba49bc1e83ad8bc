"""Metrics and health: the JSON summary, the Prometheus exposition, liveness and readiness."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gpu_request_router.api.dependencies import CurrentCaller, ServiceDep
from gpu_request_router.api.models.common import problems
from gpu_request_router.api.models.metrics_models import GpuTotals, MetricsOut, Percentiles
from gpu_request_router.api.routes.body import JsonRoute
from gpu_request_router.exceptions import StoreUnavailable

__all__ = ["router"]

router = APIRouter(tags=["metrics"], route_class=JsonRoute)


@router.get(
    "/v1/metrics",
    response_model=MetricsOut,
    summary="A JSON summary of the router",
    responses=problems(401),
)
async def metrics_summary(caller: CurrentCaller, service: ServiceDep) -> MetricsOut:
    """Requests by status, queue depth by priority, wait and latency percentiles, GPUs.

    Request, rejection and retry counts are the caller's own, or every user's for an admin
    (``scope`` says which); the queue, the percentiles, throughput and GPUs are the fleet's.
    """
    runtime = service.runtime
    metrics = runtime.metrics
    summary = metrics.summary(runtime.clock.now())
    own = None if caller.admin else caller.user
    if own is not None:
        summary.update(metrics.counts_of(own))
    counts: Counter[str] = Counter(summary["requests"])
    counts.update(request.status.value for request in runtime.unfinished(own))
    gpus = runtime.gpus()
    utilizations = [
        gpu.reading.utilization_pct for gpu in gpus if gpu.reading.utilization_pct is not None
    ]
    return MetricsOut(
        scope="fleet" if own is None else "user",
        requests=dict(counts),
        rejected=summary["rejected"],
        queue_depth=summary["queue_depth"],
        queue_wait_s=Percentiles(**summary["queue_wait_s"]),
        latency_s=Percentiles(**summary["latency_s"]),
        throughput_rps=summary["throughput_rps"],
        retries=summary["retries"],
        gpus=GpuTotals(
            count=len(gpus),
            schedulable=sum(gpu.schedulable for gpu in gpus),
            healthy=sum(gpu.health.value == "healthy" for gpu in gpus),
            memory_total_mb=sum(gpu.memory_total_mb for gpu in gpus),
            memory_used_mb=sum(gpu.reading.memory_used_mb for gpu in gpus),
            memory_reserved_mb=sum(gpu.reserved_mb for gpu in gpus),
            utilization_pct=(
                round(sum(utilizations) / len(utilizations), 2) if utilizations else None
            ),
        ),
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"description": "Text exposition format.", "content": {"text/plain": {}}},
        **problems(401),
    },
)
async def prometheus(service: ServiceDep) -> Response:
    """The metrics of SPEC §9 in the Prometheus text format (an API key if configured so)."""
    body = generate_latest(service.runtime.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", summary="Liveness", tags=["health"])
async def healthz(service: ServiceDep) -> dict[str, str]:
    """The process is up and serving (200), and whether its store is known to be failing.

    Always 200 while the process serves, so that a liveness probe never restarts a router that
    waits for its store; ``status`` is ``degraded`` and ``store`` says why while the store is
    known to fail (no I/O is made: the writer's last commit, or a Redis store's background
    check). ``/readyz`` is the check that takes a router out of a load balancer.
    """
    failure = service.runtime.store_failure()
    if failure is None:
        return {"status": "ok"}
    return {"status": "degraded", "store": failure}


@router.get(
    "/readyz",
    summary="Readiness",
    tags=["health"],
    responses={
        503: {"description": "Not ready: the store cannot be read or written, or no GPU is known."}
    },
)
async def readyz(service: ServiceDep) -> JSONResponse:
    """Ready when the state store answers and takes writes, and at least one GPU is known.

    Cheap enough to poll: the store answers one read, and for writes the outcome of its last
    write (the SQLite store writes a one-page probe at most once a second to find out).
    """
    checks: dict[str, str] = {}
    try:
        service.runtime.check_store()
        checks["store"] = "ok"
    except StoreUnavailable as exc:
        checks["store"] = exc.message
    known = service.runtime.gpu_count()
    checks["gpus"] = f"{known} known" if known else "none known yet"
    ready = checks["store"] == "ok" and known > 0
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
    )

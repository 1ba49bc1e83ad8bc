"""Worker registration: ``gpurouter worker`` hosts announce themselves and heartbeat.

Only callers presenting the shared worker token (``auth.worker_token``) may register; without a
configured token, registration is off (workers are then listed in ``backends`` instead). A
registered worker is polled like a configured one; its heartbeat carries fresh readings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gpu_request_router.api.dependencies import ServiceDep, WorkerCaller
from gpu_request_router.api.models.common import JsonBody, WireModel, problems
from gpu_request_router.api.routes.body import JsonRoute
from gpu_request_router.exceptions import InvalidRequest
from gpu_request_router.services.gpu_monitoring import reading_from_worker

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["workers"], route_class=JsonRoute)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]{{2,45}}\])"
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_WORKER_URL = rf"^https?://{_HOST}(?::{_PORT})?/?$"


class WorkerGpuIn(JsonBody):
    """One GPU of a worker's report (the GPU fields of ``GET /v1/gpus`` of the worker protocol).

    Fields the router does not read (``worker``, ``last_seen``, ...) are ignored.
    """

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=256, description="The GPU's id at its worker.")
    index: int = Field(ge=0, le=1023)
    memory_total_mb: int = Field(ge=1, le=16 * 1024 * 1024)
    memory_used_mb: int | None = Field(None, ge=0, le=16 * 1024 * 1024)
    memory_reserved_mb: int | None = Field(None, ge=0, le=16 * 1024 * 1024)
    type: str | None = Field(None, max_length=64)
    name: str | None = Field(None, max_length=128)
    uuid: str | None = Field(None, max_length=128)
    utilization_pct: float | None = Field(None, ge=0, le=100)
    temperature_c: float | None = Field(None, ge=-50, le=200)
    power_w: float | None = Field(None, ge=0, le=100_000)
    health: Literal["healthy", "degraded", "unhealthy", "unknown"] = "healthy"
    ecc_uncorrected: int | None = Field(None, ge=0)
    slots: int | None = Field(None, ge=1, le=1024)
    models: list[Annotated[str, Field(max_length=200)]] | None = Field(None, max_length=1024)
    models_loaded: list[Annotated[str, Field(max_length=200)]] | None = Field(None, max_length=1024)
    models_cached: list[Annotated[str, Field(max_length=200)]] | None = Field(None, max_length=1024)
    running: list[Annotated[str, Field(max_length=256)]] | None = Field(None, max_length=65_536)


class WorkerRegistration(WireModel):
    """A worker announcing itself: its name, where to reach it, and its GPUs now."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    url: str = Field(pattern=_WORKER_URL, max_length=300)
    gpus: list[WorkerGpuIn] = Field(default_factory=list, max_length=1024)


class WorkerRegistered(BaseModel):
    """The router's answer to a registration or heartbeat."""

    name: str
    new: bool = Field(description="Whether the router did not know this worker before.")
    gpus: int = Field(description="GPUs taken in from this report.")
    heartbeat_s: float = Field(description="How often the router expects to hear from it.")


@router.post(
    "/workers",
    response_model=WorkerRegistered,
    summary="Register a worker (and heartbeat)",
    responses=problems(401, 403, 422),
)
async def register_worker(
    body: WorkerRegistration, worker: WorkerCaller, service: ServiceDep
) -> WorkerRegistered:
    """Register or heartbeat a ``gpurouter worker``; needs the worker token.

    422 if the name belongs to a non-agent backend of the configuration.
    """
    try:
        readings = [
            reading_from_worker(
                item.model_dump(mode="json", exclude_none=True), body.name, body.name
            )
            for item in body.gpus
        ]
    except ValueError as exc:
        raise InvalidRequest("gpus", str(exc)) from exc
    new = service.runtime.register_worker(body.name, body.url)
    service.runtime.take_readings(body.name, readings)
    return WorkerRegistered(
        name=body.name,
        new=new,
        gpus=len(readings),
        heartbeat_s=service.settings.monitor.poll_interval_s,
    )

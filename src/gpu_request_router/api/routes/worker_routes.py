"""Worker registration: ``gpurouter worker`` hosts announce themselves and heartbeat.

Only callers presenting the shared worker token (``auth.worker_token``) may register; without a
configured token, registration is off (workers are then listed in ``backends`` instead). A
registered worker is polled like a configured one; its heartbeat carries fresh readings.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from gpu_request_router.api.dependencies import ServiceDep, WorkerCaller
from gpu_request_router.api.models.common import WireModel, problems
from gpu_request_router.api.routes.body import JsonRoute
from gpu_request_router.exceptions import InvalidRequest
from gpu_request_router.services.gpu_monitoring import reading_from_worker

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["workers"], route_class=JsonRoute)


class WorkerRegistration(WireModel):
    """A worker announcing itself: its name, where to reach it, and its GPUs now."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    url: str = Field(pattern=r"^https?://[^\s/]+(:[0-9]{1,5})?/?$", max_length=300)
    gpus: list[dict[str, Any]] = Field(default_factory=list, max_length=1024)


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
        readings = [reading_from_worker(item, body.name, body.name) for item in body.gpus]
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

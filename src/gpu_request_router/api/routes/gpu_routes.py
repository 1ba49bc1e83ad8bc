"""GPUs: the inventory, and cordon / uncordon / drain for administrators."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from gpu_request_router.api.dependencies import AdminCaller, CurrentCaller, Service, ServiceDep
from gpu_request_router.api.models.common import Page, problems
from gpu_request_router.api.models.gpu_models import GpuOut
from gpu_request_router.api.routes.body import JsonRoute
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.models.gpu_state import GPUState

__all__ = ["router"]

router = APIRouter(prefix="/v1/gpus", tags=["gpus"], route_class=JsonRoute)

GpuId = Annotated[str, Path(max_length=200, description="<worker>:<index>")]


def _out(service: Service, gpu: GPUState, caller: Caller) -> GpuOut:
    """A GPU as ``caller`` may see it: other users' request ids are left out."""
    running = service.runtime.requests_on(gpu.id, None if caller.admin else caller.user)
    return GpuOut.of(gpu, running)


@router.get("", response_model=Page[GpuOut], summary="List GPUs", responses=problems(401, 422))
async def list_gpus(
    caller: CurrentCaller,
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 500,
    cursor: Annotated[str | None, Query(max_length=200, description="A GPU id.")] = None,
) -> Page[GpuOut]:
    """Every GPU the router knows, in id order."""
    gpus = service.runtime.gpus()
    if cursor is not None:
        gpus = [gpu for gpu in gpus if gpu.id > cursor]
    page = gpus[:limit]
    next_cursor = page[-1].id if len(gpus) > limit else None
    return Page[GpuOut](items=[_out(service, gpu, caller) for gpu in page], next_cursor=next_cursor)


@router.get("/{gpu_id}", response_model=GpuOut, summary="Get a GPU", responses=problems(401, 404))
async def get_gpu(gpu_id: GpuId, caller: CurrentCaller, service: ServiceDep) -> GpuOut:
    """One GPU."""
    return _out(service, service.runtime.gpu(gpu_id), caller)


@router.post(
    "/{gpu_id}/cordon",
    response_model=GpuOut,
    summary="Stop placing work on a GPU",
    responses=problems(401, 403, 404),
)
async def cordon(gpu_id: GpuId, caller: AdminCaller, service: ServiceDep) -> GpuOut:
    """New work goes elsewhere; running work continues."""
    return _out(service, service.runtime.cordon(gpu_id), caller)


@router.post(
    "/{gpu_id}/uncordon",
    response_model=GpuOut,
    summary="Resume placing work on a GPU",
    responses=problems(401, 403, 404),
)
async def uncordon(gpu_id: GpuId, caller: AdminCaller, service: ServiceDep) -> GpuOut:
    """The GPU takes new work again (this also ends a drain)."""
    return _out(service, service.runtime.uncordon(gpu_id), caller)


@router.post(
    "/{gpu_id}/drain",
    response_model=GpuOut,
    summary="Cordon a GPU and let its running work finish",
    responses=problems(401, 403, 404),
)
async def drain(gpu_id: GpuId, caller: AdminCaller, service: ServiceDep) -> GpuOut:
    """``draining`` stays true until the running work has finished."""
    return _out(service, service.runtime.drain(gpu_id), caller)

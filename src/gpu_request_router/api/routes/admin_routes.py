"""Quotas: your own limits and usage; users and their quotas for administrators."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from gpu_request_router.api.dependencies import AdminCaller, CurrentCaller, Service, ServiceDep
from gpu_request_router.api.models.admin_models import (
    QuotaBody,
    QuotaLimitsOut,
    QuotaOut,
    UsageOut,
    UserOut,
)
from gpu_request_router.api.models.common import Page, problems
from gpu_request_router.api.routes.body import JsonRoute
from gpu_request_router.exceptions import NotFound

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["quotas"], route_class=JsonRoute)

UserName = Annotated[str, Path(max_length=128)]


def _quota_out(service: Service, user: str, *, admin: bool) -> QuotaOut:
    quota, usage = service.runtime.quota_usage(user, admin=admin)
    return QuotaOut(user=user, limits=QuotaLimitsOut.of(quota), usage=UsageOut.of(usage))


@router.get("/quota", response_model=QuotaOut, summary="Your quota", responses=problems(401))
async def own_quota(caller: CurrentCaller, service: ServiceDep) -> QuotaOut:
    """Your limits and what you use of them right now."""
    return _quota_out(service, caller.user, admin=caller.admin)


@router.get(
    "/users",
    response_model=Page[UserOut],
    summary="Users and their quotas",
    responses=problems(401, 403),
)
async def list_users(caller: AdminCaller, service: ServiceDep) -> Page[UserOut]:
    """Every configured user with their role, effective limits and live usage."""
    runtime = service.runtime
    items = []
    for name, role in sorted(service.auth.roles.items()):
        quota, usage = runtime.quota_usage(name, admin=role == "admin")
        items.append(
            UserOut(
                name=name,
                role="admin" if role == "admin" else "user",
                quota=QuotaLimitsOut.of(quota),
                usage=UsageOut.of(usage),
            )
        )
    return Page[UserOut](items=items)


@router.put(
    "/users/{user}/quota",
    response_model=QuotaOut,
    summary="Override a user's quota",
    responses=problems(401, 403, 404, 422),
)
async def set_quota(
    user: UserName, body: QuotaBody, caller: AdminCaller, service: ServiceDep
) -> QuotaOut:
    """Replace the user's run-time override: the fields given win over the configuration.

    The override is stored and survives restarts; ``{}`` removes it.
    """
    if user not in service.auth.roles:
        raise NotFound("user", user)
    values = {field: getattr(body, field) for field in body.model_fields_set}
    await service.runtime.set_quota(user, values)
    return _quota_out(service, user, admin=service.auth.roles[user] == "admin")

"""What route handlers depend on: the service object and the authenticated caller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gpu_request_router.api.middleware.auth import WORKER_PREFIX, Authenticator
from gpu_request_router.api.middleware.client_address import ClientAddress
from gpu_request_router.api.models.request_models import RequestOut
from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.exceptions import Forbidden, NotFound
from gpu_request_router.http.keys import bearer_key
from gpu_request_router.models.request import Request as DomainRequest
from gpu_request_router.models.request import RequestStatus
from gpu_request_router.runtime import Runtime

__all__ = [
    "AdminCaller",
    "CurrentCaller",
    "Service",
    "ServiceDep",
    "WorkerCaller",
    "caller_of",
]


@dataclass(slots=True)
class Service:
    """Everything the routes use: settings, the running core, the authenticator and who calls."""

    settings: Settings
    runtime: Runtime
    auth: Authenticator
    client_address: ClientAddress

    def visible(self, request_id: str, caller: Caller) -> DomainRequest:
        """The request if ``caller`` may see it; another user's request is not found (I5).

        Raises:
            NotFound: no such request, or it belongs to someone else.
        """
        request = self.runtime.get(request_id)
        if not caller.admin and request.user != caller.user:
            raise NotFound("request", request_id)
        return request

    def requests_out(self, requests: list[DomainRequest]) -> list[RequestOut]:
        """The wire form of requests, with queue positions for those queued."""
        queued = [r.id for r in requests if r.status is RequestStatus.QUEUED]
        positions = self.runtime.queue_positions(queued) if queued else {}
        out = []
        for request in requests:
            placement = request.placement
            gpu_type = self.runtime.gpu_type(placement.gpu_id) if placement else None
            position = positions.get(request.id)
            out.append(RequestOut.of(request, gpu_type=gpu_type, queue_position=position))
        return out

    def request_out(self, request: DomainRequest) -> RequestOut:
        """The wire form of one request."""
        return self.requests_out([request])[0]


async def _service(request: Request) -> Service:
    """The application's service (``async``: FastAPI runs a plain ``def`` in a worker thread)."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(_service)]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key: `Authorization: Bearer <key>`. `gpurouter keys create` makes one.",
)


def caller_of(request: Request, service: Service) -> Caller:
    """The caller the auth middleware found, or the one the request's Bearer key names.

    The middleware runs first on every protected path; a path it did not recognise (an app
    mounted under a prefix) is authenticated here instead, with the same rules.

    Raises:
        Unauthenticated: the key is missing or unknown (``TooManyAuthFailures`` after many).
    """
    caller: Caller | None = request.scope.get("state", {}).get("caller")
    if caller is None:
        client = service.client_address.of(request.scope)
        caller = service.auth.authenticate(bearer_key(request.scope), client)
        structlog.contextvars.bind_contextvars(user=caller.user)
    return caller


async def _caller(
    request: Request,
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The authenticated caller (:func:`caller_of`)."""
    del credentials  # read by caller_of; declared for the OpenAPI document
    return caller_of(request, service)


async def _admin(caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    return Authenticator.require_admin(caller)


_worker_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="WorkerToken",
    description="The shared worker token (`auth.worker_token`): `Authorization: Bearer <token>`.",
)


async def _worker(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_worker_bearer)],
) -> Caller:
    """The worker the auth middleware let in with the worker token."""
    del credentials  # checked by the middleware; declared for the OpenAPI document
    caller: Caller | None = request.scope.get("state", {}).get("caller")
    if caller is None or not caller.user.startswith(WORKER_PREFIX):
        raise Forbidden("this needs the worker token")
    return caller


CurrentCaller = Annotated[Caller, Depends(_caller)]
WorkerCaller = Annotated[Caller, Depends(_worker)]
AdminCaller = Annotated[Caller, Depends(_admin)]

"""Requests: submit, estimate, get (with long-poll), list, cancel, explain, and status events.

Submitting is a hot route (:mod:`~gpu_request_router.api.routes.lean`), declared once: FastAPI
documents it, and :data:`HOT_PATHS` serves it before FastAPI's routing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, status
from fastapi.responses import JSONResponse, StreamingResponse

from gpu_request_router.api.dependencies import CurrentCaller, Service, ServiceDep
from gpu_request_router.api.models.common import Page, problems
from gpu_request_router.api.models.explain_models import ExplainOut
from gpu_request_router.api.models.request_models import (
    EstimateOut,
    RequestOut,
    SubmitBody,
    TransitionOut,
)
from gpu_request_router.api.routes.body import JsonRoute
from gpu_request_router.api.routes.lean import Handler, HotRoutes, OptionalHeader
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.core.state_store import RequestQuery
from gpu_request_router.models.request import RequestStatus

__all__ = ["HOT_PATHS", "router"]

# One Server-Sent Event of GET /v1/requests/{id}/events: its data is the audit entry as JSON.
_STATUS_EVENT = {
    "type": "object",
    "properties": {
        "event": {"const": "status"},
        "id": {"type": "string", "description": "The entry's sequence number (Last-Event-ID)."},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": TransitionOut.model_json_schema(),
        },
    },
    "required": ["event", "id", "data"],
}

router = APIRouter(prefix="/v1", tags=["requests"], route_class=JsonRoute)
_HOT = HotRoutes(router)

StatusName = Literal[
    "queued", "dispatching", "running", "succeeded", "failed", "cancelled", "expired"
]
RequestId = Annotated[str, Path(max_length=64, description="The request's id (req_...).")]
_IDEMPOTENCY_KEY = OptionalHeader(
    "Idempotency-Key",
    "Retrying with the same key and body returns the first request.",
    max_length=255,
)
# How long an event stream stays quiet before it sends a keep-alive comment.
_KEEPALIVE_S = 15.0


@_HOT.post(
    "/requests",
    body=SubmitBody,
    headers=[_IDEMPOTENCY_KEY],
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RequestOut,
    summary="Submit a request",
    responses=problems(401, 403, 413, 422, 429, 503),
)
async def submit(
    service: Service, caller: Caller, body: SubmitBody, headers: Mapping[str, str | None]
) -> JSONResponse:
    """Queue a request; it is stored durably before this answers 202.

    A request that no GPU of the fleet could ever hold is 422; one that fits the fleet but not
    its free room now waits in the queue.
    """
    key = headers[_IDEMPOTENCY_KEY.name]
    stored, created = await service.runtime.admit(body.to_submission(key), caller)
    return JSONResponse(
        service.request_out(stored).model_dump(mode="json", by_alias=True),
        status_code=status.HTTP_202_ACCEPTED,
        headers=None if created else {"Idempotency-Replayed": "true"},
    )


HOT_PATHS: dict[str, Handler] = _HOT.handlers
"""The fast handler of this module's hot route, by path (served by ``lean.HotPaths``)."""


@router.post(
    "/estimate",
    response_model=EstimateOut,
    summary="Estimate a request without queueing it",
    responses=problems(401, 413, 422),
)
async def estimate(body: SubmitBody, caller: CurrentCaller, service: ServiceDep) -> EstimateOut:
    """What the request would need, and which GPUs could take it now; nothing is queued.

    The answer gives the memory per GPU with its breakdown and the duration per GPU type.
    """
    report = service.runtime.estimate(body.to_submission(None), caller)
    return EstimateOut.of(body.model, report)


@router.get(
    "/requests",
    response_model=Page[RequestOut],
    summary="List requests",
    responses=problems(401, 422),
)
async def list_requests(
    caller: CurrentCaller,
    service: ServiceDep,
    status_: Annotated[list[StatusName] | None, Query(alias="status")] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    priority: Annotated[str | None, Query(max_length=64)] = None,
    user: Annotated[
        str | None, Query(max_length=128, description="Admins only: one user's requests.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[
        str | None,
        Query(
            max_length=512,
            description="`next_cursor` of the previous page. Opaque: a cursor this server did "
            "not return, or one of a listing with other filters, is 422.",
        ),
    ] = None,
) -> Page[RequestOut]:
    """Your requests (an admin's: everyone's), newest first, one page at a time."""
    owner = user if caller.admin else caller.user
    query = RequestQuery(
        user=owner,
        statuses=frozenset(RequestStatus(s) for s in status_) if status_ else None,
        model=model,
        priority=priority,
        limit=limit,
        cursor=cursor,
    )
    page = service.runtime.list_requests(query)
    items = service.requests_out(page.items)
    return Page[RequestOut](items=items, next_cursor=page.next_cursor)


@router.get(
    "/requests/{request_id}",
    response_model=RequestOut,
    summary="Get a request (optionally waiting for it to finish)",
    responses=problems(401, 404, 422),
)
async def get_request(
    request_id: RequestId,
    caller: CurrentCaller,
    service: ServiceDep,
    wait: Annotated[
        float | None,
        Query(ge=0, le=60, description="Wait up to this many seconds for a terminal status."),
    ] = None,
) -> RequestOut:
    """The request with all its fields; ``result`` or ``error`` once it has finished."""
    request = service.visible(request_id, caller)
    if wait and not request.status.terminal:
        request = await service.runtime.wait(request_id, wait)
    return service.request_out(request)


@router.delete(
    "/requests/{request_id}",
    response_model=RequestOut,
    summary="Cancel a request",
    responses=problems(401, 404, 409),
)
async def cancel_request(
    request_id: RequestId, caller: CurrentCaller, service: ServiceDep
) -> RequestOut:
    """Cancel a queued or running request (a running one's execution is stopped).

    409 if it has already finished; the body's ``request_status`` says how.
    """
    service.visible(request_id, caller)
    request = await service.runtime.cancel(request_id, actor=caller.user)
    return service.request_out(request)


@router.get(
    "/requests/{request_id}/explain",
    response_model=ExplainOut,
    summary="Explain a request's placement, or why it still waits",
    responses=problems(401, 404),
)
async def explain_request(
    request_id: RequestId, caller: CurrentCaller, service: ServiceDep
) -> ExplainOut:
    """Where it was placed and why, or why it still waits.

    Placed: the candidates the policy weighed and their scores. Waiting: what blocks it
    (memory, slots, quota, priority, a starvation hold, no GPU), its queue position and an ETA.
    """
    request = service.visible(request_id, caller)
    return ExplainOut.of(service.runtime.explain(request))


@router.get(
    "/requests/{request_id}/events",
    response_class=StreamingResponse,
    summary="Stream the request's status changes (Server-Sent Events)",
    responses={
        200: {
            "description": "One `status` event per change, from creation to the terminal one.",
            "content": {"text/event-stream": {"schema": _STATUS_EVENT}},
        },
        **problems(401, 404),
    },
)
async def request_events(
    request_id: RequestId,
    caller: CurrentCaller,
    service: ServiceDep,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", max_length=20, description="Resume after.")
    ] = None,
) -> StreamingResponse:
    """Server-Sent Events of every status change until the terminal one; resumable."""
    service.visible(request_id, caller)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1

    async def stream() -> AsyncIterator[str]:
        last = after
        while True:
            entries = service.runtime.transitions(request_id, last)
            if not entries:
                if service.runtime.get(request_id).status.terminal:
                    return  # resumed after the last event: nothing more will come
                entries = await service.runtime.watch(request_id, last, _KEEPALIVE_S)
                if not entries:
                    yield ": keep-alive\n\n"
                    continue
            for entry in entries:
                data = json.dumps(TransitionOut.of(entry).model_dump(), separators=(",", ":"))
                yield f"id: {entry.seq}\nevent: status\ndata: {data}\n\n"
                last = entry.seq
            if entries[-1].to_status.terminal:
                return

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
    )

"""The OpenAI-compatible front door: chat, completions, embeddings and the model list.

Each call is a request like any other — authenticated, checked against the caller's quota,
estimated from the body's tokens and ``max_tokens``, queued with the priority of ``X-Priority``,
placed, and forwarded — answered when it ends, or streamed (``"stream": true``) as Server-Sent
Events ending in ``data: [DONE]``. Failures before the first byte are retried like any request's;
once bytes have gone, a failure ends the stream. Errors use OpenAI's shape on these routes.

These three POST routes are the router's hot path, so their handlers take the raw request and
read the body, the caller and ``X-Priority`` themselves instead of through FastAPI's parameter
and dependency machinery (which cost about a tenth of the router's CPU per call); the OpenAPI
document describes them as it would otherwise (:func:`_documented`), and bad input gets the
answer FastAPI would give (:func:`_json_body`: 422 as a ``RequestValidationError``, or 400).
:class:`OpenAIFastPath`, the innermost middleware, serves them before FastAPI's routing, its
exception middleware and its request-response wrapping (another tenth); the routes stay
declared for the document, and errors get the answers of the app's handlers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from gpu_request_router.api.dependencies import CurrentCaller, Service, ServiceDep, caller_of
from gpu_request_router.api.middleware.error_handler import HANDLED, answer_error
from gpu_request_router.api.models.common import problems
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.models.request import Request as DomainRequest
from gpu_request_router.models.request import RequestStatus, Task
from gpu_request_router.services.ai_orchestrator import StreamSink

__all__ = ["BODIES", "OpenAIFastPath", "router"]

router = APIRouter(prefix="/v1", tags=["openai"])

_PRIORITY_MAX_CHARS = 64
# Waiting for a synchronous answer never outlasts the request's own deadline by more than this.
_ANSWER_GRACE_S = 5.0


class _OpenAIBody(BaseModel):
    """The fields the router reads; every other field is forwarded to the backend as it is."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)


class ChatBody(_OpenAIBody):
    """An OpenAI chat completion request."""

    messages: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)


class CompletionBody(_OpenAIBody):
    """An OpenAI (legacy) completion request."""

    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingBody(BaseModel):
    """An OpenAI embeddings request."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] | list[int] | list[list[int]]


BODIES: tuple[type[BaseModel], ...] = (ChatBody, CompletionBody, EmbeddingBody)
"""The request bodies of the OpenAI routes, documented as components of the OpenAPI document."""

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The backend's OpenAI answer; with stream true, text/event-stream.",
        "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
    },
    **problems(401, 403, 413, 422, 429, 503),
}


def _documented(body: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI of a handler that reads ``body``, ``X-Priority`` and the caller itself.

    The body's schema is a component (:data:`BODIES`, added by the app's document builder).
    """
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}
            },
        },
        "parameters": [
            {
                "name": "X-Priority",
                "in": "header",
                "required": False,
                "description": "The priority class of the call.",
                "schema": {
                    "anyOf": [
                        {"type": "string", "maxLength": _PRIORITY_MAX_CHARS},
                        {"type": "null"},
                    ],
                    "description": "The priority class of the call.",
                    "title": "X-Priority",
                },
            }
        ],
        "security": [{"HTTPBearer": []}],
    }


async def _handle(request: Request, task: Task, model: type[BaseModel]) -> Response:
    """Validate the call as FastAPI would (422 on bad input), then serve it."""
    priority = request.headers.get("x-priority")
    if priority is not None and len(priority) > _PRIORITY_MAX_CHARS:
        raise RequestValidationError(
            [
                {
                    "type": "string_too_long",
                    "loc": ("header", "X-Priority"),
                    "msg": f"String should have at most {_PRIORITY_MAX_CHARS} characters",
                    "input": priority,
                }
            ]
        )
    service: Service = request.app.state.service
    caller = caller_of(request, service)
    try:
        body = model.model_validate(await _json_body(request))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None
    return await _serve(service, caller, task, body, priority)


async def _json_body(request: Request) -> object:
    """The body as FastAPI would hand it to a body model: JSON only under a JSON content type.

    No body is a 422; one under another content type (or none) stays unparsed, so the model
    refuses it (422); malformed JSON is a 422 at its position, an unreadable body (not UTF-8,
    nested too deep) a 400.
    """
    raw = await request.body()
    if not raw:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not (
        kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
    ):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise RequestValidationError([{**error, "input": {}, "ctx": {"error": exc.msg}}]) from None
    except (ValueError, RecursionError):
        raise HTTPException(400, "There was an error parsing the body") from None


async def _serve(
    service: Service, caller: Caller, task: Task, body: BaseModel, priority: str | None
) -> Response:
    payload = body.model_dump(mode="json")
    streaming = bool(payload.get("stream")) and task is not Task.EMBEDDING
    submission = Submission(model=payload["model"], task=task, input=payload, priority=priority)
    runtime = service.runtime
    sink = StreamSink() if streaming else None
    request, _ = await runtime.admit(submission, caller, sink=sink)
    if sink is None:
        done = await runtime.wait(request.id, request.timeout_s + _ANSWER_GRACE_S)
        if done.status is RequestStatus.SUCCEEDED:
            return JSONResponse(done.result)
        return _ended_badly(done)
    first = await sink.queue.get()
    if first is None:
        return _ended_badly(runtime.get(request.id))

    async def relay() -> AsyncIterator[bytes]:
        try:
            yield first
            while (chunk := await sink.queue.get()) is not None:
                yield chunk
        finally:
            if not runtime.get(request.id).status.terminal:  # the client went away
                await runtime.cancel(request.id, actor=caller.user)

    return StreamingResponse(relay(), media_type="text/event-stream")


def _ended_badly(request: DomainRequest) -> JSONResponse:
    """The OpenAI-style error for a call that did not succeed."""
    error = request.error
    message = error.message if error is not None else request.status.value
    code = error.type if error is not None else request.status.value
    if request.status is RequestStatus.EXPIRED:
        status, kind = 504, "timeout"
    elif error is not None and error.type == "client_error":
        status, kind = 400, "invalid_request_error"
    elif request.status is RequestStatus.CANCELLED:
        status, kind = 409, "cancelled"
    else:
        status, kind = 502, "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers={"X-Request-Id": request.id})


@router.post(
    "/chat/completions",
    summary="OpenAI chat completions",
    response_model=None,
    responses=_RESPONSES,
    openapi_extra=_documented(ChatBody),
)
async def chat_completions(request: Request) -> Response:
    """Run a chat completion on the fleet, answered when done or streamed."""
    return await _handle(request, Task.CHAT, ChatBody)


@router.post(
    "/completions",
    summary="OpenAI completions",
    response_model=None,
    responses=_RESPONSES,
    openapi_extra=_documented(CompletionBody),
)
async def completions(request: Request) -> Response:
    """Run a text completion on the fleet, answered when done or streamed."""
    return await _handle(request, Task.COMPLETION, CompletionBody)


@router.post(
    "/embeddings",
    summary="OpenAI embeddings",
    response_model=None,
    responses=_RESPONSES,
    openapi_extra=_documented(EmbeddingBody),
)
async def embeddings(request: Request) -> Response:
    """Compute embeddings on the fleet."""
    return await _handle(request, Task.EMBEDDING, EmbeddingBody)


_FAST: dict[str, tuple[Task, type[BaseModel]]] = {
    "/v1/chat/completions": (Task.CHAT, ChatBody),
    "/v1/completions": (Task.COMPLETION, CompletionBody),
    "/v1/embeddings": (Task.EMBEDDING, EmbeddingBody),
}


class OpenAIFastPath:
    """Serves ``POST`` on the three OpenAI routes without FastAPI's routing (module docstring).

    Installed innermost, so the request context, authentication and body limit have run; every
    other call goes on to the app. An error the app's handlers answer gets their answer here;
    anything else propagates to the outermost error middleware, as from a route.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] == "http" and scope["method"] == "POST":
            route = _FAST.get(_route_path(scope))
            if route is not None:
                request = Request(scope, receive)
                try:
                    response = await _handle(request, *route)
                except HANDLED as exc:
                    response = await answer_error(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the routes match: without the root path the app is mounted under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


class ModelOut(BaseModel):
    """A model the router can route to."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "gpu-request-router"


class ModelList(BaseModel):
    """The models of the catalog."""

    object: str = "list"
    data: list[ModelOut]


@router.get(
    "/models", response_model=ModelList, summary="OpenAI model list", responses=problems(401)
)
async def list_models(caller: CurrentCaller, service: ServiceDep) -> ModelList:
    """Every model of the router's catalog."""
    return ModelList(data=[ModelOut(id=name) for name in sorted(service.settings.models)])

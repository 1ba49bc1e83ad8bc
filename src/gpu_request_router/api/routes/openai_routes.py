"""The OpenAI-compatible front door: chat, completions, embeddings and the model list.

Each call is a request like any other — authenticated, checked against the caller's quota,
estimated from the body's tokens and ``max_tokens``, queued with the priority of ``X-Priority``,
placed, and forwarded — answered when it ends, or streamed (``"stream": true``) as Server-Sent
Events ending in ``data: [DONE]``. Failures before the first byte are retried like any request's;
once bytes have gone, a failure ends the stream. Errors use OpenAI's shape on these routes.

The three POST routes are hot routes (:mod:`~gpu_request_router.api.routes.lean`), each
declared once: FastAPI documents them, and :data:`HOT_PATHS` serves them before its routing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gpu_request_router.api.dependencies import CurrentCaller, Service, ServiceDep
from gpu_request_router.api.models.common import JsonBody, problems, whole_number
from gpu_request_router.api.models.request_models import TokenLimit
from gpu_request_router.api.routes.body import JsonRoute
from gpu_request_router.api.routes.lean import Handler, HotRoutes, OptionalHeader
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.exceptions import UnknownModel
from gpu_request_router.models.request import Request as DomainRequest
from gpu_request_router.models.request import RequestStatus, Task
from gpu_request_router.services.ai_orchestrator import StreamSink

__all__ = ["BODIES", "HOT_PATHS", "router"]

router = APIRouter(prefix="/v1", tags=["openai"], route_class=JsonRoute)
_HOT = HotRoutes(router)

_HEADERS = [OptionalHeader("X-Priority", "The priority class of the call.", max_length=64)]
# Waiting for a synchronous answer never outlasts the request's own deadline by more than this.
_ANSWER_GRACE_S = 5.0


class _OpenAIBody(JsonBody):
    """The fields the router reads; every other field is forwarded to the backend as it is."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    stream: bool = False
    max_tokens: TokenLimit = None
    # Forwarded only when given: the backend sees the body as the client wrote it.
    max_completion_tokens: TokenLimit = Field(None, exclude_if=lambda value: value is None)
    n: int | None = Field(None, ge=1, description="Choices per prompt (each counts as a sequence).")


class ContentPart(BaseModel):
    """A part of a message's content: text, or another kind (an image) the router does not read."""

    model_config = ConfigDict(extra="allow", strict=True)

    text: str | None = None


class ChatMessage(BaseModel):
    """A chat message; fields beyond ``role`` and ``content`` are forwarded as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[ContentPart] | None = None


TokenId = Annotated[int, Field(ge=0), BeforeValidator(whole_number)]
Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[list[TokenId]], Field(min_length=1)]
)
"""A prompt or an embedding input: a text, or a non-empty list of texts, token ids or id lists."""


class ChatBody(_OpenAIBody):
    """An OpenAI chat completion request."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)


class CompletionBody(_OpenAIBody):
    """An OpenAI (legacy) completion request."""

    prompt: Prompt


class EmbeddingBody(JsonBody):
    """An OpenAI embeddings request."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    input: Prompt


BODIES: tuple[type[BaseModel], ...] = (ChatBody, CompletionBody, EmbeddingBody)
"""The request bodies of the OpenAI routes (their components of the OpenAPI document)."""

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The backend's OpenAI answer; with stream true, text/event-stream.",
        "content": {
            "application/json": {},
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "data": {
                            "type": "string",
                            "description": "A chunk as JSON; the last event's data is [DONE].",
                        }
                    },
                    "required": ["data"],
                }
            },
        },
    },
    **problems(401, 403, 404, 413, 422, 429, 503),
}


async def _serve(
    service: Service, caller: Caller, task: Task, body: BaseModel, priority: str | None
) -> Response:
    payload = body.model_dump(mode="json", exclude_unset=True)
    streaming = bool(payload.get("stream")) and task is not Task.EMBEDDING
    submission = Submission(model=payload["model"], task=task, input=payload, priority=priority)
    runtime = service.runtime
    sink = StreamSink() if streaming else None
    request, _ = await runtime.admit(submission, caller, sink=sink, durable=False)
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


@_HOT.post(
    "/chat/completions",
    body=ChatBody,
    headers=_HEADERS,
    summary="OpenAI chat completions",
    responses=_RESPONSES,
)
async def chat_completions(
    service: Service, caller: Caller, body: ChatBody, headers: Mapping[str, str | None]
) -> Response:
    """Run a chat completion on the fleet, answered when done or streamed."""
    return await _serve(service, caller, Task.CHAT, body, headers["X-Priority"])


@_HOT.post(
    "/completions",
    body=CompletionBody,
    headers=_HEADERS,
    summary="OpenAI completions",
    responses=_RESPONSES,
)
async def completions(
    service: Service, caller: Caller, body: CompletionBody, headers: Mapping[str, str | None]
) -> Response:
    """Run a text completion on the fleet, answered when done or streamed."""
    return await _serve(service, caller, Task.COMPLETION, body, headers["X-Priority"])


@_HOT.post(
    "/embeddings",
    body=EmbeddingBody,
    headers=_HEADERS,
    summary="OpenAI embeddings",
    responses=_RESPONSES,
)
async def embeddings(
    service: Service, caller: Caller, body: EmbeddingBody, headers: Mapping[str, str | None]
) -> Response:
    """Compute embeddings on the fleet."""
    return await _serve(service, caller, Task.EMBEDDING, body, headers["X-Priority"])


HOT_PATHS: dict[str, Handler] = _HOT.handlers
"""The fast handlers of this module's hot routes, by path (served by ``lean.HotPaths``)."""


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


@router.get(
    "/models/{model_id}",
    response_model=ModelOut,
    summary="OpenAI model",
    responses=problems(401, 404),
)
async def get_model(
    model_id: Annotated[str, Path(max_length=200)], caller: CurrentCaller, service: ServiceDep
) -> ModelOut:
    """One model of the router's catalog; an unknown one is 404 ``model_not_found``."""
    if model_id not in service.settings.models:
        raise UnknownModel(model_id, list(service.settings.models))
    return ModelOut(id=model_id)

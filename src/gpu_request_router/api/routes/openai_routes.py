"""The OpenAI-compatible front door: chat, completions, embeddings, responses and the models.

Each call is a request like any other — authenticated, checked against the caller's quota,
estimated from the body's tokens and ``max_tokens``, queued with the priority of ``X-Priority``,
placed, and forwarded — answered when it ends, or streamed (``"stream": true``) as Server-Sent
Events ending in ``data: [DONE]``. Failures before the first byte are retried like any request's;
once bytes have gone, a failure ends the stream. Errors use OpenAI's shape on these routes, and
an unknown model is 404 ``model_not_found``. A streamed chat or text answer ends with a chunk
carrying ``finish_reason``, and with ``stream_options.include_usage`` a last chunk with the
``usage`` (and no choices) before ``[DONE]``. ``POST /v1/responses`` (OpenAI's Responses API,
text only) is run as a chat completion and answered in the Responses shapes
(:mod:`~gpu_request_router.api.routes.responses_api`).

The four POST routes are hot routes (:mod:`~gpu_request_router.api.routes.lean`), each
declared once: FastAPI documents them, and :data:`HOT_PATHS` serves them before its routing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gpu_request_router.api.dependencies import CurrentCaller, Service, ServiceDep
from gpu_request_router.api.models.common import JsonBody, problems, whole_number
from gpu_request_router.api.models.request_models import TokenLimit
from gpu_request_router.api.routes import responses_api
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


class StreamOptions(BaseModel):
    """Options of a streamed answer; other fields are forwarded as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = Field(
        False, description="A last chunk with the usage (and no choices) before [DONE]."
    )


class _OpenAIBody(JsonBody):
    """The fields the router reads; every other field is forwarded to the backend as it is."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    stream: bool = False
    max_tokens: TokenLimit = None
    # Forwarded only when given: the backend sees the body as the client wrote it.
    max_completion_tokens: TokenLimit = Field(None, exclude_if=lambda value: value is None)
    n: int | None = Field(None, ge=1, description="Choices per prompt (each counts as a sequence).")
    stream_options: StreamOptions | None = Field(None, exclude_if=lambda value: value is None)


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


class InputText(BaseModel):
    """A text part of a Responses input message."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    """A Responses input message: a role and its text (a string or text parts)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[InputText], Field(min_length=1)]


class ResponsesBody(JsonBody):
    """An OpenAI Responses request, text in and text out.

    Other fields of OpenAI's request are accepted and not used.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    input: str | Annotated[list[InputMessage], Field(min_length=1, max_length=10_000)]
    instructions: str | None = None
    max_output_tokens: TokenLimit = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    user: str | None = Field(None, max_length=200)


BODIES: tuple[type[BaseModel], ...] = (ChatBody, CompletionBody, EmbeddingBody, ResponsesBody)
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

_RESPONSES_API: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A response object; with stream true, text/event-stream of its events.",
        "content": {
            "application/json": {},
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "event": {"type": "string", "description": "The event's type."},
                        "data": {"type": "string", "description": "The event as JSON."},
                    },
                    "required": ["event", "data"],
                }
            },
        },
    },
    **problems(401, 403, 404, 413, 422, 429, 503),
}


async def _admit(
    service: Service, caller: Caller, task: Task, payload: dict[str, Any], priority: str | None
) -> tuple[DomainRequest, StreamSink | None]:
    """Admit a call as a request (quota, estimate, queue, placement); its sink if it streams."""
    streaming = bool(payload.get("stream")) and task is not Task.EMBEDDING
    submission = Submission(model=payload["model"], task=task, input=payload, priority=priority)
    sink = StreamSink() if streaming else None
    request, _ = await service.runtime.admit(submission, caller, sink=sink, durable=False)
    return request, sink


async def _answer(service: Service, request: DomainRequest) -> DomainRequest:
    """The request once it has ended (waiting no longer than its deadline and a grace)."""
    return await service.runtime.wait(request.id, request.timeout_s + _ANSWER_GRACE_S)


def _relay(
    service: Service, caller: Caller, request: DomainRequest, chunks: AsyncIterator[bytes]
) -> StreamingResponse:
    """Stream ``chunks`` as SSE; a client gone before the end cancels the request."""
    runtime = service.runtime

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            if not runtime.get(request.id).status.terminal:  # the client went away
                await runtime.cancel(request.id, actor=caller.user)

    return StreamingResponse(relay(), media_type="text/event-stream")


async def _drained(first: bytes, sink: StreamSink) -> AsyncIterator[bytes]:
    yield first
    while (chunk := await sink.queue.get()) is not None:
        yield chunk


async def _serve(
    service: Service, caller: Caller, task: Task, body: BaseModel, priority: str | None
) -> Response:
    payload = body.model_dump(mode="json", exclude_unset=True)
    request, sink = await _admit(service, caller, task, payload, priority)
    if sink is None:
        done = await _answer(service, request)
        if done.status is RequestStatus.SUCCEEDED:
            return JSONResponse(done.result)
        return _ended_badly(done)
    first = await sink.queue.get()
    if first is None:
        return _ended_badly(service.runtime.get(request.id))
    return _relay(service, caller, request, _drained(first, sink))


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


@_HOT.post(
    "/responses",
    body=ResponsesBody,
    headers=_HEADERS,
    summary="OpenAI responses",
    responses=_RESPONSES_API,
)
async def responses(
    service: Service, caller: Caller, body: ResponsesBody, headers: Mapping[str, str | None]
) -> Response:
    """Answer a Responses call (text in, text out), as a chat completion is run, or stream it.

    Streamed, the Responses events follow one another and end with ``response.completed``
    (``response.incomplete`` when the output stopped at ``max_output_tokens``).
    """
    given = body.model_dump(mode="json", exclude_unset=True)
    payload = responses_api.chat_payload(given)
    request, sink = await _admit(service, caller, Task.CHAT, payload, headers["X-Priority"])
    if sink is None:
        done = await _answer(service, request)
        if done.status is RequestStatus.SUCCEEDED:
            return JSONResponse(responses_api.response_object(done.id, given, done.result))
        return _ended_badly(done)
    first = await sink.queue.get()
    if first is None:
        return _ended_badly(service.runtime.get(request.id))
    events = responses_api.ResponseEvents(request.id, int(request.created_at), given)
    return _relay(service, caller, request, events.relay(_drained(first, sink)))


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

"""Every error as RFC 9457 problem details (``application/problem+json``), mapped in one place.

Domain errors map to a status by walking their class hierarchy (the most specific class listed
wins); the framework's own errors (unknown route 404, wrong method 405, body too large 413,
invalid body 422) and unexpected exceptions (500) get the same shape. Every problem carries
the request id; 429 and 503 carry ``Retry-After``.
"""

from __future__ import annotations

import math
import re
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from gpu_request_router.exceptions import (
    AlreadyTerminal,
    AuthError,
    Forbidden,
    GpuRouterError,
    IdempotencyConflict,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    QueueFull,
    QuotaExceeded,
    QuotaForbidden,
    RequestRejected,
    StateConflict,
    StoreUnavailable,
    TooManyAuthFailures,
    Unauthenticated,
    UnknownModel,
)
from gpu_request_router.http.request_context import SECURITY_HEADERS

__all__ = [
    "HANDLED",
    "OPENAI_PATHS",
    "PROBLEM_JSON",
    "answer_error",
    "error_response",
    "install_error_handlers",
    "is_openai_path",
    "problem_response",
]

PROBLEM_JSON = "application/problem+json"
# The OpenAI-compatible routes answer errors in OpenAI's shape, which their clients parse.
OPENAI_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models"}
)


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is an OpenAI-compatible route (its errors take OpenAI's shape)."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


_OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_log = structlog.get_logger(__name__)

# Most specific first; the first class in an error's MRO that is listed decides.
_STATUS: dict[type[GpuRouterError], int] = {
    Unauthenticated: 401,
    TooManyAuthFailures: 429,
    Forbidden: 403,
    AuthError: 403,
    QuotaExceeded: 429,
    QuotaForbidden: 403,
    QueueFull: 503,
    IdempotencyConflict: 422,
    InvalidRequest: 422,
    RequestRejected: 422,
    NotFound: 404,
    AlreadyTerminal: 409,
    InvalidTransition: 409,
    StateConflict: 409,
    StoreUnavailable: 503,
}


def _slug(name: str) -> str:
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in name).lstrip("-")


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """A problem-details response; ``kind`` names the problem type (default: the status).

    On the OpenAI-compatible routes the same error takes OpenAI's shape instead:
    ``{"error": {"message", "type", "param", "code"}}``.
    """
    title = HTTPStatus(status).phrase
    if is_openai_path(request.url.path):
        kind_name = _OPENAI_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        errors = extensions.get("errors")
        param = None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            param = ".".join(str(part) for part in errors[0].get("loc", [])[1:]) or None
        error = {"message": detail, "type": kind_name, "param": param, "code": kind or status}
        return JSONResponse({"error": error}, status_code=status, headers=headers)
    body: dict[str, Any] = {
        "type": f"/problems/{kind or _slug(title.replace(' ', ''))}",
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request.scope.get("state", {}).get("request_id"),
    }
    body.update(extensions)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _status_of(error: GpuRouterError) -> int:
    if isinstance(error, QuotaForbidden) and error.quota == "max_gpu_memory_mb":
        return 422  # SPEC §5: more memory than the user may ask for is an invalid request
    for cls in type(error).__mro__:
        status = _STATUS.get(cls)
        if status is not None:
            return status
    return 500


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


async def _domain_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, GpuRouterError)
    return error_response(request, error)


def error_response(request: Request, error: GpuRouterError) -> JSONResponse:
    """The problem-details answer for a domain error (for middleware that answers itself)."""
    status = _status_of(error)
    headers: dict[str, str] = {}
    extensions: dict[str, Any] = {}
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        headers.update(_retry_after(retry_after))
        extensions["retry_after_s"] = round(retry_after, 3)
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(error, AlreadyTerminal):
        extensions["request_status"] = error.status
    if isinstance(error, RequestRejected):
        extensions["reason"] = error.reason
    if isinstance(error, InvalidRequest):
        loc: list[str | int] = [error.location, *error.field.split(".")]
        extensions["errors"] = [{"loc": loc, "msg": str(error), "type": error.reason}]
    if status == 500:
        _log.error("unmapped_domain_error", error=repr(error))
    kind = _slug(type(error).__name__)
    if isinstance(error, UnknownModel) and is_openai_path(request.url.path):
        status, kind = 404, "model_not_found"  # as OpenAI answers an unknown model
    return problem_response(request, status, str(error), kind=kind, headers=headers, **extensions)


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = [
        {
            "loc": [str(part) if not isinstance(part, int) else part for part in item["loc"]],
            "msg": item["msg"],
            "type": item["type"],
        }
        for item in error.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    detail = f"{where}: {first['msg']}" if where else str(first["msg"])
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    return problem_response(request, 422, detail, kind="validation-error", errors=errors)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    detail = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
    headers = dict(error.headers) if error.headers else {}
    if error.status_code == 405:
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not allowed here; use {', '.join(allowed)}"
    return problem_response(request, error.status_code, detail, headers=headers or None)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route offers for this path (Starlette names only the first route's)."""
    app = request.app
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = []
        for template, operations in app.openapi().get("paths", {}).items():
            expression = re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template))
            table.append((re.compile(f"^{expression}$"), {m.upper() for m in operations}))
        app.state.allow_table = table
    methods: set[str] = set()
    for pattern, offered in table:
        if pattern.match(request.url.path):
            methods |= offered
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    _log.exception("unhandled_error", error=repr(error))
    response = problem_response(
        request, 500, "an unexpected error; the request id identifies it in the router's logs"
    )
    # This answer leaves through Starlette's outermost error middleware, around the request
    # context middleware: give it the headers that one would have added.
    request_id = request.scope.get("state", {}).get("request_id")
    if request_id:
        response.headers["X-Request-ID"] = request_id
    for name, value in SECURITY_HEADERS:
        response.headers[name.decode()] = value.decode()
    return response


_HANDLERS = {
    GpuRouterError: _domain_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
}
HANDLED: tuple[type[Exception], ...] = tuple(_HANDLERS)
"""The errors answered by a handler of their own (anything else is a 500)."""


async def answer_error(request: Request, error: Exception) -> JSONResponse:
    """The answer the app's handler gives ``error`` (one of :data:`HANDLED`).

    For code that answers outside FastAPI's exception middleware, as the app's handlers would.
    """
    for kind, handler in _HANDLERS.items():
        if isinstance(error, kind):
            return await handler(request, error)
    raise TypeError(f"no handler answers {type(error).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    """Register the problem-details handlers on ``app``."""
    for kind, handler in _HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.add_exception_handler(Exception, _unexpected)

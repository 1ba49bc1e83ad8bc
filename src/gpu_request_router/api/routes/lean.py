"""The hot routes' own plumbing: body reading and validation as FastAPI does it, and a fast path.

The routes that carry the traffic — the OpenAI door and ``POST /v1/requests`` — take the raw
request and read their body, caller and headers themselves instead of through FastAPI's parameter
and dependency machinery, which cost about a tenth of the router's CPU per call. Bad input gets the
answer FastAPI would give: :func:`json_body` reads the body with the parser every route uses
(:mod:`~gpu_request_router.api.routes.body`: 422 for malformed JSON or a value against its
rules, 400 for a body that cannot be read at all), before anything else is checked; then the
errors of the headers and of the body are reported together, headers first (:func:`header`).
Their OpenAPI description is written out where they are declared (:func:`documented`), so the
document is as it would otherwise be.

:class:`HotPaths`, the innermost middleware, then serves ``POST`` on those paths before FastAPI's
routing, its exception middleware and its request-response wrapping (another fifth of the CPU);
the routes stay declared for the document and for every other method, and an error gets the
answer of the app's own handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from gpu_request_router.api.routes.body import is_json, parse, read_body
from gpu_request_router.http.problems import HANDLED, answer_error

__all__ = ["Handler", "HotPaths", "documented", "header", "json_body", "validated_body"]

Handler = Callable[[Request], Awaitable[Response]]
"""A hot route's handler: the raw request in, the response out."""

M = TypeVar("M", bound=BaseModel)


async def json_body(request: Request) -> object:
    """The body as FastAPI would hand it to a body model: JSON only under a JSON content type.

    No body is a 422; one under another content type (or none) stays unparsed, so the model
    refuses it (422); JSON is read by :func:`~gpu_request_router.api.routes.body.parse`, as on
    every route (malformed JSON or a value against its rules: 422; not text: 400). A body that
    cannot be read at all (the client gone while it was sent) is a 400.
    """
    raw = await read_body(request)
    if not raw:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    if not is_json(request):
        return raw
    return parse(raw)


def header(
    request: Request, name: str, rule: TypeAdapter[str]
) -> tuple[str | None, list[dict[str, Any]]]:
    """An optional header's value, and the errors FastAPI would report for it under ``rule``."""
    value = request.headers.get(name)
    if value is None:
        return None, []
    try:
        rule.validate_python(value)
    except ValidationError as exc:
        return value, [{**e, "loc": ("header", name)} for e in exc.errors(include_url=False)]
    return value, []


def documented(body: str, headers: Mapping[str, tuple[TypeAdapter[str], str]]) -> dict[str, Any]:
    """The OpenAPI of a hot route, as FastAPI would write it for its parameters.

    ``body``: the name of the body's schema component; ``headers``: each optional header's rule
    and description.
    """
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        },
        "parameters": [
            {
                "name": name,
                "in": "header",
                "required": False,
                "description": description,
                "schema": {
                    "anyOf": [rule.json_schema(), {"type": "null"}],
                    "description": description,
                    "title": name,
                },
            }
            for name, (rule, description) in headers.items()
        ],
        "security": [{"HTTPBearer": []}],
    }


def _body_errors(model: type[M], payload: object) -> tuple[M | None, list[dict[str, Any]]]:
    """``payload`` as ``model``, or FastAPI's errors for it (located under "body")."""
    try:
        # As FastAPI validates a body: objects with attributes pass too (it names them).
        return model.model_validate(payload, from_attributes=True), []
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        return None, [{**e, "loc": ("body", *e["loc"])} for e in errors]


async def validated_body(
    request: Request, model: type[M], header_errors: list[dict[str, Any]] | None = None
) -> M:
    """The body as ``model``, or the ``RequestValidationError`` FastAPI would raise.

    ``header_errors`` (already located under "header") come first in it, as FastAPI reports
    them, but after a body that is not JSON at all.
    """
    payload = await json_body(request)
    body, errors = _body_errors(model, payload)
    errors = [*(header_errors or ()), *errors]
    if errors:
        raise RequestValidationError(errors)
    assert body is not None
    return body


class HotPaths:
    """Serves ``POST`` on the hot routes without FastAPI's routing (module docstring).

    Installed innermost, so the request context, authentication and body limit have run; every
    other call goes on to the app. An error the app's handlers answer gets their answer here;
    anything else propagates to the outermost error middleware, as from a route.
    """

    def __init__(self, app: ASGIApp, routes: Mapping[str, Handler]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.routes.get(_route_path(scope))
            if handler is not None:
                request = Request(scope, receive)
                try:
                    response = await handler(request)
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

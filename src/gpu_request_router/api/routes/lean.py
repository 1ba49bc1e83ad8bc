"""The hot routes' own plumbing: body reading and validation as FastAPI does it, and a fast path.

The routes that carry the traffic — the OpenAI door and ``POST /v1/requests`` — take the raw
request and read their body, caller and headers themselves instead of through FastAPI's
parameter and dependency machinery, which cost about a tenth of the router's CPU per call. Bad
input gets the answer FastAPI would give: :func:`validated_body` raises the same
``RequestValidationError`` (422 at the field, or at the position of malformed JSON) or a 400 for
a body that cannot be read at all. Their OpenAPI description is written out where they are
declared, so the document is as it would otherwise be.

:class:`HotPaths`, the innermost middleware, then serves ``POST`` on those paths before FastAPI's
routing, its exception middleware and its request-response wrapping (another fifth of the CPU);
the routes stay declared for the document and for every other method, and an error gets the
answer of the app's own handler.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from gpu_request_router.api.middleware.error_handler import HANDLED, answer_error

__all__ = ["Handler", "HotPaths", "json_body", "validated_body"]

Handler = Callable[[Request], Awaitable[Response]]
"""A hot route's handler: the raw request in, the response out."""

M = TypeVar("M", bound=BaseModel)


async def json_body(request: Request) -> object:
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


async def validated_body(request: Request, model: type[M]) -> M:
    """The body as ``model``, or the ``RequestValidationError`` FastAPI would raise (loc "body")."""
    try:
        return model.model_validate(await json_body(request))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


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

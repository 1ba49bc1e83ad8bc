"""Hot routes: each declared once, documented by FastAPI and served by a fast path.

The routes that carry the traffic — the OpenAI door and ``POST /v1/requests`` — are declared
with :meth:`HotRoutes.post`: a path, a body model, optional headers (:class:`OptionalHeader`:
their length rule and description), the response model and status, and a handler that takes
the service, the caller, the body and the headers' values. From that one declaration it
registers two things:

- a FastAPI operation with those parameters (the caller, the body, each header), so the OpenAPI
  document describes the route as FastAPI does any other, and a call that reaches FastAPI's
  routing is parsed, validated and answered by FastAPI itself;
- a fast handler, served by :class:`HotPaths` (the innermost middleware) for ``POST`` on the
  path, before FastAPI's parameter and dependency machinery (about a tenth of the router's CPU
  per call) and its routing, exception middleware and request-response wrapping (another fifth).

The fast handler reads the body, the caller and the headers itself and answers bad input as
FastAPI would (but for a body that is not sent as JSON, which gets a clearer 422 than
FastAPI's): :func:`json_body` reads the body with the parser every route uses
(:mod:`~gpu_request_router.api.routes.body`: 422 for malformed JSON or a value against the
app's JSON rules, 400 for a body that is not text or cannot be read), before anything else is
checked; then the errors of the headers and of the body are reported together, headers first
(:func:`validated_body`). An error gets the answer of the app's own handler (``answer_error``).
A test compares its answers with a stock FastAPI route's for a table of good and bad inputs
(``tests/integration/test_hot_routes.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, StringConstraints, TypeAdapter, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from gpu_request_router.api.dependencies import CurrentCaller, Service, ServiceDep, caller_of
from gpu_request_router.api.routes.body import is_json, not_json, parse, read_body
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.http.problems import HANDLED, answer_error

__all__ = [
    "Handler",
    "HotHandler",
    "HotPaths",
    "HotRoutes",
    "OptionalHeader",
    "json_body",
    "validated_body",
]

Handler = Callable[[Request], Awaitable[Response]]
"""A fast handler: the raw request in, the response out."""

M = TypeVar("M", bound=BaseModel)

HotHandler = Callable[[Service, Caller, M, Mapping[str, str | None]], Awaitable[Response]]
"""A hot route's handler: the service, the caller, the valid body and each header's value."""


class OptionalHeader:
    """An optional header of a hot route: its name, the length of a valid value, its meaning."""

    def __init__(self, name: str, description: str, *, max_length: int, min_length: int = 1):
        self.name = name
        self.description = description
        self.min_length = min_length
        self.max_length = max_length
        self._rule = TypeAdapter(
            Annotated[str, StringConstraints(min_length=min_length, max_length=max_length)]
        )

    def parameter(self) -> Any:
        """The header as a FastAPI parameter's annotation (what the OpenAPI document shows)."""
        rule = Header(
            alias=self.name,
            description=self.description,
            min_length=self.min_length,
            max_length=self.max_length,
        )
        return Annotated[str | None, rule]

    def read(self, request: Request) -> tuple[str | None, list[dict[str, Any]]]:
        """The header's value, and the errors FastAPI would report for it."""
        value = request.headers.get(self.name)
        if value is None:
            return None, []
        try:
            self._rule.validate_python(value)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            return value, [{**e, "loc": ("header", self.name)} for e in errors]
        return value, []


async def json_body(request: Request) -> object:
    """The body as FastAPI would hand it to a body model: JSON only under a JSON content type.

    No body is a 422; one under another content type (or none) is a 422 saying to send JSON
    (:func:`~gpu_request_router.api.routes.body.not_json`); JSON is read by
    :func:`~gpu_request_router.api.routes.body.parse`, as on every route (malformed JSON or a
    value against its rules: 422; not text: 400). A body that cannot be read at all (the client
    gone while it was sent) is a 400.
    """
    raw = await read_body(request)
    if not raw:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    if not is_json(request):
        raise not_json()
    return parse(raw)


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


class HotRoutes:
    """The hot routes of one router; :data:`handlers` are their fast handlers by full path."""

    def __init__(self, router: APIRouter) -> None:
        self.router = router
        self.handlers: dict[str, Handler] = {}

    def post(
        self,
        path: str,
        *,
        body: type[M],
        headers: Sequence[OptionalHeader] = (),
        status_code: int = 200,
        response_model: Any = None,
        summary: str,
        responses: dict[int | str, dict[str, Any]],
    ) -> Callable[[HotHandler[M]], HotHandler[M]]:
        """Declare ``POST path`` once: its FastAPI operation and its fast handler (module doc).

        The decorated handler's name and docstring name and describe the operation, as a
        route function's do.
        """

        def declare(handler: HotHandler[M]) -> HotHandler[M]:
            self.router.add_api_route(
                path,
                _operation(handler, body, headers),
                methods=["POST"],
                status_code=status_code,
                response_model=response_model,
                summary=summary,
                responses=responses,
            )
            self.handlers[self.router.prefix + path] = _fast(handler, body, headers)
            return handler

        return declare


def _operation(
    handler: HotHandler[M], model: type[M], headers: Sequence[OptionalHeader]
) -> Callable[..., Awaitable[Response]]:
    """The handler as a FastAPI route function: FastAPI reads its parameters from its signature."""
    names = {f"header_{index}": header.name for index, header in enumerate(headers)}

    async def operation(
        service: Service, caller: Caller, body: M, **values: str | None
    ) -> Response:
        return await handler(service, caller, body, {names[k]: v for k, v in values.items()})

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter("service", keyword, annotation=ServiceDep),
        inspect.Parameter("caller", keyword, annotation=CurrentCaller),
        inspect.Parameter("body", keyword, annotation=model),
        *(
            inspect.Parameter(name, keyword, annotation=header.parameter(), default=None)
            for name, header in zip(names, headers, strict=True)
        ),
    ]
    signature = inspect.Signature(parameters, return_annotation=Response)
    operation.__signature__ = signature  # type: ignore[attr-defined]
    operation.__name__ = operation.__qualname__ = handler.__name__
    operation.__doc__ = handler.__doc__
    return operation


def _fast(handler: HotHandler[M], model: type[M], headers: Sequence[OptionalHeader]) -> Handler:
    """The handler as :class:`HotPaths` serves it: FastAPI's checks done here, in its order."""

    async def serve(request: Request) -> Response:
        values: dict[str, str | None] = {}
        header_errors: list[dict[str, Any]] = []
        for header in headers:
            values[header.name], errors = header.read(request)
            header_errors += errors
        service: Service = request.app.state.service
        caller = caller_of(request, service)
        body = await validated_body(request, model, header_errors)
        return await handler(service, caller, body, values)

    return serve


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

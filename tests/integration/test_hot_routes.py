"""The hot routes' fast path answers every input as stock FastAPI does, or as documented.

The hot routes (``POST /v1/requests`` and the OpenAI door) are served by ``lean.HotPaths``,
which reads their body and headers itself. Here each one is also built the stock way: a plain
FastAPI route (``APIRoute``, no ``HotPaths``, no ``JsonRoute``) taking the same body model and
the same header as a ``Header`` parameter, in an app with the router's error handlers, so that
its errors have the router's shape. Both run in real uvicorn servers on loopback, and every
input of a table goes to both: the answers must have the same status, and an error the same
content type and body (but the request id, which only the router gives).

Valid input gets the same status; its body is the router's answer (a stored request, a
completion) and the stock route's stand-in, so only the status is compared.

By design the router differs from stock FastAPI in two ways. A body sent under another content
type than JSON (or none) is a 422 of type ``content_type`` that says to send JSON, where stock
FastAPI hands the unparsed bytes to the model ("Input should be a valid dictionary"). And every
JSON body is read with the
app's own rules (``utils/json_values.py``, through ``api/routes/body.py``), which refuse with
422 — located at the value — what Python's ``json`` reads but the router could not send back:
``NaN``, ``Infinity``, nesting deeper than 64 levels. Stock FastAPI accepts the first two and
moderate nesting (the stand-in answers 2xx) and refuses nesting beyond Python's recursion
limit as an unreadable body (400). For those rows the test asserts the documented answer and
that stock FastAPI really answers otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, Header

from gpu_request_router.api.app import create_app
from gpu_request_router.api.models.request_models import SubmitBody
from gpu_request_router.api.routes.lean import HotPaths
from gpu_request_router.api.routes.openai_routes import (
    ChatBody,
    CompletionBody,
    EmbeddingBody,
    ResponsesBody,
)
from gpu_request_router.http.problems import install_error_handlers

if TYPE_CHECKING:
    from conftest import LiveServer

JSON = {"Content-Type": "application/json"}
# The hot routes' headers, as stock FastAPI parameters.
Priority = Annotated[str | None, Header(alias="X-Priority", min_length=1, max_length=64)]
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)
]


def stock_app() -> FastAPI:
    """The hot routes built the stock way (module docstring); valid input gets ``{}``."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/requests", status_code=202)
    async def submit(body: SubmitBody, key: IdempotencyKey = None) -> dict[str, Any]:
        return {}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, priority: Priority = None) -> dict[str, Any]:
        return {}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, priority: Priority = None) -> dict[str, Any]:
        return {}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody, priority: Priority = None) -> dict[str, Any]:
        return {}

    @app.post("/v1/responses")
    async def responses(body: ResponsesBody, priority: Priority = None) -> dict[str, Any]:
        return {}

    return app


@dataclass(frozen=True)
class Route:
    """A hot route: its optional header, a valid value of it and its longest, and a valid body.

    ``body % value`` is a valid body with ``value`` at a place that takes any JSON value
    (``where``: that place's path in an error, after ``body`` on the problem routes).
    """

    path: str
    header: str
    good: str
    longest: int
    body: bytes
    where: list[str]


ROUTES = [
    Route(
        "/v1/requests",
        "Idempotency-Key",
        "k" * 255,
        255,
        b'{"model": "llama-3-8b", "input": {"messages": [{"role": "user", "content": "hi"}],'
        b' "max_tokens": 2, "x": %s}}',
        ["body", "input", "x"],
    ),
    Route(
        "/v1/chat/completions",
        "X-Priority",
        "low",
        64,
        b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}],'
        b' "max_tokens": 2, "x": %s}',
        ["x"],
    ),
    Route(
        "/v1/completions",
        "X-Priority",
        "low",
        64,
        b'{"model": "tinyllama-1.1b", "prompt": "hi", "max_tokens": 2, "x": %s}',
        ["x"],
    ),
    Route(
        "/v1/embeddings",
        "X-Priority",
        "low",
        64,
        b'{"model": "all-minilm-l6-v2", "input": "hi", "x": %s}',
        ["x"],
    ),
    Route(
        "/v1/responses",
        "X-Priority",
        "low",
        64,
        b'{"model": "llama-3-8b", "input": "hi", "max_output_tokens": 2, "x": %s}',
        ["x"],
    ),
]


@dataclass(frozen=True)
class Case:
    """One input: its body and headers; ``by_design``: the router's documented error type.

    ``located``: whether that error names the value's place (nesting too deep for Python's
    parser is refused as the body's, with no place).
    """

    content: bytes
    headers: dict[str, str]
    by_design: str | None = None
    located: bool = True


def _changed(route: Route, **fields: Any) -> bytes:
    body = json.loads(route.body % b'"y"')
    return json.dumps({**body, **fields}).encode()


def cases(route: Route) -> dict[str, Case]:
    """The table of inputs for ``route``, by name."""
    valid = route.body % b'"y"'
    too_long = {**JSON, route.header: "k" * (route.longest + 1)}
    return {
        "valid": Case(valid, JSON),
        "valid-with-header": Case(valid, {**JSON, route.header: route.good}),
        "valid-under-a-json-suffix-type": Case(valid, {"Content-Type": "application/x+json"}),
        "no-body": Case(b"", JSON),
        "no-body-no-content-type": Case(b"", {}),
        "malformed-json": Case(b'{"model": ', JSON),
        "json-under-text-plain": Case(
            valid, {"Content-Type": "text/plain"}, "content_type", located=False
        ),
        "json-without-content-type": Case(valid, {}, "content_type", located=False),
        "not-an-object": Case(b"[1, 2]", JSON),
        "null": Case(b"null", JSON),
        "wrong-field-types": Case(_changed(route, model=1, max_tokens="2"), JSON),
        "missing-required-fields": Case(b"{}", JSON),
        "extra-fields": Case(_changed(route, unexpected={"a": 1}), JSON),
        "empty-header": Case(valid, {**JSON, route.header: ""}),
        "header-too-long": Case(valid, {**JSON, route.header: too_long[route.header]}),
        "header-and-body-errors": Case(_changed(route, model=1), too_long),
        "header-error-and-malformed-json": Case(b"{", too_long),
        "non-utf8-bytes": Case(b'{"model": "\xff\xfe"}', JSON),
        "not-text-at-all": Case(b"\x80\x81{", JSON),
        "nan": Case(route.body % b"NaN", JSON, by_design="finite_number"),
        "infinity": Case(route.body % b"-Infinity", JSON, by_design="finite_number"),
        "over-64-deep": Case(route.body % (b"[" * 64 + b"]" * 64), JSON, by_design="json_too_deep"),
        "5000-deep": Case(
            route.body % (b"[" * 5000 + b"]" * 5000), JSON, "json_too_deep", located=False
        ),
    }


Answer = tuple[int, str | None, Any]


def answer(response: httpx.Response) -> Answer:
    """Status, and for an error its content type and JSON body without the request id."""
    if response.status_code < 400:
        return response.status_code, None, None
    body = response.json()
    body.pop("request_id", None)
    return response.status_code, response.headers["content-type"], body


def documented(route: Route, response: httpx.Response, case: Case) -> None:
    """The router's answer to a value its JSON rules refuse: 422 of its kind, at the value."""
    assert response.status_code == 422, response.text
    body = response.json()
    if "error" in body:  # OpenAI's shape: the place is the param, the rule is in the message
        assert body["error"]["type"] == "invalid_request_error"
        param = body["error"]["param"]
        assert param.startswith(".".join(route.where)) if case.located else param is None, body
        return
    where = route.where if case.located else ["body"]
    assert len(body["errors"]) == 1, body  # refused before any field is looked at, and alone
    error = body["errors"][0]
    assert (error["type"], error["loc"][: len(where)]) == (case.by_design, where), body


@pytest.mark.parametrize("route", ROUTES, ids=[route.path for route in ROUTES])
def test_the_fast_path_answers_as_stock_fastapi(
    server: LiveServer, serve_app: Callable[[FastAPI], str], route: Route
) -> None:
    """Every input of the table gets the stock route's answer, or the documented one.

    The router's own FastAPI operation for the route (the same declaration, served by FastAPI
    in an app without ``HotPaths``) answers exactly as the fast path, documented rows included:
    its ``JsonRoute`` reads the body with the same rules.
    """
    alice = server.client("alice")
    stock = httpx.Client(base_url=serve_app(stock_app()), headers=server.headers("alice"))
    declared = create_app(server.settings, seed=1)
    middleware = [m for m in declared.user_middleware if m.cls is not HotPaths]
    assert len(middleware) == len(declared.user_middleware) - 1
    declared.user_middleware = middleware
    routed = httpx.Client(base_url=serve_app(declared), headers=server.headers("alice"))
    differences = {}
    with stock, routed:
        for name, case in cases(route).items():
            mine = alice.post(route.path, content=case.content, headers=case.headers)
            theirs = stock.post(route.path, content=case.content, headers=case.headers)
            through_fastapi = routed.post(route.path, content=case.content, headers=case.headers)
            assert answer(through_fastapi) == answer(mine), name
            if case.by_design is not None:
                documented(route, mine, case)
                assert answer(mine) != answer(theirs), (name, "stock FastAPI answers the same")
            elif answer(mine) != answer(theirs):
                differences[name] = (answer(mine), answer(theirs))
    assert differences == {}


@pytest.mark.parametrize("route", ROUTES, ids=[route.path for route in ROUTES])
def test_header_errors_come_before_body_errors(server: LiveServer, route: Route) -> None:
    """The header's error is reported first, then the body's (as stock FastAPI orders them)."""
    case = cases(route)["header-and-body-errors"]
    response = server.client("alice").post(route.path, content=case.content, headers=case.headers)
    assert response.status_code == 422
    body = response.json()
    if "error" in body:
        assert body["error"]["param"] == route.header
        assert body["error"]["message"].endswith("(and 1 more)")
    else:
        assert [error["loc"][0] for error in body["errors"]] == ["header", "body"]

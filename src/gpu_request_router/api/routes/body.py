"""JSON request bodies, read the one way every route reads them.

:func:`parse` is Python's ``json`` with the rules of
:mod:`~gpu_request_router.utils.json_values` on top: a body is refused with 422 — before any
field is looked at, and alone, as malformed JSON is — when it holds a lone surrogate, ``NaN``,
``Infinity`` or a number beyond a double, an integer of more than 4,300 digits, or objects and
arrays nested more than 64 levels deep. Each error names the place by its path
(``["body", "input", "x"]``); malformed JSON keeps FastAPI's ``json_invalid`` at its character
position. A body that is not text at all stays a 400. A body sent under another content type
than JSON (or none) is a 422 of type ``content_type`` that says to send it as JSON.

The hot routes call it from ``lean.json_body``; every other route takes its body through
:class:`JsonRoute`, which hands FastAPI the body this parser read, so the answers are the same
on every route.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpu_request_router.utils.json_values import TOO_DEEP, JsonProblem, LongInteger, first_problem

__all__ = ["NOT_JSON", "JsonRoute", "is_json", "not_json", "parse", "read_body"]

_UNREADABLE = "There was an error parsing the body"


async def read_body(request: Request) -> bytes:
    """The raw body; 413 from the body limit as it is, 400 if it cannot be read at all."""
    try:
        return await request.body()
    except StarletteHTTPException:  # the body limit's 413
        raise
    except Exception:  # the client went away while sending it
        raise HTTPException(400, _UNREADABLE) from None


NOT_JSON = "send the body as JSON (Content-Type: application/json)"


def not_json() -> RequestValidationError:
    """The 422 for a body sent under another content type than JSON (or none)."""
    error = {"type": "content_type", "loc": ("body",), "msg": NOT_JSON, "input": None}
    return RequestValidationError([error])


def is_json(request: Request) -> bool:
    """Whether FastAPI would parse the body as JSON: ``application/json`` or ``.../...+json``."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _integer(digits: str) -> int | LongInteger:
    try:
        return int(digits)
    except ValueError:
        return LongInteger(digits)


def parse(raw: bytes) -> object:
    """The JSON value of a body, or the ``RequestValidationError`` (422) that refuses it.

    Raises:
        RequestValidationError: malformed JSON, or a value against the rules (module docstring).
        HTTPException: 400, the bytes are not text.
    """
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise RequestValidationError([{**error, "input": {}, "ctx": {"error": exc.msg}}]) from None
    except UnicodeDecodeError:
        raise HTTPException(400, _UNREADABLE) from None
    except RecursionError:  # deeper than Python's parser goes: far over the limit
        raise _refused(TOO_DEEP) from None
    except ValueError:  # an integer of more digits than Python converts: find where
        payload = json.loads(raw, parse_int=_integer)
    problem = first_problem(payload)
    if problem is not None:
        raise _refused(problem)
    return payload


def _refused(problem: JsonProblem) -> RequestValidationError:
    error = {"type": problem.kind, "loc": ("body", *problem.path), "msg": problem.message}
    return RequestValidationError([error])


class _ParsedRequest(Request):
    """A request whose JSON body :func:`parse` has read: ``json()`` answers it."""

    payload: object = None

    async def json(self) -> Any:
        """The body as :func:`parse` read it."""
        return self.payload


class JsonRoute(APIRoute):
    """A FastAPI route that reads its JSON body with :func:`parse` (module docstring).

    Every router of the API uses it; for a route without a body it changes nothing.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, given a request whose body is already read and checked."""
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            parsed = _ParsedRequest(request.scope, request.receive)
            raw = await read_body(parsed)
            if raw:
                if not is_json(parsed):
                    raise not_json()
                parsed.payload = parse(raw)
            return await handler(parsed)

        return checked

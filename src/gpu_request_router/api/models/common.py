"""Shared wire types: request body bases, problem details, pages."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "FieldError",
    "JsonBody",
    "OpenAIError",
    "Page",
    "Problem",
    "WireModel",
    "whole_number",
]

T = TypeVar("T")


class JsonBody(BaseModel):
    """Base of request bodies: a number with no fractional part is also an integer.

    JSON has one number type and a JSON Schema ``integer`` is any number with no fractional part,
    so ``5.0`` is the integer 5 where the document says ``integer``; strict validation alone would
    refuse it. Fractions, strings and booleans stay refused where an integer is due.
    """

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any) -> Any:
        return whole_number(value)


def whole_number(value: Any) -> Any:
    """A float with no fractional part as the integer it is (``5.0`` is 5); anything else as is."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


class WireModel(JsonBody):
    """Base of request bodies: strict types, no unknown fields, no NaN or infinity."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class FieldError(BaseModel):
    """One invalid field of a request."""

    loc: list[str | int] = Field(description="Where the error is, e.g. ['body', 'shape'].")
    msg: str
    type: str


class Problem(BaseModel):
    """An error, as RFC 9457 problem details (``application/problem+json``)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="A URI reference naming the kind of problem.")
    title: str = Field(description="A short summary of the kind of problem.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong this time.")
    request_id: str | None = Field(None, description="The id of the HTTP request (X-Request-ID).")
    errors: list[FieldError] | None = Field(None, description="Invalid fields, for 422.")


class OpenAIErrorDetail(BaseModel):
    """What went wrong, as OpenAI's API says it."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class OpenAIError(BaseModel):
    """An error on the OpenAI-compatible routes, in OpenAI's shape."""

    error: OpenAIErrorDetail


class Page(BaseModel, Generic[T]):
    """A page of a listing; pass ``next_cursor`` as ``cursor`` for the next one."""

    items: list[T]
    next_cursor: str | None = None


def problem_example(status: int, title: str, detail: str) -> dict[str, Any]:
    """An example problem document for the OpenAPI description."""
    return {
        "type": f"/problems/{title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": "5f0c2a9c3b6e4d1e9a7f2b8c4d6e1a3f",
    }


_DESCRIPTIONS = {
    400: "Malformed request.",
    401: "Missing or invalid API key.",
    403: "Not allowed for this key (role, or a quota that waiting never lifts).",
    404: "No such resource (or it belongs to someone else).",
    409: "The request is already in a terminal status.",
    413: "Body larger than server.max_body_bytes.",
    422: "Invalid request: a field, an unknown model, or nothing in the fleet could hold it.",
    429: "Over a quota or rate limit for now (or too many bad API keys); see Retry-After.",
    503: "The state store is not available, or the router's queue is full; see Retry-After.",
}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, all as problem details.

    401 implies 429 too: too many bad keys from one client are refused for a minute.
    """
    if 401 in statuses and 429 not in statuses:
        statuses = (*statuses, 429)
    return {
        status: {
            "description": _DESCRIPTIONS[status],
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        for status in statuses
    }

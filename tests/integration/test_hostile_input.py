"""Hostile input, as an attacker would send it, gets one clear answer on every route.

JSON values the router could never send back (a lone surrogate, ``NaN``, ``Infinity``, numbers
beyond a double, absurd nesting, integers of thousands of digits) are 422 on every route that
takes a JSON body, located by their path, and change nothing; ``max_tokens`` and
``max_completion_tokens`` follow one rule everywhere; request headers are capped (431) before
authentication and routing. All through a real uvicorn server (httptools, as ``gpurouter
serve`` runs it) on loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import LiveServer

Serve = Callable[..., "LiveServer"]

WORKER_TOKEN = "worker-token-0123456789abcdef"
PROBLEM_JSON = "application/problem+json"

# The JSON text of a value, and the rule it breaks (the error's type).
HOSTILE: dict[str, tuple[bytes, str]] = {
    "lone-surrogate": (b'"\\ud800"', "string_unicode"),
    "lone-low-surrogate-in-text": (b'"abc\\udfffdef"', "string_unicode"),
    "raw-surrogate-bytes": (b'"\xed\xa0\x80"', "string_unicode"),
    "surrogate-in-a-key": (b'{"\\ud800": 1}', "string_unicode"),
    "nan": (b"NaN", "finite_number"),
    "infinity": (b"Infinity", "finite_number"),
    "minus-infinity": (b"-Infinity", "finite_number"),
    "beyond-a-double": (b"1e400", "finite_number"),
    "below-minus-a-double": (b"-1e400", "finite_number"),
    "900-deep": (b"[" * 900 + b"]" * 900, "json_too_deep"),
    "5000-deep": (b"[" * 5000 + b"]" * 5000, "json_too_deep"),
    "5000-digit-integer": (b"1" * 5000, "int_parsing_size"),
}


def routes(value: bytes) -> list[tuple[str, str, str, bytes]]:
    """(user, method, path, body) of every route that takes JSON, with ``value`` inside."""
    chat = b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}], "x": %s}'
    submit = (
        b'{"model": "llama-3-8b", "input": {"messages": [{"role": "user", "content": "x"}],'
        b' "max_tokens": 4, "x": %s}}'
    )
    return [
        ("alice", "POST", "/v1/requests", submit % value),
        ("alice", "POST", "/v1/estimate", submit % value),
        ("alice", "POST", "/v1/chat/completions", chat % value),
        ("alice", "POST", "/v1/completions", b'{"model": "tinyllama-1.1b", "prompt": %s}' % value),
        ("alice", "POST", "/v1/embeddings", b'{"model": "all-minilm-l6-v2", "x": %s}' % value),
        ("root", "PUT", "/v1/users/alice/quota", b'{"max_concurrent": 2, "x": %s}' % value),
        ("worker", "POST", "/v1/workers", b'{"name": "w9", "url": "http://h:1", "x": %s}' % value),
    ]


def client_of(server: LiveServer, user: str) -> httpx.Client:
    """A client presenting ``user``'s key (or the worker token for "worker")."""
    if user == "worker":
        return server.client(headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
    return server.client(user)


def first_error(response: httpx.Response) -> tuple[str | None, str, str]:
    """(type, where, message) of the first error of a 422, as problem details or OpenAI's shape.

    OpenAI's shape has no error type (``None``); its message is the problem's detail.
    """
    body: dict[str, Any] = response.json()
    if response.url.path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        error = body["error"]
        assert error["type"] == "invalid_request_error"
        return None, error["param"] or "", error["message"].split(": ", 1)[-1]
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    first = body["errors"][0]
    return first["type"], ".".join(str(part) for part in first["loc"]), first["msg"]


def nothing_changed(server: LiveServer) -> None:
    """No request was stored and no quota override set."""
    root = server.client("root")
    assert root.get("/v1/requests").json()["items"] == []
    alice = next(u for u in root.get("/v1/users").json()["items"] if u["name"] == "alice")
    assert alice["quota"]["max_concurrent"] is None


@pytest.mark.parametrize(("value", "kind"), HOSTILE.values(), ids=list(HOSTILE))
def test_a_hostile_json_value_is_a_422_at_its_place_on_every_route(
    serve: Serve, value: bytes, kind: str
) -> None:
    """Every route that takes JSON refuses the value with 422, naming the rule and the place.

    The answer is the same on the hot routes (which read their body themselves) and on the
    routes FastAPI reads, and nothing is stored.
    """
    server = serve(auth={"worker_token": WORKER_TOKEN})
    answers = {}
    for user, method, path, body in routes(value):
        response = client_of(server, user).request(
            method, path, content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (path, response.text)
        error_kind, where, message = first_error(response)
        assert error_kind in (kind, None), (path, response.text)
        answers[path] = (where, message)
    assert len({message for _, message in answers.values()}) == 1, answers
    submitted, estimated = answers["/v1/requests"], answers["/v1/estimate"]
    assert submitted == estimated
    if kind != "json_too_deep":
        assert submitted[0].startswith("body.input.x")
        assert answers["/v1/chat/completions"][0].startswith("x")
        assert answers["/v1/completions"][0].startswith("prompt")
        assert answers["/v1/users/alice/quota"][0].startswith("body.x")
    nothing_changed(server)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/requests", {"input": {"max_tokens": 0}}),
        ("/v1/requests", {"input": {"max_completion_tokens": 0}}),
        ("/v1/requests", {"input": {"max_tokens": 10_000_001}}),
        ("/v1/requests", {"task": "generic", "input": {"max_tokens": 0}}),
        ("/v1/estimate", {"input": {"max_tokens": 0}}),
        ("/v1/estimate", {"input": {"max_completion_tokens": 0}}),
        ("/v1/chat/completions", {"max_tokens": 0}),
        ("/v1/chat/completions", {"max_completion_tokens": 0}),
        ("/v1/chat/completions", {"max_completion_tokens": 10_000_001}),
        ("/v1/completions", {"max_tokens": 0}),
        ("/v1/completions", {"max_completion_tokens": 0}),
    ],
)
def test_max_tokens_below_one_is_refused_on_every_route(
    server: LiveServer, path: str, body: dict[str, Any]
) -> None:
    """max_tokens and max_completion_tokens are integers from 1 to 10,000,000 on every route."""
    messages = [{"role": "user", "content": "x"}]
    if path in ("/v1/requests", "/v1/estimate"):
        payload = {"model": "llama-3-8b", **body}
        payload["input"] = {"messages": messages, **body["input"]}
        if body.get("task") == "generic":
            payload["input"] = dict(body["input"])
    elif path == "/v1/completions":
        payload = {"model": "tinyllama-1.1b", "prompt": "x", **body}
    else:
        payload = {"model": "llama-3-8b", "messages": messages, **body}
    response = server.client("alice").post(path, json=payload)
    assert response.status_code == 422, response.text
    _, where, message = first_error(response)
    (field,) = [key for key in ("max_tokens", "max_completion_tokens") if key in str(body)]
    assert where.endswith(field), response.text
    assert "greater than or equal to 1" in message or "less than or equal to 10000000" in message
    assert server.client("root").get("/v1/requests").json()["items"] == []


def test_max_tokens_of_one_is_served(server: LiveServer) -> None:
    """The smallest value OpenAI takes, 1, is served on both doors."""
    alice = server.client("alice")
    messages = [{"role": "user", "content": "x"}]
    body = {"model": "llama-3-8b", "input": {"messages": messages, "max_tokens": 1}}
    assert alice.post("/v1/requests", json=body).status_code == 202
    chat = {"model": "llama-3-8b", "messages": messages, "max_completion_tokens": 1}
    answer = alice.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 1


# Request headers ------------------------------------------------------------------------------


HEADER_ROUTES = [
    ("alice", "GET", "/healthz"),
    ("alice", "GET", "/v1/requests"),
    ("alice", "POST", "/v1/requests"),
    ("alice", "POST", "/v1/chat/completions"),
    ("root", "GET", "/v1/users"),
    ("alice", "GET", "/no/such/route"),
    (None, "GET", "/v1/requests"),
    (None, "POST", "/v1/chat/completions"),
]


def _send(server: LiveServer, user: str | None, method: str, path: str, **headers: str) -> Any:
    body = b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}]}'
    content = body if method == "POST" else None
    extra = {"Content-Type": "application/json"} if content else {}
    return server.client(user).request(method, path, content=content, headers={**extra, **headers})


@pytest.mark.parametrize(("user", "method", "path"), HEADER_ROUTES)
def test_headers_over_64_kib_are_a_431_before_auth_and_routing(
    serve: Serve, user: str | None, method: str, path: str
) -> None:
    """70 KiB of headers are refused with 431 on every route, known or not, keyed or not."""
    server = serve()
    response = _send(server, user, method, path, **{"X-Padding": "a" * 70 * 1024})
    assert response.status_code == 431, response.text
    assert response.headers["x-request-id"]
    if path == "/v1/chat/completions":
        assert response.json()["error"]["code"] == 431
    else:
        assert response.headers["content-type"].startswith(PROBLEM_JSON)
        problem = response.json()
        assert problem["status"] == 431 and problem["title"] == "Request Header Fields Too Large"
        assert "server.max_header_bytes" in problem["detail"]
    assert server.client("root").get("/v1/requests").json()["items"] == []


def test_the_header_cap_counts_all_headers_together_and_is_configurable(serve: Serve) -> None:
    """server.max_header_bytes caps the headers' total: many small ones add up to a 431."""
    server = serve(server={"max_header_bytes": 4096})
    many = {f"X-Label-{i}": "v" * 100 for i in range(40)}
    assert _send(server, "alice", "GET", "/v1/requests", **many).status_code == 431
    few = {f"X-Label-{i}": "v" * 100 for i in range(10)}
    assert _send(server, "alice", "GET", "/v1/requests", **few).status_code == 200
    default = serve()
    near_the_limit = {"X-Padding": "a" * 60 * 1024}
    assert _send(default, "alice", "POST", "/v1/chat/completions", **near_the_limit).is_success
    assert _send(
        default, None, "GET", "/healthz", **{"X-Padding": "a" * 1_000_000}
    ).status_code == (431)

"""Bad-key throttling over real HTTP: per address and per key prefix, never against valid keys.

Addresses other than 127.0.0.1 are played through ``X-Forwarded-For`` from a server that trusts
127.0.0.1 as its proxy (``server.trusted_proxies``), as a router behind a reverse proxy sees them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from conftest import LiveServer

Serve = Callable[..., "LiveServer"]
BEHIND_PROXY = {"trusted_proxies": ["127.0.0.1"]}
WORKER_TOKEN = "worker-token-0123456789abcdef"
BAD = {"Authorization": "Bearer not-a-key"}
# Every kind of Authorization a caller without a valid key may send.
BAD_CLASSES: dict[str, list[tuple[bytes, bytes]]] = {
    "none": [],
    "empty": [(b"authorization", b"")],
    "scheme-only": [(b"authorization", b"Bearer")],
    "extra-whitespace": [(b"authorization", b"Bearer \t  not-a-key")],
    "basic": [(b"authorization", b"Basic YWxpY2U6c2VjcmV0")],
    "other-scheme": [(b"authorization", b"Token alice-key-0123456789abcdef")],
    "no-scheme": [(b"authorization", b"alice-key-0123456789abcdef")],
    "tab-separated": [(b"authorization", b"Bearer\talice-key-0123456789abcdef")],
    "unknown": [(b"authorization", b"Bearer not-a-key")],
    "lowercase-scheme": [(b"authorization", b"bearer not-a-key")],
    "near-miss": [(b"authorization", b"Bearer alice-key-0123456789abcdeF")],
    "uppercased": [(b"authorization", b"Bearer ALICE-KEY-0123456789ABCDEF")],
    "long": [(b"authorization", b"Bearer " + b"k" * 8000)],
    "non-ascii": [(b"authorization", b"Bearer cl\xe9-\xff\xfe")],
    "sql": [(b"authorization", b"Bearer ' OR '1'='1")],
    "percent-nul": [(b"authorization", b"Bearer %00")],
    "duplicate": [
        (b"authorization", b"Bearer not-a-key"),
        (b"authorization", b"Bearer alice-key-0123456789abcdef"),
    ],
}
# Paths in each error shape: problem details, OpenAI's error object, the worker-token route.
PATHS = [("GET", "/v1/quota"), ("POST", "/v1/chat/completions"), ("POST", "/v1/workers")]
VARYING_HEADERS = {"date", "x-request-id"}
# What says how long a 429 waits (it shrinks from one call to the next), and the body's length.
WAIT = ("retry_after_s", "retry-after", "content-length")


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check ``response`` is a problem-details answer of ``status``; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


def fingerprint(response: httpx.Response, *varying: str) -> tuple[Any, ...]:
    """Everything a caller sees of an answer, but what differs between any two calls."""
    body = response.json()
    for name in ("request_id", *varying):
        body.pop(name, None)
    headers = sorted(
        (name, value)
        for name, value in response.headers.multi_items()
        if name not in VARYING_HEADERS and name not in varying
    )
    return response.status_code, body, headers


def call(client: httpx.Client, method: str, path: str, headers: Any = None) -> httpx.Response:
    """One call with ``headers``; a body where the route takes one."""
    body = {"model": "llama-3-8b", "messages": []} if method == "POST" else None
    return client.request(method, path, headers=headers, json=body)


def from_address(address: str, key: str | None = "") -> dict[str, str]:
    """Headers of a call from ``address`` presenting ``key`` (default: a new random bad key)."""
    headers = {"X-Forwarded-For": address}
    if key is not None:
        headers["Authorization"] = f"Bearer {key or uuid.uuid4().hex}"
    return headers


def test_a_valid_key_still_works_after_ten_bad_keys_from_its_address(server: LiveServer) -> None:
    """Ten bad keys from one address throttle bad keys only: every valid key there still works."""
    anon = server.client()
    for _ in range(10):
        problem(anon.get("/v1/quota", headers=BAD), 401)
    problem(anon.get("/v1/quota", headers=BAD), 429)
    assert server.client("alice").get("/v1/quota").json()["user"] == "alice"
    assert server.client("root").get("/v1/users").status_code == 200  # the admin too
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    submitted = server.client("bob").post(
        "/v1/requests", json={"model": "llama-3-8b", "input": chat}
    )
    assert submitted.status_code == 202, submitted.text


def test_throttled_bad_keys_get_429_with_retry_after(server: LiveServer) -> None:
    """After ten bad keys, bad and missing keys from that address get 429 and Retry-After."""
    anon = server.client()
    for _ in range(10):
        problem(anon.get("/v1/quota", headers=BAD), 401)
    for headers in (BAD, {"Authorization": "Bearer another-bad-key"}, {}):
        response = anon.get("/v1/quota", headers=headers)
        body = problem(response, 429)
        assert body["type"] == "/problems/too-many-auth-failures"
        assert 55 <= int(response.headers["retry-after"]) <= 60
        assert 54 < body["retry_after_s"] <= 60
    # Routes without authentication still answer.
    assert anon.get("/healthz").status_code == 200
    assert anon.get("/readyz").status_code == 200


def test_the_bad_key_limit_is_configurable(serve: Serve) -> None:
    """With auth.max_failures_per_minute 3, the fourth bad key is 429; a valid key is not."""
    server = serve(auth={"max_failures_per_minute": 3})
    anon = server.client()
    for _ in range(3):
        problem(anon.get("/v1/quota", headers={"Authorization": "Bearer nope"}), 401)
    response = anon.get("/v1/quota", headers={"Authorization": "Bearer nope"})
    problem(response, 429)
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert server.client("bob").get("/v1/quota").status_code == 200


def test_every_class_of_bad_key_gets_the_same_answer(serve: Serve) -> None:
    """Missing, malformed, unknown, near-miss and duplicated keys get byte-identical 401s."""
    server = serve(auth={"max_failures_per_minute": 1000, "worker_token": WORKER_TOKEN})
    anon = server.client()
    for method, path in PATHS:
        answers = {name: call(anon, method, path, headers) for name, headers in BAD_CLASSES.items()}
        assert answers["none"].status_code == 401
        assert answers["none"].headers["www-authenticate"] == "Bearer"
        expected = fingerprint(answers["none"])
        for name, response in answers.items():
            assert fingerprint(response) == expected, (path, name)


def test_every_class_of_bad_key_gets_the_same_429_once_throttled(serve: Serve) -> None:
    """From a throttled address, every class of bad key gets the same 429 (but its wait)."""
    server = serve(auth={"max_failures_per_minute": 2, "worker_token": WORKER_TOKEN})
    anon = server.client()
    for _ in range(2):
        problem(anon.get("/v1/quota", headers=BAD), 401)
    for method, path in PATHS:
        answers = {name: call(anon, method, path, headers) for name, headers in BAD_CLASSES.items()}
        expected = fingerprint(answers["none"], *WAIT)
        assert expected[0] == 429
        for name, response in answers.items():
            assert fingerprint(response, *WAIT) == expected, (path, name)
            assert 1 <= int(response.headers["retry-after"]) <= 60


def test_x_forwarded_for_from_an_untrusted_peer_is_ignored(server: LiveServer) -> None:
    """Without trusted proxies, bad keys claiming ten different addresses still count as one."""
    anon = server.client()
    for i in range(10):
        problem(anon.get("/v1/quota", headers=from_address(f"203.0.113.{i}")), 401)
    problem(anon.get("/v1/quota", headers=from_address("198.51.100.1")), 429)
    problem(anon.get("/v1/quota", headers={"Authorization": "Bearer x"}), 429)


def test_x_forwarded_for_from_a_trusted_proxy_names_the_client(serve: Serve) -> None:
    """Behind a trusted proxy the client is the right-most untrusted entry, whatever is spoofed."""
    server = serve(server={"trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]})
    anon = server.client()
    for _ in range(10):
        problem(anon.get("/v1/quota", headers=from_address("203.0.113.7")), 401)
    throttled = [
        "203.0.113.7",
        "198.51.100.1, 203.0.113.7",  # the client's own claim, left of what the proxy saw
        "203.0.113.7, 10.1.2.3",  # through a second trusted proxy
    ]
    for forwarded in throttled:
        problem(anon.get("/v1/quota", headers=from_address(forwarded)), 429)
    for forwarded in ("203.0.113.8", "203.0.113.7, 203.0.113.8"):  # other clients
        problem(anon.get("/v1/quota", headers=from_address(forwarded)), 401)
    problem(anon.get("/v1/quota", headers=BAD), 401)  # the proxy itself, no header
    alice = server.client("alice", headers={"X-Forwarded-For": "203.0.113.7"})
    assert alice.get("/v1/quota").status_code == 200


def test_bad_keys_sharing_a_prefix_are_throttled_from_any_address(serve: Serve) -> None:
    """Ten bad keys with the same first 8 characters, from ten addresses, throttle that prefix."""
    server = serve(server=BEHIND_PROXY)
    anon = server.client()
    for i in range(10):  # alice's key starts "alice-ke"
        headers = from_address(f"203.0.113.{i}", f"alice-key-guess-{i}")
        problem(anon.get("/v1/quota", headers=headers), 401)
    newcomer = "198.51.100.1"
    response = anon.get("/v1/quota", headers=from_address(newcomer, "alice-key-guess-x"))
    problem(response, 429)
    assert 55 <= int(response.headers["retry-after"]) <= 60
    problem(anon.get("/v1/quota", headers=from_address(newcomer, "bob-key-guess")), 401)
    problem(anon.get("/v1/quota", headers=from_address(newcomer, None)), 401)
    alice = server.client("alice", headers={"X-Forwarded-For": newcomer})
    assert alice.get("/v1/quota").status_code == 200  # the valid key of that prefix


def test_bad_worker_tokens_are_throttled_like_bad_keys_and_the_valid_token_is_not(
    serve: Serve,
) -> None:
    """/v1/workers counts bad tokens in the same limiter; the valid token still gets through."""
    server = serve(auth={"worker_token": WORKER_TOKEN})
    anon = server.client()
    for i in range(10):
        headers = {"Authorization": f"Bearer bad-token-{i}"}
        problem(anon.post("/v1/workers", headers=headers, json={}), 401)
    problem(anon.post("/v1/workers", headers={"Authorization": "Bearer bad"}, json={}), 429)
    problem(anon.get("/v1/quota", headers=BAD), 429)  # the same address, on a user route
    worker = {"Authorization": f"Bearer {WORKER_TOKEN}"}
    # Past authentication: the empty body is what is refused now.
    problem(anon.post("/v1/workers", headers=worker, json={}), 422)
    assert server.client("alice").get("/v1/quota").status_code == 200


def test_with_registration_off_a_presented_token_is_403_and_not_counted(serve: Serve) -> None:
    """Without auth.worker_token, a token on /v1/workers is 403 (nothing to guess), never 429."""
    server = serve()
    anon = server.client()
    for i in range(12):
        headers = {"Authorization": f"Bearer not-a-token-{i}"}
        body = problem(anon.post("/v1/workers", headers=headers, json={}), 403)
        assert "registration is off" in body["detail"]
    problem(anon.post("/v1/workers", json={}), 401)  # no token at all: 401, as everywhere
    problem(anon.get("/v1/quota", headers=BAD), 401)  # the address was not throttled

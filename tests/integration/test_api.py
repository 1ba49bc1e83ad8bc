"""The HTTP API end to end: a real uvicorn server on loopback, real HTTP clients, one per user.

Every endpoint and every error status of the contract (the routes' docstrings, SPEC §5 and the
invariant I5 "own requests only"): submit, estimate, get with long-poll, list with filters and
cursors, cancel, Server-Sent Events, GPUs and their cordon / drain, quotas and users, metrics,
health; problem details for every error, the request id and security headers on every answer.
The throttling of bad keys is in ``test_auth_throttle.py``.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import LiveServer

Serve = Callable[..., "LiveServer"]

PROBLEM_KEYS = {"type", "title", "status", "detail", "request_id"}
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}
GPUS = ("sim:0", "sim:1")


# Helpers ------------------------------------------------------------------------------------------


def chat_body(
    model: str = "llama-3-8b",
    *,
    text: str = "hello",
    max_tokens: int = 8,
    **fields: Any,
) -> dict[str, Any]:
    """A chat submission; ``simulate=`` goes into ``input``, other keywords are body fields."""
    simulate = fields.pop("simulate", None)
    body_input: dict[str, Any] = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
    }
    if simulate is not None:
        body_input["simulate"] = simulate
    return {"model": model, "input": body_input, **fields}


def hang_body(**fields: Any) -> dict[str, Any]:
    """A chat submission whose execution never ends (until cancelled)."""
    return chat_body(simulate={"failure": "hang"}, **fields)


def assert_common_headers(response: httpx.Response) -> None:
    """The request id and the OWASP REST headers every answer carries."""
    assert response.headers.get("x-request-id")
    assert response.headers.get("x-content-type-options") == "nosniff"
    assert response.headers.get("cache-control") == "no-store"
    assert response.headers.get("content-security-policy") == "frame-ancestors 'none'"
    assert response.headers.get("x-frame-options") == "DENY"


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """Check ``response`` is an RFC 9457 problem of ``status``; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body.keys() >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert body["type"].startswith("/problems/")
    assert body["title"] and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert_common_headers(response)
    return body


def accepted(response: httpx.Response) -> dict[str, Any]:
    """Check a submission was accepted (202); return the request."""
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def submit(client: httpx.Client, body: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """Submit ``body`` (a short chat by default) and return the accepted request."""
    return accepted(client.post("/v1/requests", json=body or chat_body(), **kw))


def until(predicate: Callable[[], Any], timeout_s: float = 10.0, every_s: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy (fail after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(every_s)


def status_of(client: httpx.Client, request_id: str) -> str:
    """The request's current status."""
    response = client.get(f"/v1/requests/{request_id}")
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


def until_status(client: httpx.Client, request_id: str, *statuses: str) -> dict[str, Any]:
    """Poll the request until its status is one of ``statuses``; return it."""

    def reached() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/requests/{request_id}").json()
        return body if body["status"] in statuses else None

    result: dict[str, Any] = until(reached)
    return result


def cordon_all(root: httpx.Client) -> None:
    """Cordon every GPU so that submissions stay queued."""
    for gpu in GPUS:
        assert root.post(f"/v1/gpus/{gpu}/cordon").status_code == 200


def list_ids(client: httpx.Client, **params: Any) -> list[str]:
    """The ids of one page of ``GET /v1/requests`` with ``params`` (limit 500)."""
    params.setdefault("limit", 500)
    response = client.get("/v1/requests", params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def parse_sse(lines: Iterator[str]) -> list[dict[str, Any]]:
    """Server-Sent Events from ``lines``: each with ``id``, ``event`` and parsed ``data``."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if current:
                events.append(current)
            current = {}
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            current[name] = json.loads(value) if name == "data" else value
    if current:
        events.append(current)
    return events


def read_events(
    client: httpx.Client,
    request_id: str,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> list[dict[str, Any]]:
    """Every event of the request's stream until the server ends it."""
    url = f"/v1/requests/{request_id}/events"
    with client.stream("GET", url, headers=headers, timeout=timeout_s) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert_common_headers(response)
        return parse_sse(response.iter_lines())


def same_length_fake_id(request_id: str) -> str:
    """An id of the same form and length as ``request_id`` that names no request."""
    return request_id[:-6] + "ZZZZZZ"


# Submit ------------------------------------------------------------------------------------------


def test_submit_answers_202_with_the_request_already_stored(server: LiveServer) -> None:
    """POST /v1/requests is 202 with id, status, priority, estimate and queue position."""
    alice, root = server.client("alice"), server.client("root")
    cordon_all(root)
    response = alice.post("/v1/requests", json=chat_body(priority="high"))
    first = accepted(response)
    assert_common_headers(response)
    assert "idempotency-replayed" not in response.headers
    assert first["id"].startswith("req_")
    assert first["status"] == "queued"
    assert first["priority"] == "high"
    assert first["user"] == "alice"
    assert first["attempts"] == 0
    assert first["estimate"]["gpu_memory_mb"] > 15_000
    assert first["estimate"]["duration_s"] > 0
    assert first["queue_position"] == 0
    # Durable before the 202: the store has it the moment the answer arrives.
    stored = server.service.runtime.store.get_request(first["id"])
    assert stored is not None and stored.user == "alice"
    second = submit(alice, chat_body(priority="low"))
    assert second["queue_position"] == 1
    fetched = alice.get(f"/v1/requests/{first['id']}").json()
    assert fetched["status"] == "queued" and fetched["queue_position"] == 0


def test_submit_runs_the_request_to_success(server: LiveServer) -> None:
    """A submitted request ends succeeded with a placement on a GPU and a result."""
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"duration_s": 0.05}))
    done = alice.get(f"/v1/requests/{created['id']}", params={"wait": 10}).json()
    assert done["status"] == "succeeded"
    assert done["placement"]["gpu_id"] in GPUS
    assert done["result"]["object"] == "chat.completion"
    assert done["finished_at"] is not None and done["error"] is None
    assert done["queue_position"] is None


def test_submit_and_wait_run_nothing_in_the_thread_pool(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dependencies and endpoints of the request routes are coroutines: no thread hop per call."""
    import fastapi.dependencies.utils
    import fastapi.routing

    hops: list[str] = []
    real = fastapi.dependencies.utils.run_in_threadpool

    async def counted(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(fastapi.dependencies.utils, "run_in_threadpool", counted)
    monkeypatch.setattr(fastapi.routing, "run_in_threadpool", counted)
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"duration_s": 0.01}))
    done = alice.get(f"/v1/requests/{created['id']}", params={"wait": 10}).json()
    assert done["status"] == "succeeded"
    assert hops == []


def test_idempotency_key_replays_the_first_request(server: LiveServer) -> None:
    """The same key and body give the same id with Idempotency-Replayed: true."""
    alice = server.client("alice")
    key = {"Idempotency-Key": "order-42"}
    first = alice.post("/v1/requests", json=chat_body(), headers=key)
    again = alice.post("/v1/requests", json=chat_body(), headers=key)
    assert accepted(first)["id"] == accepted(again)["id"]
    assert "idempotency-replayed" not in first.headers
    assert again.headers["idempotency-replayed"] == "true"
    assert list_ids(alice) == [first.json()["id"]]


def test_idempotency_key_with_another_body_is_a_conflict(server: LiveServer) -> None:
    """The same key with a different body is 422 and creates nothing."""
    alice = server.client("alice")
    key = {"Idempotency-Key": "order-43"}
    first = submit(alice, chat_body(text="one"), headers=key)
    body = problem(alice.post("/v1/requests", json=chat_body(text="two"), headers=key), 422)
    assert body["type"] == "/problems/idempotency-conflict"
    assert list_ids(alice) == [first["id"]]


def test_idempotency_keys_belong_to_their_user(server: LiveServer) -> None:
    """Another user may use the same key: they get a request of their own."""
    alice, bob = server.client("alice"), server.client("bob")
    key = {"Idempotency-Key": "shared-key"}
    mine = submit(alice, chat_body(), headers=key)
    response = bob.post("/v1/requests", json=chat_body(), headers=key)
    theirs = accepted(response)
    assert "idempotency-replayed" not in response.headers
    assert theirs["id"] != mine["id"] and theirs["user"] == "bob"


@pytest.mark.parametrize(
    ("key", "kind"), [("", "string_too_short"), ("k" * 256, "string_too_long")]
)
def test_an_idempotency_key_out_of_bounds_is_invalid(
    server: LiveServer, key: str, kind: str
) -> None:
    """An Idempotency-Key that is empty or over 255 characters: 422 naming the header.

    Nothing is stored.
    """
    response = server.client("alice").post(
        "/v1/requests", json=chat_body(), headers={"Idempotency-Key": key}
    )
    body = problem(response, 422)
    assert body["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert body["errors"][0]["type"] == kind
    listed = server.client("alice").get("/v1/requests")
    assert listed.json()["items"] == []


def test_idempotent_replays_do_not_count_against_the_rate(serve: Serve) -> None:
    """Replays of one key return the first request without using the requests_per_minute."""
    server = serve(user_quotas={"alice": {"requests_per_minute": 2}})
    alice = server.client("alice")
    key = {"Idempotency-Key": "retry-me"}
    first = submit(alice, chat_body(), headers=key)
    for _ in range(3):
        replay = alice.post("/v1/requests", json=chat_body(), headers=key)
        assert accepted(replay)["id"] == first["id"]
        assert replay.headers["idempotency-replayed"] == "true"
    assert alice.get("/v1/quota").json()["usage"]["requests_last_minute"] == 1
    submit(alice)
    problem(alice.post("/v1/requests", json=chat_body()), 429)
    # A replay still answers once the rate is used up.
    assert accepted(alice.post("/v1/requests", json=chat_body(), headers=key))["id"] == first["id"]


# Estimate ----------------------------------------------------------------------------------------


def test_estimate_reports_memory_duration_and_fit_without_queueing(server: LiveServer) -> None:
    """POST /v1/estimate is 200 with memory, its breakdown, durations and fits_now."""
    alice, root = server.client("alice"), server.client("root")
    response = alice.post("/v1/estimate", json=chat_body())
    assert response.status_code == 200, response.text
    assert_common_headers(response)
    estimate = response.json()
    breakdown = estimate["breakdown"]
    assert breakdown["weights_mb"] == 15_317
    assert estimate["gpu_memory_mb"] == (
        breakdown["weights_mb"] + breakdown["kv_cache_mb"] + breakdown["activations_mb"]
    )
    assert estimate["duration_s"]["H100-80GB"] > 0
    assert estimate["gpu_count"] == 1
    assert sorted(estimate["fits_now"]) == list(GPUS)
    assert list_ids(alice) == [] and list_ids(root) == []
    usage = alice.get("/v1/quota").json()["usage"]
    assert usage["requests_last_minute"] == 0 and usage["queued"] == 0
    submit(alice)  # whereas a submission counts
    assert alice.get("/v1/quota").json()["usage"]["requests_last_minute"] == 1


def test_estimate_follows_the_documented_example(server: LiveServer) -> None:
    """llama-3-8b, batch 16, 6,000 in, 1,000 out, on two GPUs: 7,659 + 7,000 MiB per GPU."""
    body = {
        "model": "llama-3-8b",
        "shape": {"batch_size": 16, "input_tokens": 6000, "output_tokens": 1000},
        "resources": {"gpu_count": 2},
    }
    estimate = server.client("alice").post("/v1/estimate", json=body).json()
    assert estimate["gpu_memory_mb"] == 14_659
    assert estimate["breakdown"] == {"weights_mb": 7659, "kv_cache_mb": 7000, "activations_mb": 0}
    assert estimate["shape"] == {"batch_size": 16, "input_tokens": 6000, "output_tokens": 1000}


def test_estimate_shows_no_fit_on_a_cordoned_fleet(server: LiveServer) -> None:
    """With every GPU cordoned, fits_now is empty (and an unknown model is 422)."""
    alice = server.client("alice")
    cordon_all(server.client("root"))
    assert alice.post("/v1/estimate", json=chat_body()).json()["fits_now"] == []
    problem(alice.post("/v1/estimate", json=chat_body("no-such-model")), 422)
    problem(server.client().post("/v1/estimate", json=chat_body()), 401)


# Get and long-poll -------------------------------------------------------------------------------


def test_wait_returns_as_soon_as_the_request_finishes(server: LiveServer) -> None:
    """GET ?wait=10 on a 0.3 s request returns succeeded well before 10 s."""
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"duration_s": 0.3}))
    started = time.monotonic()
    response = alice.get(f"/v1/requests/{created['id']}", params={"wait": 10})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert 0.1 < elapsed < 3.0


def test_wait_gives_up_after_its_time_with_the_live_request(server: LiveServer) -> None:
    """GET ?wait=0.5 on a hanging request answers after about 0.5 s, still not terminal."""
    alice = server.client("alice")
    created = submit(alice, hang_body())
    started = time.monotonic()
    response = alice.get(f"/v1/requests/{created['id']}", params={"wait": 0.5})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["status"] not in TERMINAL
    assert 0.4 < elapsed < 3.0


def test_wait_on_a_finished_request_returns_at_once(server: LiveServer) -> None:
    """GET ?wait=60 on a terminal request does not wait."""
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"duration_s": 0.01}))
    until_status(alice, created["id"], "succeeded")
    started = time.monotonic()
    assert alice.get(f"/v1/requests/{created['id']}", params={"wait": 60}).status_code == 200
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("wait", ["61", "-1", "soon", "nan"])
def test_wait_out_of_range_is_422(server: LiveServer, wait: str) -> None:
    """Wait above 60 s, negative or not a number is 422."""
    alice = server.client("alice")
    created = submit(alice)
    problem(alice.get(f"/v1/requests/{created['id']}", params={"wait": wait}), 422)


def test_unknown_request_is_404(shared_server: LiveServer) -> None:
    """A request id that names nothing is 404 on every request route."""
    alice = shared_server.client("alice")
    problem(alice.get("/v1/requests/req_nothing"), 404)
    problem(alice.delete("/v1/requests/req_nothing"), 404)
    problem(alice.get("/v1/requests/req_nothing/events"), 404)
    problem(alice.get("/v1/requests/" + "x" * 65), 422)


# List --------------------------------------------------------------------------------------------


def test_list_filters_by_status_model_and_priority_newest_first(server: LiveServer) -> None:
    """GET /v1/requests filters by status (repeatable), model and priority, newest first."""
    alice, root = server.client("alice"), server.client("root")
    cordon_all(root)
    made = [
        submit(alice, chat_body("llama-3-8b", priority="high")),
        submit(alice, chat_body("qwen2.5-7b", priority="low")),
        submit(alice, chat_body("llama-3-8b", priority="low")),
        submit(alice, chat_body("qwen2.5-7b", priority="high")),
        submit(alice, chat_body("llama-3-8b", priority="normal")),
    ]
    ids = [request["id"] for request in made]
    for index in (1, 2):
        assert alice.delete(f"/v1/requests/{ids[index]}").json()["status"] == "cancelled"
    newest_first = ids[::-1]
    assert list_ids(alice) == newest_first
    assert list_ids(alice, status="cancelled") == [ids[2], ids[1]]
    assert list_ids(alice, status="queued") == [ids[4], ids[3], ids[0]]
    assert list_ids(alice, status=["queued", "cancelled"]) == newest_first
    assert list_ids(alice, status="succeeded") == []
    assert list_ids(alice, model="qwen2.5-7b") == [ids[3], ids[1]]
    assert list_ids(alice, priority="low") == [ids[2], ids[1]]
    assert list_ids(alice, model="llama-3-8b", priority="high") == [ids[0]]
    assert list_ids(alice, model="llama-3-8b", status="cancelled") == [ids[2]]
    page = alice.get("/v1/requests").json()
    assert page["next_cursor"] is None
    assert all(item["user"] == "alice" for item in page["items"])


def test_list_pages_cover_every_request_once(server: LiveServer) -> None:
    """Paging 23 requests five at a time gives each once, in order, with no gaps."""
    alice = server.client("alice")
    cordon_all(server.client("root"))
    made = [submit(alice)["id"] for _ in range(23)]
    everything = list_ids(alice)
    assert everything == made[::-1]
    seen: list[str] = []
    sizes: list[int] = []
    cursor: str | None = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 5}
        if cursor is not None:
            params["cursor"] = cursor
        response = alice.get("/v1/requests", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        sizes.append(len(page["items"]))
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sizes == [5, 5, 5, 5, 3]
    assert len(seen) == len(set(seen)) == 23
    assert seen == everything
    assert set(seen) == set(made)


def test_list_cursor_survives_new_submissions(server: LiveServer) -> None:
    """Requests submitted between pages do not shift the next page (no duplicates or gaps)."""
    alice = server.client("alice")
    cordon_all(server.client("root"))
    made = [submit(alice)["id"] for _ in range(6)]
    first = alice.get("/v1/requests", params={"limit": 3}).json()
    submit(alice)
    second = alice.get("/v1/requests", params={"limit": 3, "cursor": first["next_cursor"]}).json()
    ids = [item["id"] for item in first["items"] + second["items"]]
    assert ids == made[::-1]
    assert second["next_cursor"] is None


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "garbage!!"},
        {"cursor": "Zm9vYmFy"},
        {"limit": 0},
        {"limit": 501},
        {"limit": "ten"},
        {"status": "sleeping"},
        {"cursor": "c" * 513},
    ],
    ids=["garbage-cursor", "base64-cursor", "limit-0", "limit-501", "limit-text", "status", "long"],
)
def test_list_rejects_bad_parameters(shared_server: LiveServer, params: dict[str, Any]) -> None:
    """A garbage cursor, a limit outside 1..500 or an unknown status is a 422 problem."""
    problem(shared_server.client("alice").get("/v1/requests", params=params), 422)


# Cancel ------------------------------------------------------------------------------------------


def test_cancel_a_queued_request(server: LiveServer) -> None:
    """DELETE on a queued request is 200 with status cancelled; it leaves the queue."""
    alice = server.client("alice")
    cordon_all(server.client("root"))
    first, second = submit(alice), submit(alice)
    response = alice.delete(f"/v1/requests/{first['id']}")
    assert response.status_code == 200
    assert_common_headers(response)
    assert response.json()["status"] == "cancelled"
    assert status_of(alice, first["id"]) == "cancelled"
    assert alice.get(f"/v1/requests/{second['id']}").json()["queue_position"] == 0
    assert alice.get("/v1/quota").json()["usage"]["queued"] == 1


def test_cancel_a_running_request_frees_its_gpu(server: LiveServer) -> None:
    """DELETE on a running request is 200 cancelled and its reservation is released."""
    alice, root = server.client("alice"), server.client("root")
    created = submit(alice, hang_body())
    running = until_status(alice, created["id"], "running")
    gpu = running["placement"]["gpu_id"]
    assert root.get(f"/v1/gpus/{gpu}").json()["memory_reserved_mb"] > 0
    response = alice.delete(f"/v1/requests/{created['id']}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    # docs/api.md: "its GPU memory is released at once".
    after = root.get(f"/v1/gpus/{gpu}").json()
    assert after["memory_reserved_mb"] == 0
    assert created["id"] not in after["running_requests"]


def test_cancel_a_finished_request_is_409_with_its_status(server: LiveServer) -> None:
    """DELETE on a terminal request is 409 and the body's request_status says how it ended."""
    alice = server.client("alice")
    done = submit(alice, chat_body(simulate={"duration_s": 0.01}))
    until_status(alice, done["id"], "succeeded")
    body = problem(alice.delete(f"/v1/requests/{done['id']}"), 409)
    assert body["request_status"] == "succeeded"
    assert body["detail"] == (
        f"request {done['id']} already succeeded; only queued or running requests can be cancelled"
    )
    cancelled = submit(alice, hang_body())
    assert alice.delete(f"/v1/requests/{cancelled['id']}").status_code == 200
    body = problem(alice.delete(f"/v1/requests/{cancelled['id']}"), 409)
    assert body["request_status"] == "cancelled"


def test_a_request_past_its_timeout_expires(server: LiveServer) -> None:
    """A request not finished by timeout_s ends expired; cancelling it then is 409."""
    alice = server.client("alice")
    created = submit(alice, hang_body(timeout_s=0.3))
    assert created["timeout_s"] == 0.3
    done = alice.get(f"/v1/requests/{created['id']}", params={"wait": 10}).json()
    assert done["status"] == "expired" and done["finished_at"] is not None
    body = problem(alice.delete(f"/v1/requests/{created['id']}"), 409)
    assert body["request_status"] == "expired"
    statuses = [event["data"]["status"] for event in read_events(alice, created["id"])]
    assert statuses[0] == "queued" and statuses[-1] == "expired"


def test_a_request_failing_every_attempt_ends_failed(server: LiveServer) -> None:
    """A request whose backend fails every attempt ends failed with its error, after 3 tries."""
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"failure": "error"}))
    done = alice.get(f"/v1/requests/{created['id']}", params={"wait": 10}).json()
    assert done["status"] == "failed"
    assert done["attempts"] == 3
    assert done["error"]["type"] and done["error"]["message"]
    assert done["result"] is None
    assert alice.get("/v1/metrics").json()["retries"].get("backend_error") == 2
    assert problem(alice.delete(f"/v1/requests/{created['id']}"), 409)["request_status"] == (
        "failed"
    )


# Server-Sent Events ------------------------------------------------------------------------------


def test_events_stream_from_queued_to_the_terminal_status(server: LiveServer) -> None:
    """The SSE stream gives every status change, queued first, and ends after succeeded."""
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"duration_s": 0.2}))
    events = read_events(alice, created["id"])
    statuses = [event["data"]["status"] for event in events]
    assert statuses == ["queued", "dispatching", "running", "succeeded"]
    assert {event["event"] for event in events} == {"status"}
    seqs = [int(event["id"]) for event in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [event["data"]["seq"] for event in events] == seqs
    assert events[0]["data"]["from_status"] is None
    assert all(event["data"]["request_id"] == created["id"] for event in events)
    froms = [event["data"]["from_status"] for event in events[1:]]
    assert froms == statuses[:-1]


def test_events_resume_after_last_event_id(server: LiveServer) -> None:
    """Last-Event-ID resumes the stream after that event."""
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"duration_s": 0.05}))
    until_status(alice, created["id"], "succeeded")
    events = read_events(alice, created["id"])
    resumed = read_events(alice, created["id"], headers={"Last-Event-ID": events[0]["id"]})
    assert resumed == events[1:]
    garbage = read_events(alice, created["id"], headers={"Last-Event-ID": "not-a-number"})
    assert garbage == events


def test_events_resumed_after_the_terminal_event_end_at_once(server: LiveServer) -> None:
    """Resuming with the terminal event's id ends the stream at once, with no events."""
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"duration_s": 0.01}))
    until_status(alice, created["id"], "succeeded")
    events = read_events(alice, created["id"])
    last = {"Last-Event-ID": events[-1]["id"]}
    assert read_events(alice, created["id"], headers=last, timeout_s=2.0) == []


async def test_events_follow_a_live_request_to_its_cancellation(server: LiveServer) -> None:
    """A stream opened on a running request delivers the cancellation and then ends."""
    async with (
        server.async_client("alice") as alice,
        server.async_client("bob") as bob,
    ):
        created = (await alice.post("/v1/requests", json=hang_body())).json()
        url = f"/v1/requests/{created['id']}/events"

        async def collect() -> list[dict[str, Any]]:
            async with alice.stream("GET", url, timeout=10) as response:
                assert response.status_code == 200
                return parse_sse(iter([line async for line in response.aiter_lines()]))

        reader = asyncio.create_task(collect())
        for _ in range(500):
            current = (await alice.get(f"/v1/requests/{created['id']}")).json()
            if current["status"] == "running":
                break
            await asyncio.sleep(0.01)
        problem(await bob.delete(f"/v1/requests/{created['id']}"), 404)
        assert (await alice.delete(f"/v1/requests/{created['id']}")).status_code == 200
        events = await asyncio.wait_for(reader, 10)
    statuses = [event["data"]["status"] for event in events]
    assert statuses == ["queued", "dispatching", "running", "cancelled"]
    assert events[-1]["data"]["actor"] == "alice"


# GPUs --------------------------------------------------------------------------------------------


def test_list_and_get_gpus(server: LiveServer) -> None:
    """GET /v1/gpus lists the fleet in id order; GET /v1/gpus/{id} gives one; unknown is 404."""
    alice = server.client("alice")
    page = alice.get("/v1/gpus").json()
    assert [gpu["id"] for gpu in page["items"]] == list(GPUS)
    assert page["next_cursor"] is None
    gpu = alice.get("/v1/gpus/sim:0").json()
    assert gpu["type"] == "H100-80GB" and gpu["worker"] == "sim"
    assert gpu["health"] == "healthy" and gpu["schedulable"] is True
    assert gpu["cordoned"] is False and gpu["draining"] is False
    assert gpu["memory_total_mb"] == 81_559 and gpu["slots"] == 8
    first = alice.get("/v1/gpus", params={"limit": 1}).json()
    assert [item["id"] for item in first["items"]] == ["sim:0"]
    assert first["next_cursor"] == "sim:0"
    rest = alice.get("/v1/gpus", params={"limit": 1, "cursor": "sim:0"}).json()
    assert [item["id"] for item in rest["items"]] == ["sim:1"] and rest["next_cursor"] is None
    problem(alice.get("/v1/gpus/sim:9"), 404)
    problem(alice.get("/v1/gpus", params={"limit": 0}), 422)
    problem(server.client().get("/v1/gpus"), 401)


def test_cordoned_gpu_takes_no_new_work_until_uncordoned(server: LiveServer) -> None:
    """Cordon (admin) is 200 and sends new work elsewhere; with all cordoned, work waits."""
    alice, root = server.client("alice"), server.client("root")
    response = root.post("/v1/gpus/sim:0/cordon")
    assert response.status_code == 200
    assert response.json()["cordoned"] is True and response.json()["schedulable"] is False
    made = [submit(alice, chat_body(simulate={"duration_s": 0.01}))["id"] for _ in range(4)]
    for request_id in made:
        done = alice.get(f"/v1/requests/{request_id}", params={"wait": 10}).json()
        assert done["status"] == "succeeded"
        assert done["placement"]["gpu_id"] == "sim:1"
    root.post("/v1/gpus/sim:1/cordon")
    waiting = submit(alice, chat_body(simulate={"duration_s": 0.01}))
    time.sleep(0.3)
    assert status_of(alice, waiting["id"]) == "queued"
    response = root.post("/v1/gpus/sim:0/uncordon")
    assert response.status_code == 200
    assert response.json()["cordoned"] is False and response.json()["schedulable"] is True
    done = alice.get(f"/v1/requests/{waiting['id']}", params={"wait": 10}).json()
    assert done["status"] == "succeeded" and done["placement"]["gpu_id"] == "sim:0"


def test_drain_cordons_and_waits_for_running_work(server: LiveServer) -> None:
    """Drain is 200: cordoned, draining while work runs, not draining once it has ended."""
    alice, root = server.client("alice"), server.client("root")
    created = submit(alice, hang_body())
    gpu = until_status(alice, created["id"], "running")["placement"]["gpu_id"]
    response = root.post(f"/v1/gpus/{gpu}/drain")
    assert response.status_code == 200
    drained = response.json()
    assert drained["cordoned"] is True and drained["draining"] is True
    assert created["id"] in drained["running_requests"]
    assert status_of(alice, created["id"]) == "running"
    alice.delete(f"/v1/requests/{created['id']}")
    until(lambda: root.get(f"/v1/gpus/{gpu}").json()["draining"] is False)
    assert root.get(f"/v1/gpus/{gpu}").json()["cordoned"] is True
    undrained = root.post(f"/v1/gpus/{gpu}/uncordon").json()
    assert undrained["cordoned"] is False and undrained["draining"] is False


@pytest.mark.parametrize("action", ["cordon", "uncordon", "drain"])
def test_gpu_actions_need_the_admin_role(server: LiveServer, action: str) -> None:
    """A user's cordon, uncordon or drain is 403 and changes nothing; unknown GPUs are 404."""
    alice, root = server.client("alice"), server.client("root")
    problem(alice.post(f"/v1/gpus/sim:0/{action}"), 403)
    gpu = alice.get("/v1/gpus/sim:0").json()
    assert gpu["cordoned"] is False and gpu["draining"] is False
    problem(root.post(f"/v1/gpus/sim:9/{action}"), 404)
    problem(server.client().post(f"/v1/gpus/sim:0/{action}"), 401)
    problem(root.get(f"/v1/gpus/sim:0/{action}"), 405)


def test_gpu_running_requests_hide_other_users(server: LiveServer) -> None:
    """A GPU's running_requests lists only the caller's own requests (admins see all)."""
    alice, bob, root = server.client("alice"), server.client("bob"), server.client("root")
    root.post("/v1/gpus/sim:1/cordon")
    theirs = submit(bob, hang_body())
    mine = submit(alice, hang_body())
    until_status(bob, theirs["id"], "running")
    until_status(alice, mine["id"], "running")
    assert alice.get("/v1/gpus/sim:0").json()["running_requests"] == [mine["id"]]
    assert bob.get("/v1/gpus/sim:0").json()["running_requests"] == [theirs["id"]]
    assert sorted(root.get("/v1/gpus/sim:0").json()["running_requests"]) == sorted(
        [mine["id"], theirs["id"]]
    )
    listed = alice.get("/v1/gpus").json()["items"][0]["running_requests"]
    assert listed == [mine["id"]]


WORKER_TOKEN = "worker-token-0123456789abcdef"


def worker_gpu(**fields: Any) -> dict[str, Any]:
    """One GPU of a worker's report, as ``gpurouter worker`` named ``node-7-9090`` sends it."""
    return {
        "id": "node-7-9090:0",
        "index": 0,
        "type": "L4-24GB",
        "memory_total_mb": 23_034,
        **fields,
    }


def test_a_registered_worker_s_gpus_are_named_after_its_registration(serve: Serve) -> None:
    """A worker registering as ``gpu-x`` has its GPUs shown as ``gpu-x:<index>``."""
    server = serve(auth={"worker_token": WORKER_TOKEN})
    worker = server.client(headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
    body = {"name": "gpu-x", "url": "http://127.0.0.1:9", "gpus": [worker_gpu()]}
    answer = worker.post("/v1/workers", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["gpus"] == 1
    gpu = server.client("root").get("/v1/gpus/gpu-x:0")
    assert gpu.status_code == 200 and gpu.json()["worker"] == "gpu-x"


@pytest.mark.parametrize("reported", [None, "", 7])
def test_a_registration_with_a_gpu_lacking_its_id_is_422_and_registers_nothing(
    serve: Serve, reported: Any
) -> None:
    """A GPU the router could not name back to its worker refuses the whole registration."""
    server = serve(auth={"worker_token": WORKER_TOKEN})
    worker = server.client(headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
    gpu = worker_gpu(id=reported)
    if reported is None:
        del gpu["id"]
    body = {"name": "gpu-x", "url": "http://127.0.0.1:9", "gpus": [gpu]}
    refused = problem(worker.post("/v1/workers", json=body), 422)
    assert "id" in refused["detail"], refused
    ids = {item["id"] for item in server.client("root").get("/v1/gpus").json()["items"]}
    assert ids == set(GPUS)


@pytest.mark.parametrize(
    "change",
    [
        {"url": "http://]\x82擐Ⱦ"},  # not a host name: the poller could never reach it
        {"url": "http://127.0.0.1:99999"},  # no such port
        {"url": "ftp://127.0.0.1:9"},
        {"url": "http://-bad-.example"},
        {"gpus": [{}]},  # a reading without its index, id and memory
        {"gpus": [{"id": "x:0", "index": 0, "memory_total_mb": 0}]},
        {"gpus": [{"id": "x:0", "index": 0, "memory_total_mb": 80, "health": "fine"}]},
    ],
    ids=["non-ascii-host", "port", "scheme", "label", "empty-gpu", "no-memory", "health"],
)
def test_a_malformed_registration_is_422_and_registers_nothing(
    serve: Serve, change: dict[str, Any]
) -> None:
    """A registration whose URL is no http(s) URL or whose GPUs are malformed changes nothing."""
    server = serve(auth={"worker_token": WORKER_TOKEN})
    worker = server.client(headers={"Authorization": f"Bearer {WORKER_TOKEN}"})
    body = {"name": "gpu-x", "url": "http://127.0.0.1:9", "gpus": [worker_gpu()], **change}
    problem(worker.post("/v1/workers", json=body), 422)
    ids = {item["id"] for item in server.client("root").get("/v1/gpus").json()["items"]}
    assert ids == set(GPUS)


# Quotas and users --------------------------------------------------------------------------------


def test_own_quota_shows_limits_and_usage(serve: Serve) -> None:
    """GET /v1/quota gives the caller's own limits and live usage."""
    server = serve(user_quotas={"alice": {"requests_per_minute": 30, "max_priority": "high"}})
    alice, bob = server.client("alice"), server.client("bob")
    cordon_all(server.client("root"))
    submit(alice)
    submit(alice)
    quota = alice.get("/v1/quota").json()
    assert quota["user"] == "alice"
    assert quota["limits"]["requests_per_minute"] == 30
    assert quota["limits"]["max_priority"] == "high"
    assert quota["limits"]["max_concurrent"] is None
    assert quota["usage"] == {
        "requests_last_minute": 2,
        "concurrent": 0,
        "queued": 2,
        "gpu_seconds_last_hour": 0.0,
    }
    theirs = bob.get("/v1/quota").json()
    assert theirs["user"] == "bob" and theirs["limits"]["requests_per_minute"] == 100_000
    assert theirs["usage"]["queued"] == 0
    problem(server.client().get("/v1/quota"), 401)


def test_usage_counts_admissions_without_a_rate_limit(serve: Serve) -> None:
    """usage.requests_last_minute counts a user's admissions even when their rate is unlimited."""
    server = serve(user_quotas={"alice": {"requests_per_minute": None}})
    alice = server.client("alice")
    assert alice.get("/v1/quota").json()["limits"]["requests_per_minute"] is None
    submit(alice)
    submit(alice)
    assert alice.get("/v1/quota").json()["usage"]["requests_last_minute"] == 2


def test_users_list_is_for_admins(server: LiveServer) -> None:
    """GET /v1/users is 200 for an admin with every user, role and usage, 403 for a user."""
    cordon_all(server.client("root"))
    submit(server.client("alice"))
    response = server.client("root").get("/v1/users")
    assert response.status_code == 200
    users = {item["name"]: item for item in response.json()["items"]}
    assert {name: item["role"] for name, item in users.items()} == {
        "alice": "user",
        "bob": "user",
        "root": "admin",
    }
    assert users["alice"]["quota"]["max_priority"] == "critical"
    assert users["alice"]["usage"]["queued"] == 1 and users["bob"]["usage"]["queued"] == 0
    problem(server.client("alice").get("/v1/users"), 403)
    problem(server.client().get("/v1/users"), 401)


def test_users_list_shows_each_users_live_usage(server: LiveServer) -> None:
    """GET /v1/users gives every user's usage, the same as their own GET /v1/quota says."""
    alice, root = server.client("alice"), server.client("root")
    cordon_all(root)
    submit(alice)
    submit(alice)
    users = {item["name"]: item for item in root.get("/v1/users").json()["items"]}
    assert users["alice"]["usage"] == alice.get("/v1/quota").json()["usage"]
    assert users["alice"]["usage"]["queued"] == 2
    assert users["alice"]["usage"]["requests_last_minute"] == 2
    assert users["bob"]["usage"]["queued"] == 0


def test_quota_override_applies_to_the_next_submissions(server: LiveServer) -> None:
    """PUT /v1/users/{user}/quota (admin) is 200 and the new max_priority applies at once."""
    alice, root = server.client("alice"), server.client("root")
    submit(alice, chat_body(priority="high"))
    response = root.put("/v1/users/alice/quota", json={"max_priority": "normal"})
    assert response.status_code == 200, response.text
    quota = response.json()
    assert quota["user"] == "alice" and quota["limits"]["max_priority"] == "normal"
    body = problem(alice.post("/v1/requests", json=chat_body(priority="high")), 403)
    assert body["reason"] == "quota_max_priority"
    submit(alice, chat_body(priority="normal"))
    assert alice.get("/v1/quota").json()["limits"]["max_priority"] == "normal"
    users = {item["name"]: item for item in root.get("/v1/users").json()["items"]}
    assert users["alice"]["quota"]["max_priority"] == "normal"
    assert users["bob"]["quota"]["max_priority"] == "critical"
    submit(server.client("bob"), chat_body(priority="high"))
    cleared = root.put("/v1/users/alice/quota", json={})
    assert cleared.status_code == 200
    assert cleared.json()["limits"]["max_priority"] == "critical"
    submit(alice, chat_body(priority="high"))


def test_quota_override_of_max_queued_applies(server: LiveServer) -> None:
    """An override of max_queued to 1 refuses the second waiting request with 429."""
    alice, root = server.client("alice"), server.client("root")
    cordon_all(root)
    assert root.put("/v1/users/alice/quota", json={"max_queued": 1}).status_code == 200
    submit(alice)
    response = alice.post("/v1/requests", json=chat_body())
    body = problem(response, 429)
    assert body["reason"] == "quota_max_queued"
    assert int(response.headers["retry-after"]) >= 1


def test_quota_override_null_lifts_a_configured_limit(serve: Serve) -> None:
    """An override of null makes a configured limit unlimited; {} brings it back."""
    server = serve(user_quotas={"alice": {"max_queued": 1}})
    alice, root = server.client("alice"), server.client("root")
    cordon_all(root)
    submit(alice)
    problem(alice.post("/v1/requests", json=chat_body()), 429)
    lifted = root.put("/v1/users/alice/quota", json={"max_queued": None})
    assert lifted.status_code == 200 and lifted.json()["limits"]["max_queued"] is None
    submit(alice)
    submit(alice)
    restored = root.put("/v1/users/alice/quota", json={})
    assert restored.json()["limits"]["max_queued"] == 1
    problem(alice.post("/v1/requests", json=chat_body()), 429)


@pytest.mark.parametrize(
    "body",
    [
        {"max_concurrent": 0},
        {"requests_per_minute": -1},
        {"max_priority": "urgent"},
        {"max_priority": "bad name!"},
        {"bogus": 1},
        {"user": "bob"},
        {"max_concurrent": "4"},
        {"max_concurrent": 2.5},
        {"max_concurrent": True},
        [],
    ],
    ids=[
        "zero",
        "negative",
        "unknown-class",
        "bad-class-name",
        "unknown-field",
        "user-field",
        "string",
        "float",
        "bool",
        "array",
    ],
)
def test_quota_override_rejects_a_bad_body(server: LiveServer, body: Any) -> None:
    """A bad override body is 422 and changes nothing."""
    root = server.client("root")
    problem(root.put("/v1/users/alice/quota", json=body), 422)
    limits = root.get("/v1/users").json()["items"][0]["quota"]
    assert limits["max_priority"] == "critical" and limits["max_concurrent"] is None


def test_quota_override_of_unknown_user_or_by_a_user(server: LiveServer) -> None:
    """PUT quota for an unknown user is 404; by a user (even for themselves) 403."""
    root, alice = server.client("root"), server.client("alice")
    problem(root.put("/v1/users/mallory/quota", json={"max_concurrent": 1}), 404)
    problem(alice.put("/v1/users/alice/quota", json={"max_priority": "critical"}), 403)
    problem(alice.put("/v1/users/bob/quota", json={"max_concurrent": 1}), 403)
    problem(server.client().put("/v1/users/bob/quota", json={}), 401)
    problem(root.get("/v1/users/alice/quota"), 405)


# Metrics and health ------------------------------------------------------------------------------


def test_json_metrics_summary(server: LiveServer) -> None:
    """GET /v1/metrics has counts, queue depth, percentiles, throughput and the fleet."""
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"duration_s": 0.01}))
    until_status(alice, created["id"], "succeeded")
    problem(alice.post("/v1/requests", json=chat_body("no-such-model")), 422)
    response = alice.get("/v1/metrics")
    assert response.status_code == 200
    metrics = response.json()
    assert set(metrics) >= {
        "requests",
        "rejected",
        "queue_depth",
        "queue_wait_s",
        "latency_s",
        "throughput_rps",
        "retries",
        "gpus",
    }
    assert metrics["requests"].get("succeeded") == 1
    assert metrics["rejected"].get("unknown_model") == 1
    assert set(metrics["queue_depth"]) == {"critical", "high", "normal", "low", "batch"}
    assert set(metrics["latency_s"]) == {"p50", "p90", "p99"}
    assert metrics["gpus"]["count"] == 2 and metrics["gpus"]["healthy"] == 2
    problem(server.client().get("/v1/metrics"), 401)


def test_a_user_sees_only_their_own_counts_in_the_metrics_summary(server: LiveServer) -> None:
    """Users get their own request, rejection and retry counts, the fleet's queue and GPUs."""
    alice, bob, root = server.client("alice"), server.client("bob"), server.client("root")
    done = submit(alice, chat_body(simulate={"duration_s": 0.01}))
    until_status(alice, done["id"], "succeeded")
    retried = submit(bob, chat_body(simulate={"failure": "error", "fail_attempts": 1}))
    until_status(bob, retried["id"], "succeeded")
    problem(bob.post("/v1/requests", json=chat_body("no-such-model")), 422)
    cordon_all(root)
    submit(bob)
    mine = alice.get("/v1/metrics").json()
    assert mine["requests"] == {"succeeded": 1}
    assert mine["scope"] == "user"
    assert mine["rejected"] == {} and mine["retries"] == {}
    assert mine["queue_depth"]["normal"] == 1, "the queue is the fleet's"
    assert mine["gpus"]["count"] == 2
    theirs = bob.get("/v1/metrics").json()
    assert theirs["scope"] == "user"
    assert theirs["requests"] == {"succeeded": 1, "queued": 1}
    assert theirs["rejected"] == {"unknown_model": 1}
    assert theirs["retries"] == {"backend_error": 1}
    everyone = root.get("/v1/metrics").json()
    assert everyone["scope"] == "fleet"
    assert everyone["requests"] == {"succeeded": 2, "queued": 1}
    assert everyone["rejected"] == {"unknown_model": 1}
    assert everyone["retries"] == {"backend_error": 1}
    assert everyone["queue_depth"] == mine["queue_depth"]


def test_prometheus_metrics_are_open_by_default(server: LiveServer) -> None:
    """GET /metrics without a key is Prometheus text with the router's metrics."""
    alice = server.client("alice")
    created = submit(alice, chat_body(simulate={"duration_s": 0.01}))
    until_status(alice, created["id"], "succeeded")
    response = server.client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert_common_headers(response)
    text = response.text
    for name in (
        "gpurouter_requests_total",
        "gpurouter_queue_depth",
        "gpurouter_gpu_healthy",
        "gpurouter_gpu_memory_reserved_bytes",
    ):
        assert f"# TYPE {name}" in text
    assert 'gpurouter_requests_total{model="llama-3-8b",priority="normal",status="succeeded"}' in (
        text
    )


def test_prometheus_metrics_can_require_a_key(serve: Serve) -> None:
    """With server.metrics_require_auth, /metrics is 401 without a valid key, 200 with one."""
    server = serve(server={"metrics_require_auth": True})
    body = problem(server.client().get("/metrics"), 401)
    assert body["type"] == "/problems/unauthenticated"
    problem(server.client().get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
    response = server.client("alice").get("/metrics")
    assert response.status_code == 200 and "gpurouter_requests_total" in response.text
    lower = {"Authorization": server.headers("bob")["Authorization"].replace("Bearer", "bearer")}
    assert server.client().get("/metrics", headers=lower).status_code == 200


def test_health_and_readiness(shared_server: LiveServer) -> None:
    """/healthz is 200 without a key; /readyz is 200 once the store answers and GPUs are known."""
    anon = shared_server.client()
    health = anon.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert_common_headers(health)
    ready = anon.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"store": "ok", "gpus": "2 known"}}


# Ownership (SPEC I5, OWASP API1 BOLA) ------------------------------------------------------------


def _without_ids(body: dict[str, Any], resource_id: str) -> dict[str, Any]:
    """A problem body without its HTTP request id and with the resource id blanked."""
    rest = {key: value for key, value in body.items() if key != "request_id"}
    return json.loads(json.dumps(rest).replace(resource_id, "<id>"))


def _headers_of(response: httpx.Response) -> dict[str, str]:
    return {
        name: value
        for name, value in response.headers.items()
        if name not in ("date", "x-request-id")
    }


@pytest.mark.parametrize(
    ("method", "suffix", "params"),
    [
        ("GET", "", {}),
        ("GET", "", {"wait": 5}),
        ("DELETE", "", {}),
        ("GET", "/events", {}),
    ],
    ids=["get", "get-wait", "delete", "events"],
)
def test_another_users_request_looks_like_a_missing_one(
    server: LiveServer, method: str, suffix: str, params: dict[str, Any]
) -> None:
    """Bob's request is 404 for alice, exactly as an id that names nothing (but the ids)."""
    alice, bob = server.client("alice"), server.client("bob")
    theirs = submit(bob, hang_body())["id"]
    fake = same_length_fake_id(theirs)
    started = time.monotonic()
    hidden = alice.request(method, f"/v1/requests/{theirs}{suffix}", params=params)
    assert time.monotonic() - started < 2.0  # no long-poll on someone else's request
    missing = alice.request(method, f"/v1/requests/{fake}{suffix}", params=params)
    hidden_body, missing_body = problem(hidden, 404), problem(missing, 404)
    assert _without_ids(hidden_body, theirs) == _without_ids(missing_body, fake)
    assert _headers_of(hidden) == _headers_of(missing)
    # Bob's request is untouched, and he (and the admin) still see it.
    assert status_of(bob, theirs) not in TERMINAL
    assert status_of(server.client("root"), theirs) not in TERMINAL


def test_lists_show_only_the_callers_requests(server: LiveServer) -> None:
    """Users list only their own requests (user= is ignored); admins see all and filter by user."""
    alice, bob, root = server.client("alice"), server.client("bob"), server.client("root")
    cordon_all(root)
    mine = {submit(alice)["id"] for _ in range(3)}
    theirs = {submit(bob)["id"] for _ in range(2)}
    admins = {submit(root)["id"]}
    assert set(list_ids(alice)) == mine
    assert set(list_ids(alice, user="bob")) == mine
    assert set(list_ids(bob)) == theirs
    assert set(list_ids(root)) == mine | theirs | admins
    assert set(list_ids(root, user="bob")) == theirs
    assert set(list_ids(root, user="nobody")) == set()
    for request_id in theirs:
        assert status_of(root, request_id) == "queued"
    assert root.delete(f"/v1/requests/{next(iter(theirs))}").status_code == 200


# Errors: authentication --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-key",
        "Bearer",
        "Basic YWxpY2U6c2VjcmV0",
        "Token alice-key-0123456789abcdef",
        "alice-key-0123456789abcdef",
    ],
    ids=["none", "wrong", "scheme-only", "basic", "token", "bare-key"],
)
def test_missing_wrong_or_malformed_keys_are_401(
    server: LiveServer, authorization: str | None
) -> None:
    """No key, a wrong key and a malformed header all get the same 401 with WWW-Authenticate."""
    headers = {} if authorization is None else {"Authorization": authorization}
    anon = server.client()
    for method, path in (("GET", "/v1/requests"), ("POST", "/v1/requests"), ("GET", "/v1/quota")):
        kwargs: dict[str, Any] = {"json": chat_body()} if method == "POST" else {}
        response = anon.request(method, path, headers=headers, **kwargs)
        body = problem(response, 401)
        assert body["type"] == "/problems/unauthenticated"
        assert response.headers["www-authenticate"] == "Bearer"
    assert list_ids(server.client("root")) == []


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key"], ids=["none", "wrong"])
def test_a_call_without_a_valid_key_is_401_whatever_its_body(
    server: LiveServer, authorization: str | None
) -> None:
    """Authentication comes first: a malformed body from a caller without a valid key is 401."""
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    response = server.client().post("/v1/requests", content=b"{bad", headers=headers)
    problem(response, 401)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(shared_server: LiveServer, scheme: str) -> None:
    """``bearer <key>`` in any case authenticates."""
    key = shared_server.headers("alice")["Authorization"].split(" ", 1)[1]
    response = shared_server.client().get("/v1/quota", headers={"Authorization": f"{scheme} {key}"})
    assert response.status_code == 200
    assert response.json()["user"] == "alice"


# Errors: routes, methods, bodies -----------------------------------------------------------------


def test_unknown_route_is_a_404_problem(shared_server: LiveServer) -> None:
    """An unknown path is 404 as problem details; under /v1/ the key is checked first."""
    problem(shared_server.client("alice").get("/v1/nothing-here"), 404)
    problem(shared_server.client().get("/v1/nothing-here"), 401)
    for client in (shared_server.client(), shared_server.client("alice")):
        problem(client.post("/v2/requests", json={}), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/requests"),
        ("PATCH", "/v1/requests/req_x"),
        ("DELETE", "/v1/gpus/sim:0"),
        ("GET", "/v1/estimate"),
        ("POST", "/healthz"),
        ("DELETE", "/v1/quota"),
    ],
)
def test_wrong_method_is_a_405_problem_with_allow(
    shared_server: LiveServer, method: str, path: str
) -> None:
    """A known path with a wrong method is a 405 problem with an Allow header."""
    response = shared_server.client("alice").request(method, path)
    problem(response, 405)
    allowed = {item.strip() for item in response.headers["allow"].split(",")}
    assert allowed and method not in allowed
    assert allowed <= {"GET", "POST", "PUT", "DELETE", "HEAD"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v1/requests", {"GET", "POST"}),
        ("PATCH", "/v1/requests/req_x", {"GET", "DELETE"}),
    ],
)
def test_405_allow_lists_every_method_of_the_path(
    shared_server: LiveServer, method: str, path: str, allow: set[str]
) -> None:
    """The Allow header of a 405 lists every method the path supports."""
    response = shared_server.client("alice").request(method, path)
    assert response.status_code == 405
    allowed = {item.strip() for item in response.headers["allow"].split(",")}
    assert allow <= allowed


def test_body_over_the_limit_sent_chunked_is_413(serve: Serve) -> None:
    """A chunked body over server.max_body_bytes is a 413 problem and creates nothing."""
    server = serve(server={"max_body_bytes": 4096})
    alice = server.client("alice")
    payload = json.dumps(chat_body(text="x" * 5000)).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 1000):
            yield payload[start : start + 1000]

    response = alice.post(
        "/v1/requests", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "transfer-encoding" in response.request.headers
    body = problem(response, 413)
    assert "max_body_bytes" in body["detail"] and "limit of 4096 bytes" in body["detail"]
    assert list_ids(alice) == []
    assert submit(alice)["status"] == "dispatching"


def test_body_over_the_limit_with_content_length_is_a_413_problem(serve: Serve) -> None:
    """A body over server.max_body_bytes with its Content-Length is a 413 problem."""
    server = serve(server={"max_body_bytes": 4096})
    alice = server.client("alice")
    response = alice.post("/v1/requests", json=chat_body(text="x" * 5000))
    assert response.status_code == 413
    assert "limit of 4096 bytes" in problem(response, 413)["detail"]


def test_body_over_the_limit_with_content_length_is_refused(serve: Serve) -> None:
    """A body over server.max_body_bytes with its Content-Length is 413 and creates nothing."""
    server = serve(server={"max_body_bytes": 4096})
    alice = server.client("alice")
    response = alice.post("/v1/requests", json=chat_body(text="x" * 5000))
    assert response.status_code == 413
    assert alice.post("/v1/estimate", json=chat_body(text="x" * 5000)).status_code == 413
    assert list_ids(alice) == []


def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes to the server and read its answer (until it closes or stays quiet)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        try:
            while b"\r\n\r\n" not in received or len(received) < 40:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            sock.settimeout(0.3)
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def test_a_lying_content_length_over_the_limit_is_413(serve: Serve) -> None:
    """A Content-Length over the limit with a short body is refused with 413 before reading."""
    server = serve(server={"max_body_bytes": 4096})
    key = server.headers("alice")["Authorization"]
    raw = (
        b"POST /v1/requests HTTP/1.1\r\nHost: test\r\n"
        + f"Authorization: {key}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        + json.dumps(chat_body()).encode()
    )
    answer = _raw_exchange(server.url, raw)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert list_ids(server.client("alice")) == []


def _long_metadata() -> dict[str, str]:
    return {f"label{i}": "v" for i in range(33)}


INVALID_BODIES: dict[str, Any] = {
    "unknown-model": chat_body("gpt-17"),
    "bad-model-name": chat_body("../etc/passwd"),
    "task-mismatch": chat_body(task="embedding"),
    "unknown-task": chat_body(task="painting"),
    "unschedulable-gpu-count": chat_body(resources={"gpu_count": 3}),
    "unschedulable-gpu-count-max": chat_body(resources={"gpu_count": 65}),
    "unschedulable-memory": chat_body(resources={"gpu_memory_mb": 200_000}),
    "memory-over-the-max": chat_body(resources={"gpu_memory_mb": 16 * 1024 * 1024 + 1}),
    "unschedulable-gpu-type": chat_body(resources={"gpu_type": "L4-24GB"}),
    "over-max-context": chat_body(shape={"batch_size": 1, "input_tokens": 9000}),
    "unknown-priority": chat_body(priority="urgent"),
    "bad-priority-name": chat_body(priority="very urgent!"),
    "string-for-int": chat_body(shape={"batch_size": "2"}),
    "float-for-int": chat_body(shape={"batch_size": 2.5}),
    "bool-for-int": chat_body(resources={"gpu_count": True}),
    "string-for-float": chat_body(timeout_s="10"),
    "bool-for-float": chat_body(timeout_s=True),
    "int-for-string": chat_body(priority=1),
    "string-for-object": {"model": "llama-3-8b", "input": "hello"},
    "null-model": {"model": None},
    "missing-model": {"input": {}},
    "extra-user": chat_body(user="bob"),
    "extra-status": chat_body(status="succeeded"),
    "extra-attempts": chat_body(attempts=0),
    "extra-id": chat_body(id="req_mine"),
    "extra-nested": chat_body(resources={"gpu_count": 1, "owner": "bob"}),
    "negative-timeout": chat_body(timeout_s=-1),
    "zero-timeout": chat_body(timeout_s=0),
    "huge-timeout": chat_body(timeout_s=1e9),
    "timeout-just-over-max": chat_body(timeout_s=86_400.5),
    "zero-batch": chat_body(shape={"batch_size": 0}),
    "negative-tokens": chat_body(shape={"input_tokens": -1}),
    "zero-max-tokens": chat_body(max_tokens=0),
    "zero-max-completion-tokens": {
        "model": "llama-3-8b",
        "input": {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
    },
    "string-max-tokens": chat_body(max_tokens="8"),
    "too-many-labels": chat_body(metadata=_long_metadata()),
    "label-value-too-long": chat_body(metadata={"k": "v" * 513}),
    "label-name-too-long": chat_body(metadata={"k" * 65: "v"}),
    "label-name-empty": chat_body(metadata={"": "v"}),
    "label-value-not-string": chat_body(metadata={"k": 1}),
    "array": [chat_body()],
    "string": "llama-3-8b",
    "number": 42,
}


# What the fleet could never hold is refused at submit; the dry run may instead show no fit.
UNSCHEDULABLE = {"unschedulable-gpu-count", "unschedulable-memory", "unschedulable-gpu-type"}


@pytest.mark.parametrize(("name", "body"), list(INVALID_BODIES.items()), ids=list(INVALID_BODIES))
def test_invalid_submissions_are_422_problems(
    shared_server: LiveServer, name: str, body: Any
) -> None:
    """Every kind of invalid body is a 422 problem naming a field; nothing is stored."""
    alice = shared_server.client("alice")
    details = problem(alice.post("/v1/requests", json=body), 422)
    assert details["errors"] and all(error["loc"] for error in details["errors"])
    response = alice.post("/v1/estimate", json=body)
    if name in UNSCHEDULABLE and response.status_code == 200:
        assert response.json()["fits_now"] == [], response.text
    else:
        problem(response, 422)
    assert list_ids(shared_server.client("root")) == []
    assert alice.get("/v1/quota").json()["usage"]["requests_last_minute"] == 0


def test_tokens_past_the_models_context_are_refused_with_their_own_reason(
    shared_server: LiveServer,
) -> None:
    """More tokens than the model's context is 422 ``context_length_exceeded`` on every route."""
    alice = shared_server.client("alice")
    for body in (
        chat_body(max_tokens=9000),
        chat_body(shape={"input_tokens": 8000, "output_tokens": 193}),
    ):
        details = problem(alice.post("/v1/requests", json=body), 422)
        assert details["reason"] == "context_length_exceeded", details
    chat = {
        "model": "llama-3-8b",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 9000,
    }
    answer = alice.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "context-length-exceeded"
    assert list_ids(shared_server.client("root")) == []


def test_a_number_with_no_fraction_is_an_integer(serve: Callable[..., LiveServer]) -> None:
    """``2.0`` where an integer is due is the integer 2 (JSON Schema's ``integer``), not a 422."""
    alice = serve().client("alice")
    body = chat_body(shape={"batch_size": 2.0, "input_tokens": 10.0, "output_tokens": 1.0})
    response = alice.post("/v1/requests", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["shape"] == {"batch_size": 2, "input_tokens": 10, "output_tokens": 1}


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"model": "llama-3-8b",', "application/json"),
        (b"{bad json}", "application/json"),
        (b"", "application/json"),
        (b'{"model": "llama-3-8b", "timeout_s": NaN}', "application/json"),
        (b'{"model": "llama-3-8b", "timeout_s": Infinity}', "application/json"),
        (b"null", "application/json"),
        (b'{"model": "llama-3-8b"}', "text/plain"),
    ],
    ids=["truncated", "garbage", "empty", "nan", "infinity", "null", "text-plain"],
)
def test_malformed_bodies_are_422_problems(
    shared_server: LiveServer, content: bytes, content_type: str
) -> None:
    """Text that is not a JSON object (malformed, empty, null, not JSON) is a 422 problem."""
    alice = shared_server.client("alice")
    response = alice.post("/v1/requests", content=content, headers={"Content-Type": content_type})
    problem(response, 422)
    assert list_ids(alice) == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
@pytest.mark.parametrize("path", ["/v1/requests", "/v1/estimate"])
def test_a_body_not_sent_as_json_is_told_to_be(
    shared_server: LiveServer, path: str, content_type: str | None
) -> None:
    """A JSON body under another content type (or none) is a 422 saying to send it as JSON.

    The same on the hot route and on a route FastAPI serves; nothing is queued.
    """
    alice = shared_server.client("alice")
    headers = {} if content_type is None else {"Content-Type": content_type}
    content = json.dumps(chat_body()).encode()
    body = problem(alice.post(path, content=content, headers=headers), 422)
    assert body["detail"] == "body: send the body as JSON (Content-Type: application/json)"
    assert body["errors"] == [
        {
            "loc": ["body"],
            "msg": "send the body as JSON (Content-Type: application/json)",
            "type": "content_type",
        }
    ]
    assert list_ids(alice) == []


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "llama-3-8b",',
        b"",
        b"null",
        b"[1, 2]",
        b'"text"',
        b'{"model": "llama-3-8b", "timeout_s": NaN}',
        b'{"model": "llama-3-8b", "priority": 3, "colour": "red"}',
        b'{"model": "llama-3-8b", "shape": {"batch_size": "one"}}',
        b'{"model": "llama-3-8b", "input": {"x": "\\ud800"}}',
        b'{"model": "llama-3-8b", "input": {"x": [1, -Infinity]}}',
        b'{"model": "llama-3-8b", "input": {"x": 1e400}}',
        b'{"model": "llama-3-8b", "input": {"n": ' + b"7" * 5000 + b"}}",
        b'{"model": "llama-3-8b", "input": {"x": ' + b"[" * 900 + b"]" * 900 + b"}}",
        b'{"model": "llama-3-8b", "input": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        b'{"model": "llama-3-8b", "input": {"max_tokens": 0}}',
    ],
    ids=[
        "truncated",
        "empty",
        "null",
        "array",
        "string",
        "nan",
        "fields",
        "nested",
        "lone-surrogate",
        "minus-infinity",
        "beyond-a-double",
        "5000-digits",
        "900-deep",
        "5000-deep",
        "zero-max-tokens",
    ],
)
@pytest.mark.parametrize("content_type", ["application/json", "text/plain", None])
def test_submit_refuses_a_body_exactly_as_the_framework_does(
    shared_server: LiveServer, content: bytes, content_type: str | None
) -> None:
    """Submit refuses a body with the same problem as the framework, error for error.

    ``POST /v1/requests`` reads its body itself; ``POST /v1/estimate`` takes the same body
    through FastAPI.
    """
    alice = shared_server.client("alice")
    headers = {} if content_type is None else {"Content-Type": content_type}
    submitted = alice.post("/v1/requests", content=content, headers=headers)
    estimated = alice.post("/v1/estimate", content=content, headers=headers)
    assert submitted.status_code == estimated.status_code
    mine, theirs = problem(submitted, 422), problem(estimated, 422)
    assert (mine["detail"], mine["errors"]) == (theirs["detail"], theirs["errors"])
    assert list_ids(alice) == []


def test_header_and_body_errors_are_reported_together_after_malformed_json(
    server: LiveServer,
) -> None:
    """As FastAPI reports them: a body that is not JSON first and alone.

    Otherwise the header's errors come first, then the body's.
    """
    alice = server.client("alice")
    empty_key = {"Idempotency-Key": "", "Content-Type": "application/json"}
    both = problem(alice.post("/v1/requests", content=b'{"mode": 1}', headers=empty_key), 422)
    assert [error["loc"][0] for error in both["errors"]] == ["header", "body", "body"]
    assert both["detail"].endswith("(and 2 more)")
    broken = problem(alice.post("/v1/requests", content=b"{", headers=empty_key), 422)
    assert [error["type"] for error in broken["errors"]] == ["json_invalid"]


@pytest.mark.parametrize(
    "content",
    [b"\x80\x81{", b'{"model": "\xff"}', b'{"model": "llama-3-8b", "input": "\xc3("}'],
    ids=["not-utf8", "bad-byte-in-a-string", "truncated-sequence"],
)
@pytest.mark.parametrize("path", ["/v1/requests", "/v1/estimate"])
def test_a_body_that_is_not_text_is_400(server: LiveServer, content: bytes, path: str) -> None:
    """Bytes that are not text (not UTF-8, nor UTF-16 or UTF-32) are a 400 problem."""
    alice = server.client("alice")
    response = alice.post(path, content=content, headers={"Content-Type": "application/json"})
    assert problem(response, 400)["type"] == "/problems/bad-request"
    assert list_ids(alice) == []


def test_a_body_in_utf16_is_read_as_text(server: LiveServer) -> None:
    """JSON in UTF-16 (with its byte order mark) is text: read as such, not refused as bytes."""
    alice = server.client("alice")
    headers = {"Content-Type": "application/json"}
    broken = alice.post("/v1/requests", content="{".encode("utf-16"), headers=headers)
    assert [error["type"] for error in problem(broken, 422)["errors"]] == ["json_invalid"]
    assert list_ids(alice) == []
    body = json.dumps(chat_body()).encode("utf-16")
    accepted_id = accepted(alice.post("/v1/requests", content=body, headers=headers))["id"]
    assert list_ids(alice) == [accepted_id]


def test_estimate_of_more_gpus_than_any_worker_fits_nowhere(server: LiveServer) -> None:
    """A dry run needing 3 GPUs on one worker of 2 is estimated (200) with no GPU in fits_now.

    Submitting it is 422 unschedulable; the dry run still tells what it would need.
    """
    response = server.client("alice").post(
        "/v1/estimate", json=chat_body(resources={"gpu_count": 3})
    )
    assert response.status_code == 200, response.text
    assert response.json()["gpu_count"] == 3
    assert response.json()["fits_now"] == []


def test_estimate_of_two_gpus_fits_the_pair(server: LiveServer) -> None:
    """A dry run needing 2 GPUs on the 2-GPU worker fits both; with one cordoned, none."""
    alice = server.client("alice")
    body = chat_body(resources={"gpu_count": 2})
    assert sorted(alice.post("/v1/estimate", json=body).json()["fits_now"]) == list(GPUS)
    server.client("root").post("/v1/gpus/sim:1/cordon")
    assert alice.post("/v1/estimate", json=body).json()["fits_now"] == []


def test_unschedulable_requests_give_their_reason(server: LiveServer) -> None:
    """A request no worker could ever hold is 422 with reason unschedulable, not queued."""
    alice = server.client("alice")
    response = alice.post("/v1/requests", json=chat_body(resources={"gpu_count": 3}))
    body = problem(response, 422)
    assert body["reason"] == "unschedulable" and body["type"] == "/problems/unschedulable"
    fits_later = submit(alice, chat_body(resources={"gpu_count": 2}))
    assert fits_later["status"] == "dispatching"


# Errors: quotas ----------------------------------------------------------------------------------


def test_requests_per_minute_429_with_a_correct_retry_after(serve: Serve) -> None:
    """The fourth request in a minute (limit 3) is 429; Retry-After is when the oldest leaves."""
    server = serve(user_quotas={"alice": {"requests_per_minute": 3}})
    alice, bob = server.client("alice"), server.client("bob")
    sent_first = time.time()
    submit(alice)
    got_first = time.time()
    time.sleep(1.5)
    submit(alice)
    submit(alice)
    sent_last = time.time()
    response = alice.post("/v1/requests", json=chat_body())
    got_last = time.time()
    body = problem(response, 429)
    assert body["reason"] == "quota_requests_per_minute"
    retry_after = int(response.headers["retry-after"])
    # The oldest admission happened between sent_first and got_first, the refusal between
    # sent_last and got_last: the exact wait lies between these bounds.
    low = math.ceil(sent_first + 60 - got_last)
    high = math.ceil(got_first + 60 - sent_last)
    assert low <= retry_after <= high
    assert retry_after <= 59  # counted from the oldest admission, not the newest
    assert abs(body["retry_after_s"] - (got_first + 60 - sent_last)) < 1.0
    assert retry_after == max(1, math.ceil(body["retry_after_s"] - 0.0005)) or retry_after == (
        math.ceil(body["retry_after_s"] + 0.0005)
    )
    # Refused requests are not counted; other users are not limited.
    assert alice.get("/v1/quota").json()["usage"]["requests_last_minute"] == 3
    problem(alice.post("/v1/requests", json=chat_body()), 429)
    assert alice.get("/v1/quota").json()["usage"]["requests_last_minute"] == 3
    submit(bob)
    assert len(list_ids(alice)) == 3


def test_max_queued_429_with_retry_after(serve: Serve) -> None:
    """With max_queued 2 and nothing able to run, the third waiting request is 429."""
    server = serve(user_quotas={"alice": {"max_queued": 2}})
    alice = server.client("alice")
    cordon_all(server.client("root"))
    first = submit(alice)
    submit(alice)
    response = alice.post("/v1/requests", json=chat_body())
    body = problem(response, 429)
    assert body["reason"] == "quota_max_queued"
    assert int(response.headers["retry-after"]) >= 1
    assert body["retry_after_s"] > 0
    assert alice.delete(f"/v1/requests/{first['id']}").status_code == 200
    submit(alice)
    submit(server.client("bob"))


def test_the_routers_queue_bound_is_503_with_retry_after_until_a_place_frees(
    serve: Serve,
) -> None:
    """With max_queued_total waiting, any user's next submission is 503 and stores nothing."""
    server = serve(quotas={"max_queued_total": 2})
    alice, bob, root = server.client("alice"), server.client("bob"), server.client("root")
    cordon_all(root)
    first = submit(alice)
    submit(alice)
    key = {"Idempotency-Key": "when-full"}
    response = bob.post("/v1/requests", json=chat_body(), headers=key)
    body = problem(response, 503)
    assert body["reason"] == "queue_full" and body["type"] == "/problems/queue-full"
    assert int(response.headers["retry-after"]) >= 1 and body["retry_after_s"] > 0
    assert len(list_ids(root)) == 2 and list_ids(bob) == []
    assert bob.get("/v1/quota").json()["usage"]["requests_last_minute"] == 0
    problem(root.post("/v1/requests", json=chat_body()), 503)  # admins too: it is memory
    prometheus = server.client().get("/metrics").text
    assert 'gpurouter_requests_rejected_total{reason="queue_full"} 2.0' in prometheus
    assert alice.delete(f"/v1/requests/{first['id']}").status_code == 200
    again = bob.post("/v1/requests", json=chat_body(), headers=key)
    assert accepted(again)["status"] == "queued" and len(list_ids(root)) == 3


def test_priority_above_max_priority_is_403(serve: Serve) -> None:
    """A class above the user's max_priority is 403; allowed classes are accepted."""
    server = serve(user_quotas={"alice": {"max_priority": "normal"}})
    alice = server.client("alice")
    for priority in ("critical", "high"):
        body = problem(alice.post("/v1/requests", json=chat_body(priority=priority)), 403)
        assert body["reason"] == "quota_max_priority"
    for priority in ("normal", "low", "batch"):
        assert submit(alice, chat_body(priority=priority))["priority"] == priority
    assert submit(alice)["priority"] == "normal"
    assert submit(server.client("bob"), chat_body(priority="critical"))["priority"] == "critical"


def test_an_admin_may_use_every_priority_class_unless_their_quota_says_otherwise(
    serve: Serve,
) -> None:
    """The default max_priority binds users, not admins; a max_priority set for the admin does."""
    server = serve(quota={"max_priority": "high"})
    alice, root = server.client("alice"), server.client("root")
    assert submit(root, chat_body(priority="critical"))["priority"] == "critical"
    problem(alice.post("/v1/requests", json=chat_body(priority="critical")), 403)
    assert root.get("/v1/quota").json()["limits"]["max_priority"] == "critical"
    users = {user["name"]: user for user in root.get("/v1/users").json()["items"]}
    assert users["root"]["quota"]["max_priority"] == "critical"
    assert users["alice"]["quota"]["max_priority"] == "high"
    limited = root.put("/v1/users/root/quota", json={"max_priority": "normal"})
    assert limited.status_code == 200 and limited.json()["limits"]["max_priority"] == "normal"
    body = problem(root.post("/v1/requests", json=chat_body(priority="high")), 403)
    assert body["reason"] == "quota_max_priority"
    cleared = root.put("/v1/users/root/quota", json={})
    assert cleared.json()["limits"]["max_priority"] == "critical"


def test_an_admins_max_priority_in_the_configuration_applies(serve: Serve) -> None:
    """quotas.users.<admin>.max_priority in the configuration binds that admin."""
    server = serve(quota={"max_priority": "high"}, user_quotas={"root": {"max_priority": "low"}})
    root = server.client("root")
    problem(root.post("/v1/requests", json=chat_body(priority="normal")), 403)
    assert submit(root, chat_body(priority="low"))["priority"] == "low"
    assert root.get("/v1/quota").json()["limits"]["max_priority"] == "low"


def test_memory_above_max_gpu_memory_is_422(serve: Serve) -> None:
    """A request needing more memory per GPU than max_gpu_memory_mb is 422."""
    server = serve(user_quotas={"alice": {"max_gpu_memory_mb": 20_000}})
    alice = server.client("alice")
    body = problem(
        alice.post("/v1/requests", json=chat_body(resources={"gpu_memory_mb": 30_000})), 422
    )
    assert body["reason"] == "quota_max_gpu_memory_mb"
    assert submit(alice, chat_body(resources={"gpu_memory_mb": 19_000}))
    assert submit(server.client("bob"), chat_body(resources={"gpu_memory_mb": 30_000}))


# Request ids and security headers ----------------------------------------------------------------


def test_a_valid_incoming_request_id_is_echoed(server: LiveServer) -> None:
    """A well-formed X-Request-ID comes back, in the header and in problem bodies."""
    alice = server.client("alice")
    ok = alice.get("/v1/quota", headers={"X-Request-ID": "trace-123.abc_DEF"})
    assert ok.headers["x-request-id"] == "trace-123.abc_DEF"
    failed = alice.get("/v1/requests/req_none", headers={"X-Request-ID": "trace-404"})
    assert problem(failed, 404)["request_id"] == "trace-404"
    accepted_ = alice.post("/v1/requests", json=chat_body(), headers={"X-Request-ID": "sub-1"})
    assert accepted_.status_code == 202 and accepted_.headers["x-request-id"] == "sub-1"


@pytest.mark.parametrize(
    "given",
    [b"has space", b"x" * 65, b"semi;colon", "caf\u00e9".encode(), b"a/b", b""],
    ids=["space", "too-long", "semicolon", "non-ascii", "slash", "empty"],
)
def test_an_invalid_incoming_request_id_is_replaced(
    shared_server: LiveServer, given: bytes
) -> None:
    """A malformed X-Request-ID is not echoed: the router makes its own."""
    response = shared_server.client("alice").get("/v1/quota", headers={"X-Request-ID": given})
    assert response.status_code == 200
    own = response.headers["x-request-id"]
    assert own and own.encode() != given and len(own) <= 64


def test_request_ids_are_unique_per_answer(shared_server: LiveServer) -> None:
    """Without an incoming id, each answer gets a new one."""
    alice = shared_server.client("alice")
    ids = {alice.get("/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_every_answer_carries_the_security_headers(serve: Serve) -> None:
    """Successes, problems and streams all carry X-Request-ID, nosniff and no-store."""
    server = serve(
        server={"max_body_bytes": 4096}, user_quotas={"alice": {"requests_per_minute": 1}}
    )
    alice, anon, root = server.client("alice"), server.client(), server.client("root")
    created = submit(alice, chat_body(simulate={"duration_s": 0.01}))
    until_status(alice, created["id"], "succeeded")
    responses = [
        anon.get("/healthz"),
        anon.get("/readyz"),
        anon.get("/metrics"),
        anon.get("/openapi.json"),
        alice.get("/v1/quota"),
        alice.get("/v1/metrics"),
        alice.get("/v1/gpus"),
        alice.get("/v1/gpus/sim:0"),
        alice.get("/v1/requests"),
        alice.get(f"/v1/requests/{created['id']}"),
        alice.post("/v1/estimate", json=chat_body()),
        root.get("/v1/users"),
        root.put("/v1/users/bob/quota", json={}),
        root.post("/v1/gpus/sim:1/cordon"),
        alice.post("/v1/requests", json=chat_body()),  # 429
        alice.delete(f"/v1/requests/{created['id']}"),  # 409
        alice.get("/v1/users"),  # 403
        anon.get("/v1/quota"),  # 401
        alice.get("/nowhere"),  # 404
        alice.put("/v1/requests"),  # 405
        alice.post("/v1/estimate", json={"model": 1}),  # 422
        alice.post(
            "/v1/estimate",
            content=iter([b"x" * 5000]),
            headers={"Content-Type": "application/json"},
        ),  # 413 (chunked)
    ]
    statuses = sorted({response.status_code for response in responses})
    assert statuses == [200, 401, 403, 404, 405, 409, 413, 422, 429]
    for response in responses:
        assert_common_headers(response)
    read_events(alice, created["id"])


def test_queue_positions_follow_dispatch_order(server: LiveServer) -> None:
    """While nothing can run, queued requests report positions 0, 1, 2 ... in dispatch order."""
    alice, bob, root = server.client("alice"), server.client("bob"), server.client("root")
    cordon_all(root)
    low = submit(alice, chat_body(priority="low"))
    normal = [submit(alice) for _ in range(2)]
    other = submit(bob)
    assert low["queue_position"] == 0, "alone in the queue when it was submitted"
    expected = [normal[0]["id"], other["id"], normal[1]["id"], low["id"]]  # bob takes his turn
    listed = root.get("/v1/requests", params={"status": "queued"}).json()["items"]
    positions = {item["id"]: item["queue_position"] for item in listed}
    assert [positions[request_id] for request_id in expected] == [0, 1, 2, 3]
    single = alice.get(f"/v1/requests/{low['id']}").json()
    assert single["queue_position"] == 3

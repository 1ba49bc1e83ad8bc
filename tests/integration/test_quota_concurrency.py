"""Quotas under concurrency: many clients at once against a real server over loopback.

SPEC I4 (quotas held) with ``max_concurrent`` and ``requests_per_minute`` exact on one replica:
fifty clients submitting at the same moment get exactly the allowed number of admissions, the
rest a 429 with a usable Retry-After; ``max_queued`` caps the waiting requests exactly; and
``max_concurrent`` bounds the user's dispatching or running requests at every moment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import LiveServer

Serve = Callable[..., "LiveServer"]

CLIENTS = 50
ACTIVE = ("dispatching", "running")


def chat_body(index: int, **simulate: Any) -> dict[str, Any]:
    """A small chat submission (distinct text per index) with ``input.simulate`` overrides."""
    body_input: dict[str, Any] = {
        "messages": [{"role": "user", "content": f"hello {index}"}],
        "max_tokens": 4,
    }
    if simulate:
        body_input["simulate"] = simulate
    return {"model": "llama-3-8b", "input": body_input}


async def submit_all(
    server: LiveServer, user: str, bodies: list[dict[str, Any]]
) -> list[httpx.Response]:
    """Submit each body from its own client, all at the same moment (connections warmed first)."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(server.async_client(user)) for _ in range(len(bodies))
        ]
        warm = await asyncio.gather(*(client.get("/healthz") for client in clients))
        assert {response.status_code for response in warm} == {200}
        start = asyncio.Event()

        async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
            await start.wait()
            return await client.post("/v1/requests", json=body)

        tasks = [
            asyncio.create_task(one(client, body))
            for client, body in zip(clients, bodies, strict=True)
        ]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)


def split(responses: list[httpx.Response]) -> tuple[list[dict[str, Any]], list[httpx.Response]]:
    """The accepted requests (202) and the refusals (429); nothing else may occur."""
    statuses = {response.status_code for response in responses}
    assert statuses <= {202, 429}, [r.text for r in responses if r.status_code not in (202, 429)]
    accepted = [response.json() for response in responses if response.status_code == 202]
    refused = [response for response in responses if response.status_code == 429]
    return accepted, refused


def check_refusal(response: httpx.Response, reason: str) -> int:
    """A 429 problem for ``reason`` with a Retry-After of whole seconds; return it."""
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == 429 and body["reason"] == reason
    assert body["request_id"] == response.headers["x-request-id"]
    retry_after = int(response.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


async def list_all(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    """Every request the client may see matching ``params`` (one page of up to 500)."""
    response = await client.get("/v1/requests", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    assert response.json()["next_cursor"] is None
    return items


async def test_requests_per_minute_admits_exactly_the_limit(serve: Serve) -> None:
    """50 concurrent submissions with requests_per_minute 20 admit exactly 20; 30 get 429."""
    server = serve(user_quotas={"alice": {"requests_per_minute": 20}})
    responses = await submit_all(
        server, "alice", [chat_body(i, duration_s=0.01) for i in range(CLIENTS)]
    )
    accepted, refused = split(responses)
    assert len(accepted) == 20 and len(refused) == 30
    assert len({request["id"] for request in accepted}) == 20
    for response in refused:
        assert 1 <= check_refusal(response, "quota_requests_per_minute") <= 60
    async with server.async_client("alice") as alice, server.async_client("bob") as bob:
        assert len(await list_all(alice)) == 20
        usage = (await alice.get("/v1/quota")).json()["usage"]
        assert usage["requests_last_minute"] == 20
        refused_again = await alice.post("/v1/requests", json=chat_body(99))
        check_refusal(refused_again, "quota_requests_per_minute")
        assert (await bob.post("/v1/requests", json=chat_body(100))).status_code == 202
        for request in accepted:
            done = await alice.get(f"/v1/requests/{request['id']}", params={"wait": 10})
            assert done.json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("fleet", "running"),
    [
        ({"gpus": [("H100-80GB", 2)]}, 0),
        ({"gpus": [("H100-80GB", 1)], "slots": 1}, 1),
    ],
    ids=["cordoned-fleet", "one-slot-hanging"],
)
async def test_max_queued_caps_waiting_requests_exactly(
    serve: Serve, fleet: dict[str, Any], running: int
) -> None:
    """50 concurrent submissions with max_queued 5 leave exactly 5 queued; the rest get 429."""
    server = serve(user_quotas={"alice": {"max_queued": 5}}, **fleet)
    assert server.settings.quotas.for_user("alice").requests_per_minute is not None
    async with server.async_client("root") as root:
        if running == 0:
            for gpu in (await root.get("/v1/gpus")).json()["items"]:
                assert (await root.post(f"/v1/gpus/{gpu['id']}/cordon")).status_code == 200
        responses = await submit_all(
            server, "alice", [chat_body(i, failure="hang") for i in range(CLIENTS)]
        )
        accepted, refused = split(responses)
        assert len(accepted) == 5 + running
        assert len(refused) == CLIENTS - 5 - running
        for response in refused:
            check_refusal(response, "quota_max_queued")
        async with server.async_client("alice") as alice:
            queued = await list_all(alice, status="queued")
            active = await list_all(alice, status=list(ACTIVE))
            assert len(queued) == 5 and len(active) == running
            usage = (await alice.get("/v1/quota")).json()["usage"]
            assert usage["queued"] == 5 and usage["concurrent"] == running
            assert usage["requests_last_minute"] == 5 + running
            # A place freed in the queue is a place for one more, and only one.
            cancelled = await alice.delete(f"/v1/requests/{queued[0]['id']}")
            assert cancelled.status_code == 200
            again = await submit_all(server, "alice", [chat_body(100 + i) for i in range(5)])
            more, still_refused = split(again)
            assert len(more) == 1 and len(still_refused) == 4
            for request in await list_all(root):
                await root.delete(f"/v1/requests/{request['id']}")


async def test_concurrent_submissions_with_one_idempotency_key_create_one_request(
    serve: Serve,
) -> None:
    """50 clients sending the same key and body at once all get one request, created once."""
    server = serve()
    body = chat_body(0, failure="hang")
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                server.async_client("alice", headers={"Idempotency-Key": "same-for-all"})
            )
            for _ in range(CLIENTS)
        ]
        responses = await asyncio.gather(
            *(client.post("/v1/requests", json=body) for client in clients)
        )
        accepted, refused = split(responses)
        assert not refused
        assert len({request["id"] for request in accepted}) == 1
        replayed = [r for r in responses if r.headers.get("idempotency-replayed") == "true"]
        assert len(replayed) == CLIENTS - 1
        alice = clients[0]
        assert len(await list_all(alice)) == 1
        assert (await alice.get("/v1/quota")).json()["usage"]["requests_last_minute"] == 1
        await alice.delete(f"/v1/requests/{accepted[0]['id']}")


def _moment(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def most_at_once(requests: list[dict[str, Any]]) -> int:
    """The most requests that were dispatching or running at the same moment (server times)."""
    edges: list[tuple[datetime, int]] = []
    for request in requests:
        edges.append((_moment(request["dispatched_at"]), 1))
        edges.append((_moment(request["finished_at"]), -1))
    edges.sort(key=lambda edge: (edge[0], edge[1]))  # an end before a start at the same moment
    current = peak = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


async def test_max_concurrent_bounds_active_requests_at_every_moment(serve: Serve) -> None:
    """With max_concurrent 2, 20 requests run through and never more than 2 are active."""
    server = serve(user_quotas={"alice": {"max_concurrent": 2}})
    sampled: list[int] = []
    reported: list[int] = []
    done = asyncio.Event()

    async def sample(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            sampled.append(len(await list_all(client, status=list(ACTIVE))))
            usage = (await client.get("/v1/quota")).json()["usage"]
            reported.append(usage["concurrent"])
            await asyncio.sleep(0.005)

    async with server.async_client("alice") as alice, server.async_client("bob") as bob:
        sampler = asyncio.create_task(sample(alice))
        responses = await submit_all(
            server, "alice", [chat_body(i, duration_s=0.15) for i in range(20)]
        )
        accepted, refused = split(responses)
        assert len(accepted) == 20 and not refused
        theirs = [
            (await bob.post("/v1/requests", json=chat_body(100 + i, duration_s=1.0))).json()
            for i in range(4)
        ]
        finished = [
            (await alice.get(f"/v1/requests/{request['id']}", params={"wait": 30})).json()
            for request in accepted
        ]
        done.set()
        await sampler
        bob_finished = [
            (await bob.get(f"/v1/requests/{request['id']}", params={"wait": 30})).json()
            for request in theirs
        ]
    assert {request["status"] for request in finished} == {"succeeded"}
    assert len(sampled) >= 10
    assert max(sampled) <= 2 and max(reported) <= 2
    assert max(sampled) == 2  # the limit is used, not just respected
    assert most_at_once(finished) == 2
    # Queue waits show the limit at work: most of alice's requests had to wait their turn.
    assert sum(request["queue_wait_s"] > 0.1 for request in finished) >= 10
    # Another user is not held by alice's limit.
    assert {request["status"] for request in bob_finished} == {"succeeded"}
    assert most_at_once(bob_finished) == 4

"""GET /v1/requests/{id}/explain over real HTTP: placements, waits and ownership."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from conftest import LiveServer

GPUS = ("sim:0", "sim:1")
EXPLAIN_KEYS = {
    "id",
    "status",
    "summary",
    "placement",
    "reason",
    "policy",
    "candidates",
    "waiting",
}


def _body(memory_mb: int | None = None, *, hang: bool = False) -> dict[str, Any]:
    """A chat submission; ``memory_mb`` asks for that much per GPU; ``hang`` never ends."""
    body: dict[str, Any] = {
        "model": "llama-3-8b",
        "input": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    }
    if hang:
        body["input"]["simulate"] = {"failure": "hang"}
    if memory_mb is not None:
        body["resources"] = {"gpu_memory_mb": memory_mb}
    return body


def _submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/v1/requests", json=body)
    assert response.status_code == 202, response.text
    request_id: str = response.json()["id"]
    return request_id


def _until(predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _explain(client: httpx.Client, request_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/requests/{request_id}/explain")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) >= EXPLAIN_KEYS
    return body


def test_a_running_request_is_explained_with_the_candidates_and_the_chosen_gpu(
    server: LiveServer,
) -> None:
    """A placed request: its GPU, the reason, the policy and the chosen candidate = its GPU."""
    alice = server.client("alice")
    request_id = _submit(alice, _body(hang=True))
    running = _until(
        lambda: (r := alice.get(f"/v1/requests/{request_id}").json())["status"] == "running" and r
    )
    explained = _explain(alice, request_id)
    gpu_id = running["placement"]["gpu_id"]
    assert explained["status"] == "running"
    assert explained["placement"] == {"worker": "sim", "gpu_id": gpu_id}
    assert explained["reason"] == running["placement"]["reason"]
    assert explained["policy"] == "balanced"
    assert explained["waiting"] is None
    chosen = [c for c in explained["candidates"] if c["chosen"]]
    assert [c["gpu_id"] for c in chosen] == [gpu_id]
    assert explained["candidates"][0]["chosen"]
    first = explained["candidates"][0]
    assert first["type"] == "H100-80GB" and first["worker"] == "sim" and first["score"]
    assert gpu_id in explained["summary"]


def test_a_request_on_a_cordoned_fleet_waits_for_no_gpu_with_its_position(
    server: LiveServer,
) -> None:
    """Every GPU cordoned: blocked_by no_gpu, position behind the first, no ETA."""
    alice, root = server.client("alice"), server.client("root")
    for gpu in GPUS:
        assert root.post(f"/v1/gpus/{gpu}/cordon").status_code == 200
    _submit(alice, _body())
    second = _submit(alice, _body())
    explained = _explain(alice, second)
    assert explained["status"] == "queued" and explained["placement"] is None
    waiting = explained["waiting"]
    assert waiting["blocked_by"] == "no_gpu"
    assert waiting["queue_position"] == 1
    assert waiting["eta_s"] is None
    assert "2 cordoned" in waiting["detail"]
    assert explained["candidates"] == []


def test_a_request_that_does_not_fit_beside_running_work_waits_for_memory(
    server: LiveServer,
) -> None:
    """Both GPUs mostly taken: blocked_by memory at position 0, with an ETA."""
    alice, bob = server.client("alice"), server.client("bob")
    for _ in GPUS:
        _submit(alice, _body(60_000, hang=True))
    waiting_id = _submit(bob, _body(60_000))
    explained = _explain(bob, waiting_id)
    waiting = explained["waiting"]
    assert waiting["blocked_by"] == "memory"
    assert waiting["queue_position"] == 0
    assert waiting["eta_s"] is not None and waiting["eta_s"] >= 0
    assert "waits" in explained["summary"]


def test_a_request_over_its_users_concurrency_waits_for_quota(serve: Any) -> None:
    """A user at max_concurrent: blocked_by quota, though the fleet has room."""
    server: LiveServer = serve(user_quotas={"alice": {"max_concurrent": 1}})
    alice = server.client("alice")
    _submit(alice, _body(hang=True))
    second = _submit(alice, _body())
    waiting = _explain(alice, second)["waiting"]
    assert waiting["blocked_by"] == "quota"
    assert "max_concurrent" in waiting["detail"]


def test_another_users_request_is_not_found_and_an_admin_sees_it(server: LiveServer) -> None:
    """Explain follows GET /v1/requests/{id}: another user's id is 404; an admin's is 200."""
    alice, bob, root = server.client("alice"), server.client("bob"), server.client("root")
    request_id = _submit(alice, _body())
    response = bob.get(f"/v1/requests/{request_id}/explain")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    assert _explain(root, request_id)["id"] == request_id
    assert server.client().get(f"/v1/requests/{request_id}/explain").status_code == 401

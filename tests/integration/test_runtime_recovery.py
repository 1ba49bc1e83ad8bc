"""A restarted runtime asks its workers about the executions in flight before it retries any."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gpu_request_router import runtime as runtime_module
from gpu_request_router.config.config_loader import Settings, load_settings
from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.models.request import RequestStatus
from gpu_request_router.runtime import Runtime
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.testing import chat, make_settings
from gpu_request_router.worker.app import create_worker_app

ALICE = Caller("alice")
TOKEN = "recovery-worker-token-0123456789"
WORKER_AUTH = {"Authorization": f"Bearer {TOKEN}"}


def router_settings(url: str) -> Settings:
    """A router whose only backend is the ``gpurouter worker`` ``w1`` at ``url``."""
    return make_settings(
        auth={"enabled": False, "worker_token": TOKEN},
        backends=[{"name": "w1", "kind": "agent", "url": url}],
        monitor={"poll_interval_s": 0.05, "stale_after_s": 2},
        retries={"backoff_s": 0.02, "max_backoff_s": 0.1},
    )


def worker_app() -> FastAPI:
    """A worker named w1 with one simulated H100."""
    settings = load_settings(
        overrides={
            "auth": {"worker_token": TOKEN},
            "worker": {"name": "w1", "simulate": "1xH100-80GB"},
        }
    )
    return create_worker_app(settings)


async def worker_state(url: str, execution_id: str) -> tuple[int, Any]:
    """The worker's status code and answer for ``GET /v1/executions/{execution_id}``."""
    async with httpx.AsyncClient(headers=WORKER_AUTH, timeout=5) as client:
        response = await client.get(f"{url}/v1/executions/{execution_id}")
    return response.status_code, response.json()


async def until_running_on_worker(url: str, execution_id: str) -> None:
    """Wait (bounded) until the worker runs ``execution_id``."""
    for _ in range(200):
        status, body = await worker_state(url, execution_id)
        if status == 200 and body["state"] == "running":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{execution_id} did not start on the worker")


async def test_an_execution_still_running_on_its_worker_is_reattached(
    serve_app: Callable[[FastAPI], str],
) -> None:
    """The new runtime keeps attempt 1 running, reserves its memory, and takes its result."""
    url = serve_app(worker_app())
    settings = router_settings(url)
    store = MemoryStore()
    async with Runtime.from_settings(settings, store=store) as first:
        submitted = await first.submit(chat(duration_s=1.0, output={"answer": 42}), ALICE)
        await until_running_on_worker(url, f"exe_{submitted.id}_1")
    async with Runtime.from_settings(settings, store=store) as second:
        recovered = second.get(submitted.id)
        assert recovered.status is RequestStatus.RUNNING and recovered.attempts == 1
        assert second.router.execution_of(submitted.id) == f"exe_{submitted.id}_1"
        assert second.router.monitor.gpus["w1:0"].reserved_mb == recovered.estimate.gpu_memory_mb
        done = await second.wait(submitted.id, timeout_s=10)
        assert second.router.monitor.gpus["w1:0"].reserved_mb == 0
    assert done.status is RequestStatus.SUCCEEDED and done.attempts == 1
    assert done.result == {"answer": 42}
    assert (await worker_state(url, f"exe_{submitted.id}_2"))[0] == 404


@pytest.mark.parametrize("ends", ["after the restart", "before the restart"])
async def test_an_unsendable_answer_taken_at_recovery_fails_the_request(
    serve_app: Callable[[FastAPI], str], ends: str
) -> None:
    """A re-attached or collected answer is checked like any: 100 levels deep is backend_error."""
    url = serve_app(worker_app())
    settings = router_settings(url)
    store = MemoryStore()
    duration = 1.0 if ends == "after the restart" else 0.2
    deep: dict[str, Any] = {}
    for _ in range(100):
        deep = {"a": deep}
    async with Runtime.from_settings(settings, store=store) as first:
        # Straight into the runtime: the HTTP API would refuse such an input at the door.
        submitted = await first.submit(chat(duration_s=duration, output=deep), ALICE)
        await until_running_on_worker(url, f"exe_{submitted.id}_1")
    if ends == "before the restart":
        for _ in range(200):
            if (await worker_state(url, f"exe_{submitted.id}_1"))[1]["state"] != "running":
                break
            await asyncio.sleep(0.02)
    async with Runtime.from_settings(settings, store=store) as second:
        done = await second.wait(submitted.id, timeout_s=10)
    # Like any backend_error it was retried; every attempt's answer was refused the same way.
    assert done.status is RequestStatus.FAILED, done
    assert done.error is not None and done.error.type == "backend_error"
    # Refused by the worker itself (which holds its outputs to the same rules) or by the router.
    assert "cannot be sent" in done.error.message and "64 levels" in done.error.message


async def test_a_worker_that_does_not_answer_in_time_has_its_work_retried(
    serve_app: Callable[[FastAPI], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking is bounded: a worker that holds the question has its execution queued again."""
    url = serve_app(worker_app())
    store = MemoryStore()
    async with Runtime.from_settings(router_settings(url), store=store) as first:
        submitted = await first.submit(chat(duration_s=5.0), ALICE)
        await until_running_on_worker(url, f"exe_{submitted.id}_1")

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; ends when the caller hangs up
        writer.close()

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    monkeypatch.setattr(runtime_module, "_LOOKUP_TIMEOUT_S", 0.3)
    try:
        async with asyncio.timeout(10):
            async with Runtime.from_settings(
                router_settings(f"http://127.0.0.1:{port}"), store=store
            ) as second:
                recovered = second.get(submitted.id)
    finally:
        silent.close()
        await silent.wait_closed()
    assert recovered.status is RequestStatus.QUEUED and recovered.attempts == 1
    assert recovered.error is not None and recovered.error.type == "router_restarted"


async def test_a_worker_known_only_by_registration_is_told_to_stop_once_it_registers(
    serve_app: Callable[[FastAPI], str],
) -> None:
    """Work of a self-registering worker is retried at restart; the old run is cancelled later."""
    url = serve_app(worker_app())
    settings = make_settings(
        auth={"enabled": False, "worker_token": TOKEN},
        backends=[],
        monitor={"poll_interval_s": 0.05, "stale_after_s": 2},
        retries={"backoff_s": 0.02, "max_backoff_s": 0.1},
    )
    store = MemoryStore()
    async with Runtime.from_settings(settings, store=store) as first:
        first.register_worker("w1", url)
        await until(lambda: "w1:0" in first.router.monitor.gpus)
        submitted = await first.submit(chat(duration_s=30.0), ALICE)
        await until_running_on_worker(url, f"exe_{submitted.id}_1")
    async with Runtime.from_settings(settings, store=store) as second:
        assert second.get(submitted.id).status is RequestStatus.QUEUED  # nobody to ask yet
        second.register_worker("w1", url)  # its next heartbeat
        await until(lambda: second.get(submitted.id).attempts == 2, timeout_s=5)
        status, old = await worker_state(url, f"exe_{submitted.id}_1")
        for _ in range(100):
            if old["state"] != "running":
                break
            await asyncio.sleep(0.02)
            status, old = await worker_state(url, f"exe_{submitted.id}_1")
        await second.cancel(submitted.id)
    assert status == 200 and old["state"] == "cancelled"


async def until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Yield to the event loop until ``predicate()`` holds (fail after ``timeout_s``)."""
    for _ in range(int(timeout_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")

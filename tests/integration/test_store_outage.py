"""A state store that stops answering: nothing half-done, nothing lost, the router carries on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.core.state_store import Change
from gpu_request_router.exceptions import StoreUnavailable
from gpu_request_router.models.request import RequestStatus
from gpu_request_router.runtime import Runtime
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.testing import chat, make_settings

if TYPE_CHECKING:
    from conftest import LiveServer

SETTINGS = make_settings(monitor={"poll_interval_s": 0.05, "stale_after_s": 2})


class FlakyStore(MemoryStore):
    """A memory store whose writes fail with StoreUnavailable while ``down`` (a disk gone full)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _fail_while_down(self) -> None:
        if self.down:
            raise StoreUnavailable("database or disk is full", retry_after_s=2.0)

    def write(self, changes: Sequence[Change]) -> None:
        self._fail_while_down()
        super().write(changes)

    def check_writable(self, now: float) -> None:
        self._fail_while_down()


async def _until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_an_outcome_reported_while_the_store_is_down_is_kept_and_applied_later() -> None:
    """A request that finishes during an outage succeeds once the store is back, result intact."""
    store = FlakyStore()
    async with Runtime.from_settings(SETTINGS, store=store, seed=1) as runtime:
        request = await runtime.submit(chat(duration_s=0.3), Caller("alice"))
        await _until(lambda: runtime.get(request.id).status is RequestStatus.RUNNING)
        store.down = True
        await asyncio.sleep(0.6)  # it finished meanwhile; the store refused the change
        assert store.get_request(request.id).status is RequestStatus.RUNNING
        assert runtime.get(request.id).status is RequestStatus.RUNNING, "visible = durable"
        store.down = False
        done = await runtime.wait(request.id, 10)
    assert done.status is RequestStatus.SUCCEEDED
    assert done.result["object"] == "chat.completion"
    assert [t.to_status.value for t in store.transitions(request.id)] == [
        "queued",
        "dispatching",
        "running",
        "succeeded",
    ]


async def test_expiry_during_an_outage_happens_once_the_store_is_back() -> None:
    """A deadline passing while the store is down expires the request later; loops survive."""
    store = FlakyStore()
    async with Runtime.from_settings(SETTINGS, store=store, seed=1) as runtime:
        request = await runtime.submit(chat(failure="hang", timeout_s=0.3), Caller("alice"))
        await _until(lambda: runtime.get(request.id).status is RequestStatus.RUNNING)
        store.down = True
        await asyncio.sleep(0.8)
        assert runtime.get(request.id).status is RequestStatus.RUNNING
        store.down = False
        done = await runtime.wait(request.id, 5)
        assert done.status is RequestStatus.EXPIRED
        assert runtime.router.monitor.gpus["sim:0"].reserved_mb == 0
        after = await runtime.submit(chat(duration_s=0.05), Caller("alice"))
        assert (await runtime.wait(after.id, 5)).status is RequestStatus.SUCCEEDED


def test_submits_during_an_outage_are_503_with_retry_after_and_store_nothing(serve) -> None:
    """The API answers 503 problem details with Retry-After; nothing is accepted or counted."""
    store = FlakyStore()
    server: LiveServer = serve(store=store)
    alice = server.client("alice")
    store.down = True
    refused = alice.post(
        "/v1/requests",
        json={"model": "llama-3-8b", "input": {"messages": [{"role": "user", "content": "x"}]}},
    )
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2"
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert server.client("root").get("/readyz").status_code == 503
    again = alice.post(
        "/v1/requests",
        json={"model": "llama-3-8b", "input": {"messages": [{"role": "user", "content": "x"}]}},
    )
    assert again.status_code == 503, "refused at once while the store is down, not tried"
    store.down = False
    assert alice.get("/v1/requests").json()["items"] == []
    assert alice.get("/v1/quota").json()["usage"]["requests_last_minute"] == 0
    # The writer probes the store at least every second, and is ready once a probe succeeds.
    deadline = time.monotonic() + 3.0
    while server.client("root").get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not ready again 3 s after the store came back"
        time.sleep(0.05)
    accepted = alice.post(
        "/v1/requests",
        json={"model": "llama-3-8b", "input": {"messages": [{"role": "user", "content": "x"}]}},
    )
    assert accepted.status_code == 202

"""A router on Redis while Redis is killed (``kill -9``) under load, then started again.

A real ``gpurouter serve`` process on a private ``redis-server`` (append-only file), clients on
both doors. From a second after the kill on, every submit and OpenAI call is answered within a
second with 503 and ``Retry-After`` (``/healthz`` says why, ``/readyz`` is 503); once Redis is
back the router takes work again within five seconds, by itself. Every request acknowledged
with 202, before, during or after, ends ``succeeded``, once (lost 0, duplicated 0): clients
retry a 503 by idempotency key, as real ones do.

A call admitted before the outage was known may wait for its end: work dispatched just before
holds its GPU until the commit that dispatched it succeeds (nothing starts that the store does
not show).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from routers import HEADERS, Router, loaded_config

from gpu_request_router.store import RedisStore
from gpu_request_router.testing import RedisServer, free_port

OUTAGE_S = 3.0


@dataclass
class Answer:
    """One call: when it was sent, how long it took, its status and what it named."""

    door: str
    sent: float
    took: float
    status: int
    retry_after: str | None
    key: str
    request_id: str | None = None


@dataclass
class Load:
    """Clients on both doors until ``stop``; every answer kept."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, door: str, sent: float, response: httpx.Response, key: str) -> None:
        """Keep one answer (a 202's request id with it)."""
        answer = Answer(
            door,
            sent,
            time.monotonic() - sent,
            response.status_code,
            response.headers.get("Retry-After"),
            key,
            response.json()["id"] if response.status_code == 202 else None,
        )
        with self.lock:
            self.answers.append(answer)

    def submits(self, name: str) -> None:
        with httpx.Client(base_url=self.url, headers=HEADERS, timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                key = f"{name}-{n}"
                n += 1
                while not self.stop.is_set():  # the same key until it is taken
                    body = {
                        "model": "llama-3-8b",
                        "input": {
                            "messages": [{"role": "user", "content": "hi"}],
                            "simulate": {"duration_s": 0.05},
                        },
                    }
                    sent = time.monotonic()
                    response = client.post(
                        "/v1/requests", json=body, headers={"Idempotency-Key": key}
                    )
                    self.record("submit", sent, response, key)
                    if response.status_code == 202:
                        break
                    assert response.status_code == 503, response.text
                    time.sleep(0.05)

    def door(self) -> None:
        with httpx.Client(base_url=self.url, headers=HEADERS, timeout=10) as client:
            while not self.stop.is_set():
                body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}]}
                sent = time.monotonic()
                response = client.post("/v1/chat/completions", json=body)
                self.record("openai", sent, response, "")
                assert response.status_code in (200, 503), response.text
                time.sleep(0.05)


# ``everysec`` too with GPUROUTER_REDIS_EVERYSEC=1 (20 s more; its numbers are in deployment.md).
FSYNC = ["always", "everysec"] if os.environ.get("GPUROUTER_REDIS_EVERYSEC") == "1" else ["always"]
# A router of a shared prefix (state.shared) too with GPUROUTER_REDIS_SHARED=1 (20 s more).
SHARED = [False, True] if os.environ.get("GPUROUTER_REDIS_SHARED") == "1" else [False]


@pytest.mark.parametrize("shared", SHARED, ids=lambda shared: "shared" if shared else "owner")
@pytest.mark.parametrize("appendfsync", FSYNC)
def test_redis_killed_under_load_answers_503_fast_recovers_and_loses_nothing(
    tmp_path: Path, appendfsync: str, shared: bool
) -> None:
    """See the module docstring; ``everysec`` loses nothing to a kill of the Redis process too.

    Redis writes the append-only file before it replies; ``everysec`` only defers the fsync, so
    what it can lose is what the host's page cache held when the host itself failed.
    """
    with _redis(tmp_path, appendfsync) as redis_server:
        port = free_port()
        state = {"backend": "redis", "redis_url": redis_server.url, "shared": shared}
        router = Router(tmp_path, port, config=loaded_config(port, state))
        try:
            router.wait_ready()
            load = Load(router.url)
            threads = [threading.Thread(target=load.submits, args=(f"c{i}",)) for i in range(4)] + [
                threading.Thread(target=load.door)
            ]
            for thread in threads:
                thread.start()
            time.sleep(2.0)
            redis_server.kill()
            killed = time.monotonic()
            time.sleep(1.0)
            probe(router.url)
            time.sleep(max(0.0, killed + OUTAGE_S - time.monotonic()))
            redis_server.start()
            back = time.monotonic()
            time.sleep(4.0)
            load.stop.set()
            for thread in threads:
                thread.join(timeout=30)
            acknowledged = check(load, router.url, killed, back)
        finally:
            router.stop()
        store = RedisStore(redis_server.url, shared=shared)  # the router gave its lease up
        try:
            for request_id in acknowledged:
                trail = store.transitions(request_id)
                assert [t.seq for t in trail] == list(range(len(trail)))
                assert [t.to_status.terminal for t in trail].count(True) == 1, trail
        finally:
            store.close()


def probe(url: str) -> None:
    """A second into the outage, fresh calls on both doors: each a 503 with Retry-After, fast."""
    chat = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}]}
    submit = {"model": "llama-3-8b", "input": {"messages": chat["messages"]}}
    with httpx.Client(base_url=url, headers=HEADERS, timeout=10) as client:
        for path, body in [("/v1/requests", submit), ("/v1/chat/completions", chat)] * 3:
            sent = time.monotonic()
            response = client.post(path, json=body)
            assert time.monotonic() - sent < 1.0, path
            assert response.status_code == 503, (path, response.text)
            assert response.headers.get("Retry-After"), path
            assert "Redis state store" in response.text, response.text
        health = client.get("/healthz").json()
        assert health["status"] == "degraded", health
        assert "Redis state store" in health["store"], health
        ready = client.get("/readyz")
        assert ready.status_code == 503, ready.text


def _redis(tmp_path: Path, appendfsync: str) -> RedisServer:
    directory = tmp_path / "redis"
    directory.mkdir()
    return RedisServer(directory, appendfsync=appendfsync)


def check(load: Load, url: str, killed: float, back: float) -> list[str]:
    """The outage's answers, the recovery, and every acknowledged request's end; their ids."""
    answers = load.answers
    during = [a for a in answers if killed <= a.sent < back]
    assert during, "no call was made while Redis was down"
    settled = [a for a in during if a.sent >= killed + 1.0]
    assert settled
    assert all(a.status == 503 and a.retry_after and a.took < 1.0 for a in settled), [
        a for a in settled if a.status != 503 or not a.retry_after or a.took >= 1.0
    ]
    taken_again = [a for a in answers if a.sent >= back and a.status in (200, 202)]
    assert taken_again, "no call was taken after Redis came back"
    recovered_in = min(a.sent for a in taken_again) - back
    assert recovered_in < 5.0
    acknowledged: dict[str, str] = {}
    for answer in answers:
        if answer.status == 202:
            assert answer.request_id is not None
            assert acknowledged.setdefault(answer.key, answer.request_id) == answer.request_id
    assert len(set(acknowledged.values())) == len(acknowledged)  # one request per key
    before = sum(1 for a in answers if a.status == 202 and a.sent < killed)
    after = sum(1 for a in answers if a.status == 202 and a.sent >= back)
    assert before > 0 and after > 0
    with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as client:
        for request_id in acknowledged.values():
            deadline = time.monotonic() + 30
            while True:
                response = client.get(f"/v1/requests/{request_id}")
                assert response.status_code == 200, (request_id, response.text)
                if response.json()["status"] == "succeeded":
                    break
                assert time.monotonic() < deadline, response.json()
                time.sleep(0.05)
    print(
        f"acknowledged={len(acknowledged)} before_kill={before} after_back={after} "
        f"outage_calls={len(during)} recovered_in={recovered_in:.2f}s lost=0 duplicated=0"
    )
    return list(acknowledged.values())

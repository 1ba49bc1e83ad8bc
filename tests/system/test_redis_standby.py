"""A hot standby on Redis: ``kill -9`` of the router that holds the prefix, under load.

Two ``gpurouter serve`` processes on one Redis prefix, both with ``state.standby: true``: one
holds the prefix and serves, the other waits, answering probes on its port (alive, not ready)
and 503 to everything else. Clients know both addresses and retry a failed or refused submit
on the other by idempotency key. The serving one is killed; the standby takes the lease within
a lease (5 s) of the death, recovers every unfinished request and serves within a further 5 s.
The killed one is started again as the new standby; with ``GPUROUTER_STANDBY_KILLS=N`` the
holder is killed N times in turn (once in ``make test``). Every request acknowledged with 202
ends ``succeeded``, with one terminal audit entry (lost 0, duplicated 0). The simulated fleet
runs inside the router, so work a killed router was running is retried by the next one
(attempt 2).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from routers import HEADERS, Router, json_lines, loaded_config

from gpu_request_router.store import RedisStore
from gpu_request_router.testing import free_port

KILLS = int(os.environ.get("GPUROUTER_STANDBY_KILLS", "1"))
TAKEOVER_LIMIT_S = 5.0 + 5.0  # the lease, then recovery and the first ready answer


def config(port: int, redis_url: str, prefix: str, **state: Any) -> dict[str, Any]:
    """A standby-capable router on ``port`` with 2 simulated GPUs, on the shared prefix."""
    state = {
        "backend": "redis",
        "redis_url": redis_url,
        "redis_prefix": prefix,
        "standby": True,
        **state,
    }
    return loaded_config(port, state)


@dataclass
class Clients:
    """Submitters that know both routers; each key is retried, on either, until taken."""

    urls: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    acknowledged: dict[str, list[str]] = field(default_factory=dict)
    retried: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, name: str) -> None:
        body = {
            "model": "llama-3-8b",
            "input": {
                "messages": [{"role": "user", "content": "hi"}],
                "simulate": {"duration_s": 0.1},
            },
        }
        turn = 0
        with httpx.Client(headers=HEADERS, timeout=5) as client:
            n = 0
            while not self.stop.is_set():
                key = f"{name}-{n}"
                n += 1
                while True:
                    url = self.urls[turn % len(self.urls)]
                    try:
                        response = client.post(
                            f"{url}/v1/requests", json=body, headers={"Idempotency-Key": key}
                        )
                    except httpx.HTTPError:
                        response = None
                    if response is not None and response.status_code == 202:
                        with self.lock:
                            self.acknowledged.setdefault(key, []).append(response.json()["id"])
                        break
                    assert response is None or response.status_code == 503, response.text
                    with self.lock:
                        self.retried += 1
                    turn += 1  # the other router
                    time.sleep(0.05)
                    if self.stop.is_set():
                        break


def wait_ready(url: str, since: float) -> float:
    """Seconds from ``since`` until ``url`` answers /readyz 200 (failing past the limit)."""
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return time.monotonic() - since
        except httpx.HTTPError:
            pass
        assert time.monotonic() - since < TAKEOVER_LIMIT_S + 5, "the standby never took over"
        time.sleep(0.05)


def wait_standby(router: Router) -> None:
    """Until the router logs that it waits as a standby; then its answers on its port.

    Alive (``/healthz`` 200, ``"standby"``) but not ready (``/readyz`` 503), and every other
    call 503 with ``Retry-After``: a load balancer sends it nothing, a liveness probe keeps it.
    """
    deadline = time.monotonic() + 20
    while not any(e.get("event") == "redis_standby" for e in json_lines(router.err.read_text())):
        assert router.process.poll() is None, router.err.read_text()
        assert time.monotonic() < deadline, "the second router never became a standby"
        time.sleep(0.05)
    health = httpx.get(f"{router.url}/healthz", timeout=2)
    assert (health.status_code, health.json()["status"]) == (200, "standby"), health.text
    ready = httpx.get(f"{router.url}/readyz", timeout=2)
    assert ready.status_code == 503
    assert "standby" in ready.json()["checks"]["store"]
    refused = httpx.post(f"{router.url}/v1/requests", json={"model": "m"}, timeout=2)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
    assert refused.headers["content-type"] == "application/problem+json"


def test_the_standby_takes_over_from_a_killed_router_and_nothing_is_lost(
    tmp_path: Path, redis_url: str, redis_store_prefix: str
) -> None:
    """See the module docstring."""
    ports = [free_port(), free_port()]
    routers = [Router(tmp_path, ports[0], config(ports[0], redis_url, redis_store_prefix))]
    takeovers: list[float] = []
    clients = Clients([f"http://127.0.0.1:{port}" for port in ports])
    threads = [threading.Thread(target=clients.run, args=(f"c{i}",)) for i in range(4)]
    try:
        routers[0].wait_ready()
        routers.append(Router(tmp_path, ports[1], config(ports[1], redis_url, redis_store_prefix)))
        wait_standby(routers[1])
        for thread in threads:
            thread.start()
        for kill in range(KILLS):
            time.sleep(2.0)
            serving, standby = routers[kill % 2], routers[(kill + 1) % 2]
            serving.process.kill()
            serving.process.wait(10)
            killed = time.monotonic()
            takeovers.append(wait_ready(standby.url, killed))
            # The killed one comes back as the next standby.
            routers[kill % 2] = Router(
                tmp_path, serving.port, config(serving.port, redis_url, redis_store_prefix)
            )
            wait_standby(routers[kill % 2])
        time.sleep(2.0)
    finally:
        clients.stop.set()
        for thread in threads:
            thread.join(timeout=30)
    serving = next(r for r in routers if _serves(r.url))
    try:
        assert max(takeovers) < TAKEOVER_LIMIT_S, takeovers
        ids = dict(clients.acknowledged)
        assert all(len(set(found)) == 1 for found in ids.values())  # one request per key
        with httpx.Client(base_url=serving.url, headers=HEADERS, timeout=10) as client:
            for found in ids.values():
                deadline = time.monotonic() + 60
                while (status := client.get(f"/v1/requests/{found[0]}").json()["status"]) != (
                    "succeeded"
                ):
                    assert time.monotonic() < deadline, (found[0], status)
                    time.sleep(0.05)
    finally:
        for router in routers:
            router.stop()
    store = RedisStore(redis_url, prefix=redis_store_prefix)
    try:
        attempts = []
        for found in ids.values():
            trail = store.transitions(found[0])
            assert [t.seq for t in trail] == list(range(len(trail)))
            assert [t.to_status.terminal for t in trail].count(True) == 1, trail
            attempts.append(trail[-1].attempt)
    finally:
        store.close()
    print(
        f"kills={KILLS} acknowledged={len(ids)} retried_by_key={clients.retried} "
        f"retried_attempts={sum(1 for a in attempts if a > 1)} "
        f"takeover_s={[round(t, 2) for t in takeovers]} lost=0 duplicated=0"
    )


def test_a_paused_holder_whose_lease_was_taken_stops_with_exit_3(
    tmp_path: Path, redis_url: str, redis_store_prefix: str
) -> None:
    """The serving router is paused past its lease; the standby takes over; resumed, it stops.

    It no longer holds the prefix and can never write again: it exits 3 (``router_stopping``)
    for its supervisor to start it again, as a standby now, instead of answering 503 for ever.
    """
    lease = {"redis_lease_s": 2.0}
    ports = [free_port(), free_port()]
    holder = Router(tmp_path, ports[0], config(ports[0], redis_url, redis_store_prefix, **lease))
    standby: Router | None = None
    try:
        holder.wait_ready()
        standby = Router(
            tmp_path, ports[1], config(ports[1], redis_url, redis_store_prefix, **lease)
        )
        wait_standby(standby)
        holder.process.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        wait_ready(standby.url, paused)
        holder.process.send_signal(signal.SIGCONT)
        assert holder.process.wait(15) == 3
        events = [e.get("event") for e in json_lines(holder.err.read_text())]
        assert "router_stopping" in events
        assert _serves(standby.url)
    finally:
        holder.process.send_signal(signal.SIGCONT)
        holder.stop()
        if standby is not None:
            standby.stop()


def _serves(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

"""``examples/haproxy.cfg`` in front of a serving router and its hot standby, on Redis.

The example file is run as it is, its addresses replaced by loopback ones, by a real HAProxy
(Debian's ``haproxy``; the test skips without it, and fails under ``CI=true``). Clients know only
HAProxy's address. The serving router is killed with SIGKILL under their load: HAProxy answers
503 while no router is ready (or passes on the router's own 503), then sends everything to the
standby once it serves. Every request acknowledged with 202 ends ``succeeded``, once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from routers import HEADERS, Router
from test_redis_standby import config, wait_standby

from gpu_request_router.testing import free_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "haproxy.cfg"


def haproxy_config(port: int, routers: list[int]) -> str:
    """The example, listening on ``port`` and balancing over the routers' loopback ports."""
    text = EXAMPLE.read_text()
    text = re.sub(r"bind :8080", f"bind 127.0.0.1:{port}", text)
    for index, router_port in enumerate(routers, start=1):
        text = re.sub(
            rf"server router{index} \S+", f"server router{index} 127.0.0.1:{router_port}", text
        )
    return text


def test_haproxy_moves_clients_to_the_standby_when_the_router_is_killed(
    tmp_path: Path, redis_url: str, redis_store_prefix: str
) -> None:
    """See the module docstring."""
    binary = shutil.which("haproxy")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("haproxy is not installed (make .venv/.dev installs it)")
        pytest.skip("haproxy is not installed")
    ports = [free_port(), free_port()]
    front = free_port()
    routers = [Router(tmp_path, ports[0], config(ports[0], redis_url, redis_store_prefix))]
    (tmp_path / "haproxy.cfg").write_text(haproxy_config(front, ports))
    with (tmp_path / "haproxy.log").open("wb") as log:
        proxy = subprocess.Popen(
            [binary, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{front}"
    seen: Counter[str] = Counter()
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    first_after_kill: list[float] = []
    killed_at: list[float] = []

    def client(name: str) -> None:
        body = {
            "model": "llama-3-8b",
            "input": {
                "messages": [{"role": "user", "content": "hi"}],
                "simulate": {"duration_s": 0.05},
            },
        }
        with httpx.Client(base_url=url, headers=HEADERS, timeout=10) as http:
            n = 0
            while not stop.is_set():
                key = f"{name}-{n}"
                n += 1
                while not stop.is_set():
                    try:
                        response = http.post(
                            "/v1/requests", json=body, headers={"Idempotency-Key": key}
                        )
                    except httpx.HTTPError as exc:
                        with lock:
                            seen[f"connection error ({type(exc).__name__})"] += 1
                        time.sleep(0.05)
                        continue
                    if response.status_code == 202:
                        with lock:
                            found = acknowledged.setdefault(key, response.json()["id"])
                            assert found == response.json()["id"]
                            if killed_at and not first_after_kill:
                                first_after_kill.append(time.monotonic() - killed_at[0])
                        break
                    assert response.status_code == 503, response.text
                    source = (
                        "router"
                        if "problem+json" in response.headers.get("content-type", "")
                        else "haproxy"
                    )
                    with lock:
                        seen[f"503 from {source}"] += 1
                    time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(f"c{i}",)) for i in range(4)]
    try:
        routers[0].wait_ready()
        routers.append(Router(tmp_path, ports[1], config(ports[1], redis_url, redis_store_prefix)))
        wait_standby(routers[1])
        deadline = time.monotonic() + 20
        while True:  # HAProxy has checked both: the serving one is up
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proxy.poll() is None, (tmp_path / "haproxy.log").read_text()
            assert time.monotonic() < deadline, "HAProxy never routed to the serving router"
            time.sleep(0.1)
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        routers[0].process.kill()
        routers[0].process.wait(10)
        killed_at.append(time.monotonic())
        time.sleep(7.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    try:
        assert first_after_kill, "no request was taken after the kill"
        assert first_after_kill[0] < 10.0
        with httpx.Client(base_url=url, headers=HEADERS, timeout=10) as http:
            for request_id in acknowledged.values():
                deadline = time.monotonic() + 60
                while http.get(f"/v1/requests/{request_id}").json()["status"] != "succeeded":
                    assert time.monotonic() < deadline, request_id
                    time.sleep(0.05)
    finally:
        proxy.terminate()
        proxy.wait(10)
        for router in routers:
            router.stop()
    assert len(set(acknowledged.values())) == len(acknowledged)
    print(
        f"acknowledged={len(acknowledged)} served_again_after={first_after_kill[0]:.2f}s "
        f"seen_during_switch={dict(seen)} lost=0 duplicated=0"
    )

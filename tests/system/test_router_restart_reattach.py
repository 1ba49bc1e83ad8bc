"""A router killed with SIGKILL while real workers run its executions: the restart re-attaches.

One router (`gpurouter serve`, SQLite) and three `gpurouter worker --simulate` processes, each of
its own GPU type so that each request lands where the test wants it: w1 (H100) keeps running
through the router's death, w2 (L4) is restarted while the router is down (it forgets), w3
(A100) is down when the router comes back (it cannot be asked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from routers import Processes, wait_answering

from gpu_request_router.http.keys import hash_key
from gpu_request_router.testing import free_port

GPUROUTER = str(Path(sys.executable).parent / "gpurouter")
KEY = "reattach-user-key"
WORKER_TOKEN = "reattach-worker-token-0123456789"
WORKER_AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}"}
GPUS = {"w1": "1xH100-80GB", "w2": "1xL4-24GB", "w3": "1xA100-80GB"}
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


class Cluster(Processes):
    """The router and the three workers, real processes on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        super().__init__()
        self.ports = {name: free_port() for name in ("router", *GPUS)}
        self.url = f"http://127.0.0.1:{self.ports['router']}"
        common = {
            "auth": {
                "users": [{"name": "alice", "role": "admin", "api_key_sha256": hash_key(KEY)}],
                "worker_token": WORKER_TOKEN,
            },
            "monitor": {"poll_interval_s": 0.2, "stale_after_s": 3},
            "retries": {"backoff_s": 0.05, "max_backoff_s": 0.2},
            "logging": {"level": "warning"},
        }
        router = {
            **common,
            "server": {"port": self.ports["router"]},
            "state": {"backend": "sqlite", "sqlite_path": str(workdir / "router.db")},
            "quotas": {"default": {"requests_per_minute": None, "max_concurrent": None}},
            "backends": [
                {"name": name, "kind": "agent", "url": self.worker_url(name)} for name in GPUS
            ],
        }
        (workdir / "router.yaml").write_text(yaml.safe_dump(router))
        (workdir / "worker.yaml").write_text(yaml.safe_dump(common))

    def worker_url(self, name: str) -> str:
        """Where worker ``name`` listens."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def _start(self, name: str, args: list[str], url: str, ready: str) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [GPUROUTER, *args],
                cwd=self.workdir,
                stdout=out,
                stderr=out,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.processes[name] = process
        wait_answering(url, process, log, ready, timeout_s=30)

    def start_worker(self, name: str) -> None:
        """Start worker ``name`` (again) and wait until it answers."""
        args = ["worker", "--config", str(self.workdir / "worker.yaml"), "--simulate", GPUS[name]]
        args += ["--slots", "4", "--name", name, "--port", str(self.ports[name])]
        self._start(name, args, self.worker_url(name), "/healthz")

    def start_router(self) -> None:
        """Start the router (again, on the same database) and wait until it is ready."""
        args = ["serve", "--config", str(self.workdir / "router.yaml")]
        self._start("router", args, self.url, "/readyz")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """The three workers and the router, started; everything stopped at the end."""
    running = Cluster(tmp_path)
    try:
        for name in GPUS:
            running.start_worker(name)
        running.start_router()
        yield running
    finally:
        running.stop()


def _body(gpu_type: str, duration_s: float, tag: str) -> dict[str, Any]:
    return {
        "model": "llama-3-8b",
        "resources": {"gpu_type": gpu_type},
        "input": {
            "messages": [{"role": "user", "content": f"job {tag}"}],
            "max_tokens": 4,
            "simulate": {"duration_s": duration_s, "output": {"tag": tag}},
        },
    }


def _until(what: str, check: Any, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _execution(worker_url: str, execution_id: str, wait: float = 0) -> httpx.Response:
    params = {"wait": wait} if wait else {}
    return httpx.get(
        f"{worker_url}/v1/executions/{execution_id}",
        params=params,
        headers=WORKER_AUTH,
        timeout=wait + 5,
    )


def _statuses(client: httpx.Client, url: str, request_id: str) -> list[str]:
    with client.stream("GET", f"{url}/v1/requests/{request_id}/events", timeout=30) as stream:
        return [
            json.loads(line.removeprefix("data: "))["status"]
            for line in stream.iter_lines()
            if line.startswith("data: ")
        ]


@pytest.mark.slow
def test_a_restarted_router_reattaches_collects_and_retries_only_what_nobody_knows(
    cluster: Cluster,
) -> None:
    """Still running: one attempt; finished while down: its result; forgotten or unreachable: 2."""
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=70) as client:

        def submit(body: dict[str, Any]) -> str:
            response = client.post(f"{cluster.url}/v1/requests", json=body)
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        def get(request_id: str, wait: float = 0) -> dict[str, Any]:
            params = {"wait": wait} if wait else {}
            response = client.get(f"{cluster.url}/v1/requests/{request_id}", params=params)
            return dict(response.json())

        long_ones = [submit(_body("H100-80GB", 20.0, f"long-{index}")) for index in range(2)]
        short = submit(_body("H100-80GB", 1.0, "short"))
        forgotten = submit(_body("L4-24GB", 8.0, "forgotten"))
        unreachable = submit(_body("A100-80GB", 8.0, "unreachable"))
        everything = [*long_ones, short, forgotten, unreachable]
        _until(
            "every request runs",
            lambda: all(get(request_id)["status"] == "running" for request_id in everything),
        )
        placed = {request_id: get(request_id)["placement"]["worker"] for request_id in everything}
        assert placed == {
            **dict.fromkeys(long_ones, "w1"),
            short: "w1",
            forgotten: "w2",
            unreachable: "w3",
        }

        cluster.kill("router")
        cluster.kill("w2")
        cluster.start_worker("w2")  # back, but it never heard of its execution
        cluster.kill("w3")  # gone while the router restarts
        w1 = cluster.worker_url("w1")
        finished = _execution(w1, f"exe_{short}_1", wait=10).json()
        assert finished["state"] == "succeeded", "the short one ended while the router was down"
        for request_id in long_ones:
            still = _execution(w1, f"exe_{request_id}_1").json()
            assert still["state"] == "running", "the long ones outlive the restart"

        cluster.start_router()
        for request_id in long_ones:
            recovered = get(request_id)
            assert recovered["status"] == "running" and recovered["attempts"] == 1, recovered
        cluster.start_worker("w3")

        done = {request_id: get(request_id, wait=60) for request_id in everything}
        for request_id in [*long_ones, short]:
            assert done[request_id]["status"] == "succeeded", done[request_id]
            assert done[request_id]["attempts"] == 1, done[request_id]
            # Never sent again: the worker knows no second execution of it.
            assert _execution(w1, f"exe_{request_id}_2").status_code == 404
            assert _statuses(client, cluster.url, request_id) == [
                "queued",
                "dispatching",
                "running",
                "succeeded",
            ]
        assert done[short]["result"] == {"tag": "short"}
        assert done[long_ones[0]]["result"] == {"tag": "long-0"}
        for request_id in (forgotten, unreachable):
            assert done[request_id]["status"] == "succeeded", done[request_id]
            assert done[request_id]["attempts"] == 2, done[request_id]
            statuses = _statuses(client, cluster.url, request_id)
            assert statuses.count("dispatching") == 2 and statuses[-1] == "succeeded", statuses

"""A router and two `gpurouter worker --simulate` processes; one worker is killed under load."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
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
KEY = "failover-user-key"
WORKER_TOKEN = "failover-worker-token-0123456789"
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}


class Cluster(Processes):
    """One router (`gpurouter serve`) and two workers, w1 and w2, all real processes.

    By default w1 is listed in the config and w2 registers itself, each named as the router
    knows it; with ``named=False`` both are listed in the config and started without ``--name``.
    """

    def __init__(
        self, workdir: Path, *, named: bool = True, gpus: str = "2xH100-80GB", slots: int = 4
    ) -> None:
        self.workdir = workdir
        self.named = named
        self.gpus = gpus
        self.slots = slots
        super().__init__()
        self.ports = {name: free_port() for name in ("router", "w1", "w2")}
        self.url = f"http://127.0.0.1:{self.ports['router']}"
        common = {
            "auth": {
                "users": [{"name": "alice", "role": "admin", "api_key_sha256": hash_key(KEY)}],
                "worker_token": WORKER_TOKEN,
            },
            "monitor": {"poll_interval_s": 0.2, "stale_after_s": 1.5},
            "retries": {"backoff_s": 0.05, "max_backoff_s": 0.2},
            "logging": {"level": "warning"},
        }
        listed = ("w1",) if named else ("w1", "w2")
        router = {
            **common,
            "server": {"port": self.ports["router"]},
            "state": {"sqlite_path": str(workdir / "router.db")},
            "quotas": {"default": {"requests_per_minute": None, "max_concurrent": None}},
            "backends": [
                {"name": name, "kind": "agent", "url": self.worker_url(name)} for name in listed
            ],
        }
        (workdir / "router.yaml").write_text(yaml.safe_dump(router))
        (workdir / "worker.yaml").write_text(yaml.safe_dump(common))

    def worker_url(self, name: str) -> str:
        """Where worker ``name`` listens."""
        return f"http://127.0.0.1:{self.ports[name]}"

    def _start(self, name: str, args: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            self.processes[name] = subprocess.Popen(
                [GPUROUTER, *args],
                cwd=self.workdir,
                stdout=out,
                stderr=out,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def start_worker(self, name: str) -> None:
        args = [
            "worker",
            "--config",
            str(self.workdir / "worker.yaml"),
            "--simulate",
            self.gpus,
            "--slots",
            str(self.slots),
            "--port",
            str(self.ports[name]),
        ]
        if self.named:
            args += ["--name", name]
        if self.named and name == "w2":
            args += ["--router-url", self.url]
        self._start(name, args)
        wait_answering(
            self.worker_url(name), self.processes[name], self.workdir / f"{name}.log", "/healthz"
        )

    def start(self) -> None:
        for name in ("w1", "w2"):
            self.start_worker(name)
        self._start("router", ["serve", "--config", str(self.workdir / "router.yaml")])
        wait_answering(self.url, self.processes["router"], self.workdir / "router.log", "/readyz")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A running router with two simulated workers, all real processes on loopback."""
    running = Cluster(tmp_path)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    """An HTTP client presenting the admin user's key, closed at the end."""
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=70) as http:
        yield http


def _gpus(client: httpx.Client, url: str) -> dict[str, dict[str, Any]]:
    return {gpu["id"]: gpu for gpu in client.get(f"{url}/v1/gpus").json()["items"]}


def _trail(client: httpx.Client, url: str, request_id: str) -> list[dict[str, Any]]:
    with client.stream("GET", f"{url}/v1/requests/{request_id}/events", timeout=30) as stream:
        return [
            json.loads(line.removeprefix("data: "))
            for line in stream.iter_lines()
            if line.startswith("data: ")
        ]


def test_work_runs_on_both_workers_and_a_killed_one_is_failed_over(
    cluster: Cluster, client: httpx.Client
) -> None:
    """Both workers take work; after SIGKILL of one, all requests finish on the other, once."""
    deadline = time.monotonic() + 10
    while set(_gpus(client, cluster.url)) != {"w1:0", "w1:1", "w2:0", "w2:1"}:
        assert time.monotonic() < deadline, "w2 did not register"
        time.sleep(0.1)
    accepted: list[str] = []
    lock = threading.Lock()

    def submit(index: int) -> None:
        body = {
            "model": "llama-3-8b",
            "input": {
                "messages": [{"role": "user", "content": f"job {index}"}],
                "max_tokens": 4,
                "simulate": {"duration_s": 0.6 + (index % 5) * 0.2},
            },
        }
        response = client.post(f"{cluster.url}/v1/requests", json=body)
        assert response.status_code == 202, response.text
        with lock:
            accepted.append(response.json()["id"])

    threads = [threading.Thread(target=submit, args=(index,)) for index in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    time.sleep(0.3)  # the first executions are running on both workers
    placed = {
        item["id"]: item["placement"]["worker"]
        for item in client.get(f"{cluster.url}/v1/requests", params={"limit": 100}).json()["items"]
        if item["placement"]
    }
    assert set(placed.values()) == {"w1", "w2"}, "work goes to both workers"
    on_w1 = [request_id for request_id, worker in placed.items() if worker == "w1"]
    cluster.kill("w1")
    for request_id in accepted:
        final = client.get(f"{cluster.url}/v1/requests/{request_id}", params={"wait": 60}).json()
        assert final["status"] == "succeeded", json.dumps(final)
        assert final["placement"]["worker"] == "w2" or request_id not in on_w1
    for request_id in on_w1:
        final = client.get(f"{cluster.url}/v1/requests/{request_id}").json()
        if final["attempts"] > 1:
            assert final["placement"]["worker"] == "w2"
    retried = [
        request_id
        for request_id in on_w1
        if client.get(f"{cluster.url}/v1/requests/{request_id}").json()["attempts"] > 1
    ]
    assert retried, "work that was on the killed worker ran again elsewhere"
    for request_id in accepted:
        statuses = [event["status"] for event in _trail(client, cluster.url, request_id)]
        assert sum(status in TERMINAL for status in statuses) == 1, statuses
        # One attempt at a time: every dispatch follows a return to the queue (or the start).
        for before, after in itertools.pairwise(statuses):
            if after == "dispatching":
                assert before == "queued", statuses
    assert len(client.get(f"{cluster.url}/v1/requests", params={"limit": 100}).json()["items"]) == (
        len(accepted)
    )
    deadline = time.monotonic() + 10
    while True:
        gpus = _gpus(client, cluster.url)
        if gpus["w1:0"]["health"] == "unhealthy" and gpus["w1:1"]["health"] == "unhealthy":
            break
        assert time.monotonic() < deadline, gpus
        time.sleep(0.1)
    assert not gpus["w1:0"]["schedulable"] and gpus["w2:0"]["health"] == "healthy"


def test_a_worker_back_from_the_dead_takes_work_again(
    cluster: Cluster, client: httpx.Client
) -> None:
    """A killed worker that comes back is healthy again once it answers, and gets work."""
    cluster.kill("w1")
    deadline = time.monotonic() + 10
    while _gpus(client, cluster.url)["w1:0"]["health"] != "unhealthy":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cluster.start_worker("w1")
    deadline = time.monotonic() + 10
    while not _gpus(client, cluster.url)["w1:0"]["schedulable"]:
        assert time.monotonic() < deadline, "w1 did not return to service"
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while not {"w2:0", "w2:1"} <= set(_gpus(client, cluster.url)):
        assert time.monotonic() < deadline, "w2 did not register"
        time.sleep(0.1)
    for gpu in ("w2:0", "w2:1"):  # leave w1 the only place to run
        assert client.post(f"{cluster.url}/v1/gpus/{gpu}/cordon").status_code == 200
    body = {"model": "llama-3-8b", "input": {"messages": [{"role": "user", "content": "hi"}]}}
    request = client.post(f"{cluster.url}/v1/requests", json=body).json()
    done = client.get(f"{cluster.url}/v1/requests/{request['id']}", params={"wait": 30}).json()
    assert done["status"] == "succeeded" and done["placement"]["worker"] == "w1"


@pytest.fixture
def unnamed(tmp_path: Path) -> Iterator[Cluster]:
    """A router with backends w1 and w2: one-H100 workers on this host started without --name."""
    running = Cluster(tmp_path, named=False, gpus="1xH100-80GB", slots=2)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _submit_big(client: httpx.Client, url: str, label: str, duration_s: float) -> str:
    """Submit a request for 45 GB of one GPU (an H100 holds one at a time); return its id."""
    body = {
        "model": "llama-3-8b",
        "resources": {"gpu_memory_mb": 46_080},
        "input": {
            "messages": [{"role": "user", "content": label}],
            "max_tokens": 4,
            "simulate": {"duration_s": duration_s, "peak_memory_mb": 46_080},
        },
    }
    response = client.post(f"{url}/v1/requests", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _finish(client: httpx.Client, url: str, request_ids: list[str]) -> list[dict[str, Any]]:
    """The requests once terminal (each waited on for 30 s at most)."""
    return [
        client.get(f"{url}/v1/requests/{request_id}", params={"wait": 30}).json()
        for request_id in request_ids
    ]


def test_workers_named_unlike_their_backends_run_work_and_fail_over(
    unnamed: Cluster, client: httpx.Client
) -> None:
    """Unnamed workers on one host run work placed by backend name, and fail over when killed."""
    names = {
        name: httpx.get(f"{unnamed.worker_url(name)}/healthz", timeout=5).json()["worker"]
        for name in ("w1", "w2")
    }
    assert names["w1"] != names["w2"], names
    assert all(names[name].endswith(f"-{unnamed.ports[name]}") for name in names), names
    assert set(_gpus(client, unnamed.url)) == {"w1:0", "w2:0"}

    first = [_submit_big(client, unnamed.url, f"first {index}", 0.5) for index in range(4)]
    done = _finish(client, unnamed.url, first)
    assert [request["status"] for request in done] == ["succeeded"] * 4, json.dumps(done)
    assert {request["placement"]["gpu_id"] for request in done} == {"w1:0", "w2:0"}
    for gpu in ("w1:0", "w2:0"):  # 45 GB each: an H100 runs them one after the other
        runs = sorted(
            (request["started_at"], request["finished_at"])
            for request in done
            if request["placement"]["gpu_id"] == gpu
        )
        assert all(ended <= began for (_, ended), (began, _) in itertools.pairwise(runs)), runs

    second = [_submit_big(client, unnamed.url, f"second {index}", 1.0) for index in range(4)]
    deadline = time.monotonic() + 10
    while True:
        running = [
            request
            for request in client.get(f"{unnamed.url}/v1/requests", params={"limit": 100}).json()[
                "items"
            ]
            if request["id"] in second
            and request["status"] == "running"
            and request["placement"]["gpu_id"] == "w1:0"
        ]
        if running:
            break
        assert time.monotonic() < deadline, "nothing of the second batch ran on w1"
        time.sleep(0.05)
    unnamed.kill("w1")
    done = _finish(client, unnamed.url, second)
    assert [request["status"] for request in done] == ["succeeded"] * 4, json.dumps(done)
    moved = {request["id"]: request for request in done}[running[0]["id"]]
    assert moved["placement"]["gpu_id"] == "w2:0" and moved["attempts"] > 1, json.dumps(moved)
    deadline = time.monotonic() + 10
    while _gpus(client, unnamed.url)["w1:0"]["health"] != "unhealthy":
        assert time.monotonic() < deadline, "the killed worker's GPU did not turn unhealthy"
        time.sleep(0.1)
    assert _gpus(client, unnamed.url)["w2:0"]["health"] == "healthy"

"""`gpurouter serve` on SQLite, killed with SIGKILL under load and restarted: nothing is lost.

``GPUROUTER_CHAOS_KILLS`` sets how many kills a run makes: 2 in ``make test``; the 20-kill run
quoted in docs/deployment.md is ``GPUROUTER_CHAOS_KILLS=20 pytest -s --timeout 1500`` on this
file, which prints its tally. The load is open-loop, faster than the two GPUs serve, so a long
run fills the queue: a client told 503 (a full queue, a router starting) retries by its
idempotency key after ``Retry-After``, as a real one would.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from routers import KEY, loaded_config

from gpu_request_router.testing import free_port

KILLS = int(os.environ.get("GPUROUTER_CHAOS_KILLS", "2"))
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}
ALLOWED = {
    None: {"queued"},
    "queued": {"dispatching", "cancelled", "expired"},
    "dispatching": {"running", "queued", "failed", "cancelled", "expired"},
    "running": {"succeeded", "failed", "queued", "cancelled", "expired"},
}


def _gpurouter() -> str:
    return str(Path(sys.executable).parent / "gpurouter")


class Router:
    """A `gpurouter serve` process on a config and database in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = loaded_config(
            self.port,
            {"backend": "sqlite", "sqlite_path": str(workdir / "router.db")},
            backends=[
                {
                    "name": "sim",
                    "kind": "simulated",
                    "gpus": [{"type": "H100-80GB", "count": 2}],
                    "slots_per_gpu": 4,
                }
            ],
            monitor={"poll_interval_s": 0.1, "stale_after_s": 5},
            logging={"level": "warning"},
        )
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.workdir / "router.log").open("ab") as log:
            self.process = subprocess.Popen(
                [_gpurouter(), "serve", "--config", str(self.workdir / "config.yaml")],
                cwd=self.workdir,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, (self.workdir / "router.log").read_text()
            time.sleep(0.05)
        raise AssertionError("the router did not become ready")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class Clients:
    """Threads submitting requests with idempotency keys, recording what the router said."""

    def __init__(self, router: Router, threads: int) -> None:
        self.router = router
        self.ok: dict[str, str] = {}  # idempotency key -> request id (202 received)
        self.unknown: set[str] = set()  # keys whose submit had no answer (connection cut)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True)
            for index in range(threads)
        ]
        self.counter = 0

    def _body(self, index: int) -> dict[str, Any]:
        return {
            "model": "llama-3-8b",
            "input": {
                "messages": [{"role": "user", "content": f"request {index}"}],
                "max_tokens": 8,
                "simulate": {"duration_s": 0.05 + (index % 7) * 0.05},
            },
        }

    def _run(self, thread: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as client:
            while not self.stop.is_set():
                with self.lock:
                    self.counter += 1
                    index = self.counter
                key = f"t{thread}-{index}"
                try:
                    response = client.post(
                        f"{self.router.url}/v1/requests",
                        json=self._body(index),
                        headers={"Idempotency-Key": key},
                    )
                except httpx.HTTPError:
                    with self.lock:
                        self.unknown.add(key)
                    time.sleep(0.05)
                    continue
                if response.status_code == 503:  # back-pressure (a full queue): not taken
                    with self.lock:
                        self.unknown.add(key)
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                    continue
                assert response.status_code == 202, response.text
                with self.lock:
                    self.ok[key] = response.json()["id"]

    def run_for(self, seconds: float) -> None:
        for thread in self.threads:
            thread.start()
        time.sleep(seconds)

    def halt(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def _trail(client: httpx.Client, url: str, request_id: str) -> list[dict[str, Any]]:
    with client.stream("GET", f"{url}/v1/requests/{request_id}/events", timeout=30) as stream:
        return [
            json.loads(line.removeprefix("data: "))
            for line in stream.iter_lines()
            if line.startswith("data: ")
        ]


def _submit_until_taken(
    client: httpx.Client, url: str, body: dict[str, Any], key: str
) -> httpx.Response:
    """Submit with ``key``, waiting out 503s (a queue full of recovered work) as told, 10 min."""
    deadline = time.monotonic() + 600
    while True:
        response = client.post(f"{url}/v1/requests", json=body, headers={"Idempotency-Key": key})
        if response.status_code != 503:
            assert response.status_code == 202, response.text
            return response
        assert response.headers.get("Retry-After"), response.text
        assert time.monotonic() < deadline, response.text
        time.sleep(float(response.headers["Retry-After"]))


def test_sigkill_under_load_loses_nothing_and_runs_nothing_twice(tmp_path: Path) -> None:
    """Every accepted request reaches exactly one terminal state across kills and restarts."""
    router = Router(tmp_path)
    router.start()
    clients = Clients(router, threads=8)
    try:
        clients.run_for(1.5)
        for kill in range(KILLS):
            router.kill()  # mid-load, then while recovered work runs
            if kill == KILLS - 1:
                clients.halt()
            router.start()
            if kill < KILLS - 1:
                time.sleep(1.0)
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=70) as client:
            # Submits whose answer was lost are retried with the same key: recovered, not doubled.
            for key in sorted(clients.unknown - set(clients.ok)):
                index = key.split("-")[1]
                response = _submit_until_taken(client, router.url, clients._body(int(index)), key)
                clients.ok[key] = response.json()["id"]
            assert len(clients.ok) > 50, "the load produced too few requests to mean much"
            assert len(set(clients.ok.values())) == len(clients.ok), "one id per key"
            for request_id in clients.ok.values():
                final = client.get(f"{router.url}/v1/requests/{request_id}", params={"wait": 60})
                assert final.json()["status"] in TERMINAL, final.json()
            for request_id in clients.ok.values():
                trail = _trail(client, router.url, request_id)
                statuses = [event["status"] for event in trail]
                assert sum(status in TERMINAL for status in statuses) == 1, statuses
                previous = None
                for event in trail:
                    assert event["from_status"] == previous, trail
                    assert event["status"] in ALLOWED[previous], trail
                    previous = event["status"]
    finally:
        clients.stop.set()
        router.stop()
    database = sqlite3.connect(tmp_path / "router.db")
    try:
        assert database.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in database.execute("SELECT id FROM requests")}
    finally:
        database.close()
    lost = set(clients.ok.values()) - stored
    unexpected = stored - set(clients.ok.values())
    duplicated = len(clients.ok) - len(set(clients.ok.values()))
    print(
        f"kills={KILLS} accepted={len(clients.ok)} retried_by_key={len(clients.unknown)} "
        f"lost={len(lost)} duplicated={duplicated} unexpected={len(unexpected)}"
    )
    assert not lost, "an accepted request is missing"
    assert not unexpected, "no request the clients do not know of"

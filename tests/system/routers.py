"""Router processes for the start-up and log tests: start, submit, wait, read what they wrote."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gpu_request_router.http.keys import hash_key
from gpu_request_router.testing import free_port

GPUROUTER = str(Path(sys.executable).parent / "gpurouter")
KEY = "startup-test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def write_config(workdir: Path, port: int, config: Mapping[str, Any] | None = None) -> Path:
    """``config``, by default one on ``port`` with JSON logs at info and SQLite in ``workdir``."""
    config = config or {
        "server": {"port": port},
        "auth": {"users": [{"name": "alice", "role": "user", "api_key_sha256": hash_key(KEY)}]},
        "state": {"backend": "sqlite", "sqlite_path": str(workdir / "router.db")},
        "backends": [
            {"name": "sim", "kind": "simulated", "gpus": [{"type": "H100-80GB", "count": 2}]}
        ],
        "monitor": {"poll_interval_s": 0.1},
        "logging": {"level": "info", "format": "json"},
    }
    path = workdir / f"router-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def loaded_config(port: int, state: Mapping[str, Any], **sections: Any) -> dict[str, Any]:
    """A router for load tests on ``port``: alice's key, no quota in the way, 2 simulated GPUs.

    ``state`` is the store's section; ``sections`` replace whole sections (backends, logging...).
    JSON logs at warning by default.
    """
    unlimited = dict.fromkeys(
        ("requests_per_minute", "max_queued", "max_concurrent", "gpu_seconds_per_hour")
    )
    return {
        "server": {"port": port},
        "auth": {"users": [{"name": "alice", "role": "user", "api_key_sha256": hash_key(KEY)}]},
        "state": dict(state),
        "quotas": {"default": unlimited},
        "backends": [
            {"name": "sim", "kind": "simulated", "gpus": [{"type": "H100-80GB", "count": 2}]}
        ],
        "monitor": {"poll_interval_s": 0.1},
        "logging": {"level": "warning", "format": "json"},
        **sections,
    }


def clean_environment() -> dict[str, str]:
    """This process's environment without the ``GPUROUTER_*`` settings a shell may carry."""
    return {name: value for name, value in os.environ.items() if not name.startswith("GPUROUTER_")}


def wait_answering(
    url: str, process: subprocess.Popen[bytes], log: Path, path: str, timeout_s: float = 20
) -> None:
    """Until ``url`` + ``path`` answers 200; fails (with the log's end) if the process ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not start: {log.read_text()[-3000:]}"
        time.sleep(0.05)


class Processes:
    """A test's named processes (routers, workers): killed one by one, stopped together."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def kill(self, name: str) -> None:
        """SIGKILL one process and reap it."""
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(10)

    def stop(self) -> None:
        """SIGTERM whatever still runs, then wait (SIGKILL what does not end in 20 s)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


class Router:
    """A `gpurouter serve` process; its stdout and stderr kept apart in ``workdir``."""

    def __init__(
        self, workdir: Path, port: int | None = None, config: Mapping[str, Any] | None = None
    ) -> None:
        """Start it on ``port`` (a free one by default) with ``config`` (:func:`write_config`).

        The process sees no ``GPUROUTER_*`` variable of the environment the tests run in.
        """
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = write_config(workdir, self.port, config)
        self.out = workdir / f"serve-{self.port}.out"
        self.err = workdir / f"serve-{self.port}.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [GPUROUTER, "serve", "--config", str(self.config)],
                cwd=workdir,
                stdout=out,
                stderr=err,
                env={**clean_environment(), "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            assert self.process.poll() is None, self.err.read_text()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the router did not become ready"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def refused_start(args: list[str], workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run a `gpurouter` start that is expected to end by itself."""
    return subprocess.run(
        [GPUROUTER, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object; fails on the first line that is not one."""
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line!r}")
        assert isinstance(event, dict), line
        events.append(event)
    return events


def submit(url: str, duration_s: float) -> str:
    """Submit a simulated request running ``duration_s``; its id."""
    body = {
        "model": "llama-3-8b",
        "input": {
            "messages": [{"role": "user", "content": "hi"}],
            "simulate": {"duration_s": duration_s},
        },
    }
    response = httpx.post(f"{url}/v1/requests", json=body, headers=HEADERS, timeout=10)
    assert response.status_code == 202, response.text
    request_id: str = response.json()["id"]
    return request_id


def wait_status(url: str, request_id: str, status: str) -> dict[str, Any]:
    """Poll the request until it has ``status`` (20 s at most)."""
    deadline = time.monotonic() + 20
    while True:
        request: dict[str, Any] = httpx.get(
            f"{url}/v1/requests/{request_id}", headers=HEADERS, timeout=10
        ).json()
        if request["status"] == status:
            return request
        assert time.monotonic() < deadline, request
        time.sleep(0.05)


def trail(db: Path, request_id: str) -> list[tuple[Any, ...]]:
    """The request's row and audit trail as stored, read without writing."""
    database = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = database.execute(
            "SELECT status, attempts, state FROM requests WHERE id = ?", (request_id,)
        ).fetchall()
        entries = database.execute(
            "SELECT seq, body FROM transitions WHERE request_id = ? ORDER BY seq", (request_id,)
        ).fetchall()
    finally:
        database.close()
    return [*row, *entries]

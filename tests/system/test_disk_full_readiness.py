"""`gpurouter serve` whose SQLite files cannot grow (a full disk): /readyz says so, and recovers.

The full disk is a file-size limit (``RLIMIT_FSIZE``) set on the running router process at the
size its write-ahead log has: every commit must append to the log, so every write fails with
an I/O error, as on a full disk, while reads still work. Lifting the limit is the disk freed.
"""

from __future__ import annotations

import os
import resource
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

from gpu_request_router.http.keys import hash_key
from gpu_request_router.testing import free_port

KEY = "disk-full-test-key"
CHAT = {"model": "llama-3-8b", "input": {"messages": [{"role": "user", "content": "hi"}]}}
WITHIN_S = 10.0  # readiness follows within a probe interval (1 s); this bounds the wait


class Router:
    """A `gpurouter serve` process on SQLite in ``workdir``, its output kept for failures."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "router.db"
        config = {
            "server": {"port": self.port},
            "auth": {"users": [{"name": "alice", "role": "user", "api_key_sha256": hash_key(KEY)}]},
            "state": {"backend": "sqlite", "sqlite_path": str(self.db)},
            "backends": [{"name": "sim", "kind": "simulated", "gpus": [{"type": "H100-80GB"}]}],
            "monitor": {"poll_interval_s": 0.1, "stale_after_s": 5},
            "logging": {"level": "warning"},
        }
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        gpurouter = str(Path(sys.executable).parent / "gpurouter")
        # Output goes to a pipe: a log file would be limited in size too.
        self.process = subprocess.Popen(
            [gpurouter, "serve", "--config", str(workdir / "config.yaml")],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.output: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
        )

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def log(self) -> str:
        """What the router printed so far."""
        return b"".join(self.output).decode(errors="replace")

    def readyz(self) -> httpx.Response:
        """One readiness check."""
        return self.client.get("/readyz")

    def until_ready(self, status: int) -> httpx.Response:
        """Poll /readyz until it answers ``status`` (at most WITHIN_S seconds); return it."""
        deadline = time.monotonic() + WITHIN_S
        while True:
            try:
                response = self.readyz()
                if response.status_code == status:
                    return response
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"/readyz never answered {status}\n{self.log()}"
            time.sleep(0.05)

    def limit_file_size(self, limit: int) -> None:
        """Set the process's file-size limit (soft) to ``limit`` bytes."""
        _, hard = resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE, (limit, hard))

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and the output reader."""
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    """A running router on a fresh SQLite file."""
    running = Router(tmp_path)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.slow
def test_readyz_is_503_while_the_disk_is_full_and_200_once_it_has_room(router: Router) -> None:
    """A full disk makes /readyz 503 without any traffic; freeing it makes it 200 again."""
    router.until_ready(200)
    accepted = router.client.post("/v1/requests", json=CHAT)
    assert accepted.status_code == 202, accepted.text
    unlimited = resource.prlimit(router.process.pid, resource.RLIMIT_FSIZE)[0]
    wal = Path(f"{router.db}-wal")
    router.limit_file_size(wal.stat().st_size)

    not_ready: dict[str, Any] = router.until_ready(503).json()
    assert not_ready["status"] == "not ready"
    assert "disk I/O error" in not_ready["checks"]["store"], not_ready
    assert not_ready["checks"]["gpus"] == "1 known"
    refused = router.client.post("/v1/requests", json=CHAT)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"]
    assert router.client.get(f"/v1/requests/{accepted.json()['id']}").status_code == 200
    assert router.readyz().status_code == 503

    router.limit_file_size(unlimited)
    ready = router.until_ready(200).json()
    assert ready == {"status": "ready", "checks": {"store": "ok", "gpus": "1 known"}}
    assert router.client.post("/v1/requests", json=CHAT).status_code == 202

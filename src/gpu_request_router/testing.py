"""Helpers for testing the router and integrations built on it: settings, readings, submissions.

They build real objects (no mocks): an :class:`Engine` on a memory store, GPU readings as a
monitoring source would report them, chat submissions with ``simulate`` overrides.

Example::

    settings = make_settings(gpus=[("H100-80GB", 2)])
    engine = Engine.build(settings, store=MemoryStore(), seed=1)
    engine.router.readings(readings_for(settings), now=0.0, worker="sim")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from gpu_request_router.config.config_loader import Settings, load_settings
from gpu_request_router.core.request_receiver import Submission
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading
from gpu_request_router.models.gpu_types import gpu_type
from gpu_request_router.models.request import ResourceHints, Shape, Task

__all__ = [
    "HEADLESS_CHROMIUM_ARGS",
    "REDIS_TEST_URL",
    "UNLIMITED_QUOTA",
    "RedisServer",
    "chat",
    "drop_redis_prefix",
    "free_port",
    "make_settings",
    "reading",
    "readings_for",
    "redis_prefix",
    "redis_test_url",
    "require_redis",
]

UNLIMITED_QUOTA: dict[str, Any] = {
    "requests_per_minute": None,
    "max_concurrent": None,
    "max_queued": None,
    "gpu_seconds_per_hour": None,
    "max_priority": "critical",
    "max_gpu_memory_mb": None,
}


def make_settings(
    *,
    gpus: Sequence[tuple[str, int]] = (("H100-80GB", 2),),
    slots: int = 8,
    worker: str = "sim",
    quota: dict[str, Any] | None = None,
    service: str = "fixed",
    models_loaded: Sequence[str] = (),
    **sections: Any,
) -> Settings:
    """Packaged defaults with one simulated worker and unlimited quotas unless overridden.

    The worker serves as ``service`` says, with ``models_loaded`` resident. ``sections`` are
    merged over the defaults, e.g. ``placement={"policy": "best_fit"}``.
    """
    overrides: dict[str, Any] = {
        "auth": {"enabled": False},
        "state": {"backend": "memory"},
        "quotas": {"default": {**UNLIMITED_QUOTA, **(quota or {})}},
        "backends": [
            {
                "name": worker,
                "kind": "simulated",
                "gpus": [{"type": kind, "count": count} for kind, count in gpus],
                "slots_per_gpu": slots,
                "service": service,
                "models_loaded": list(models_loaded),
            }
        ],
    }
    overrides.update(sections)
    return load_settings(overrides=overrides)


def reading(
    worker: str,
    index: int,
    kind: str = "H100-80GB",
    *,
    used_mb: int = 0,
    reserved_mb: int = 0,
    slots: int = 8,
    health: GPUHealth = GPUHealth.HEALTHY,
    **fields: Any,
) -> GPUReading:
    """A reading of GPU ``index`` of ``worker`` with the built-in memory of ``kind``."""
    return GPUReading(
        worker=worker,
        index=index,
        type=kind,
        memory_total_mb=fields.pop("memory_total_mb", gpu_type(kind).memory_mb),
        memory_used_mb=used_mb,
        memory_reserved_mb=reserved_mb,
        backend=fields.pop("backend", worker),
        slots=slots,
        health=health,
        **fields,
    )


def readings_for(settings: Settings) -> list[GPUReading]:
    """Idle readings of every GPU of the simulated backends of ``settings``."""
    result = []
    for backend in settings.backends:
        if backend.kind != "simulated":
            continue
        index = 0
        for group in backend.gpus:
            for _ in range(group.count):
                result.append(
                    reading(
                        backend.name,
                        index,
                        group.type,
                        memory_total_mb=gpu_type(group.type, group.memory_mb).memory_mb,
                        slots=backend.slots_per_gpu,
                        models=tuple(backend.models),
                    )
                )
                index += 1
    return result


def chat(
    model: str = "llama-3-8b",
    *,
    text: str = "hello",
    max_tokens: int = 16,
    priority: str | None = None,
    shape: Shape | None = None,
    resources: ResourceHints | None = None,
    timeout_s: float | None = None,
    idempotency_key: str | None = None,
    **simulate: Any,
) -> Submission:
    """A chat submission; keyword arguments beyond the named ones go to ``input.simulate``."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
    }
    if simulate:
        body["simulate"] = simulate
    return Submission(
        model=model,
        task=Task.CHAT,
        input=body,
        shape=shape,
        priority=priority,
        resources=resources or ResourceHints(),
        timeout_s=timeout_s,
        idempotency_key=idempotency_key,
    )


HEADLESS_CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
"""Flags for a headless chromium driving the dashboard on a machine without internet: no
sandbox (tests run as root), and none of the background connections it would try at start."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test or benchmark starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


REDIS_TEST_URL = "redis://127.0.0.1:6379/15"
"""The Redis the tests use unless ``REDIS_URL`` names another (SPEC §11)."""


def redis_test_url() -> str:
    """The Redis URL for tests: ``REDIS_URL``, else :data:`REDIS_TEST_URL`."""
    return os.environ.get("REDIS_URL", REDIS_TEST_URL)


def require_redis() -> str:
    """The Redis URL for tests, once it answers; else skip the test, or fail it under ``CI=true``.

    SPEC §11: CI must not pass by skipping the tests that need Redis.
    """
    import pytest  # only tests call this

    url = redis_test_url()
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {url} is unreachable under CI=true: {exc}")
        pytest.skip(f"Redis at {url} is unreachable: {exc}")
    finally:
        client.close()
    return url


def redis_prefix() -> str:
    """A key prefix no other test uses (drop its keys with :func:`drop_redis_prefix`)."""
    return f"gpurouter-test-{uuid.uuid4().hex[:12]}"


def drop_redis_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` in the Redis at ``url``; return how many."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        return len(keys)
    finally:
        client.close()


class RedisServer:
    """A private ``redis-server`` on a free loopback port, to kill and start again in tests.

    Its data lives in ``directory`` with the append-only file on (``appendfsync`` as given), so
    a start after a kill reads back what the file holds. Use as a context manager: the server
    is killed on exit.
    """

    def __init__(self, directory: Path, *, appendfsync: str = "always") -> None:
        self.directory = directory
        self.appendfsync = appendfsync
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server (on the same port and files) and return once it answers a ping."""
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                self.appendfsync,
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """``kill -9`` the server and wait for it to be gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

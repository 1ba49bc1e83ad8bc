"""Fixtures for integration tests: a real uvicorn server on loopback and HTTP clients per user.

``serve(...)`` starts the router's application (``create_app``) in a uvicorn server (httptools,
as ``gpurouter serve`` runs it) on a background thread, listening on a free port of 127.0.0.1,
and stops it (joining the thread) when the test ends, or before with :meth:`LiveServer.stop`.
Three users are configured with authentication on: ``alice`` and ``bob`` (role user) and
``root`` (admin); :meth:`LiveServer.client` gives an ``httpx`` client that presents a user's key.
``serve_app(app)`` runs any other application (a worker's) the same way.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from gpu_request_router.api.app import create_app
from gpu_request_router.api.dependencies import Service
from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.state_store import StateStore
from gpu_request_router.http.keys import hash_key
from gpu_request_router.testing import UNLIMITED_QUOTA, make_settings

KEYS = {
    "alice": "alice-key-0123456789abcdef",
    "bob": "bob-key-0123456789abcdef",
    "root": "root-key-0123456789abcdef",
}
ROLES = {"alice": "user", "bob": "user", "root": "admin"}
# Admissions are only counted against a rate limit: one this high counts them and never refuses.
DEFAULT_QUOTA: dict[str, Any] = {"requests_per_minute": 100_000}
FAST_MONITOR = {"poll_interval_s": 0.05, "stale_after_s": 2}
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 15.0


def auth_section(**extra: Any) -> dict[str, Any]:
    """Authentication on, with alice, bob (users) and root (admin) and their hashed keys."""
    return {
        **extra,
        "enabled": True,
        "users": [
            {"name": name, "role": ROLES[name], "api_key_sha256": hash_key(key)}
            for name, key in KEYS.items()
        ],
    }


def live_settings(
    *,
    user_quotas: dict[str, dict[str, Any]] | None = None,
    quotas: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    **sections: Any,
) -> Settings:
    """Settings of a live test server: auth on, fast monitoring, quotas out of the way.

    Quotas are unlimited but for a requests-per-minute limit no test reaches
    (:data:`DEFAULT_QUOTA`), so that ``usage.requests_last_minute`` counts admissions.

    ``user_quotas`` are per-user overrides (e.g. ``{"alice": {"requests_per_minute": 3}}``);
    ``quotas`` are other keys of the ``quotas`` section (e.g. ``max_queued_total``); ``server``
    is the ``server`` section; ``auth`` adds keys to the ``auth`` section (the users stay); other
    keywords go to ``make_settings``.
    """
    default = {**UNLIMITED_QUOTA, **DEFAULT_QUOTA, **(sections.pop("quota", None) or {})}
    sections["quotas"] = {"default": default, "users": user_quotas or {}, **(quotas or {})}
    if server is not None:
        sections["server"] = server
    sections.setdefault("monitor", FAST_MONITOR)
    sections.setdefault("retries", {"backoff_s": 0.02, "max_backoff_s": 0.1})
    return make_settings(auth=auth_section(**(auth or {})), **sections)


@dataclass
class LiveServer:
    """A running router: its base URL, application, settings, and clients to close at the end."""

    url: str
    app: FastAPI
    settings: Settings
    _clients: list[httpx.Client] = field(default_factory=list)
    _stop: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def service(self) -> Service:
        """The application's service object (for read-only checks of the live state)."""
        service: Service = self.app.state.service
        return service

    def headers(self, user: str | None) -> dict[str, str]:
        """The Authorization header of ``user`` (none for ``None``)."""
        return {} if user is None else {"Authorization": f"Bearer {KEYS[user]}"}

    def client(self, user: str | None = None, **options: Any) -> httpx.Client:
        """A synchronous client presenting ``user``'s key (closed when the test ends).

        ``headers`` are added to the key's; other options go to ``httpx.Client``.
        """
        options.setdefault("timeout", 30.0)
        headers = {**self.headers(user), **options.pop("headers", {})}
        client = httpx.Client(base_url=self.url, headers=headers, **options)
        self._clients.append(client)
        return client

    def listed(self, within_s: float = 1.5) -> list[dict[str, Any]]:
        """The stored requests (admin's listing), once nothing waits to be written.

        Synchronous requests (the OpenAI door) are written behind, within a second of their
        end: this waits for the router's writer to have committed everything, up to
        ``within_s``, and fails if it has not by then.
        """
        writer = self.service.runtime.writer
        deadline = time.monotonic() + within_s
        while writer.pending:
            assert time.monotonic() < deadline, f"{writer.pending} changes unwritten"
            time.sleep(0.02)
        response = self.client("root").get("/v1/requests", params={"limit": 500})
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def stop(self) -> None:
        """Close its clients and stop the server now (e.g. to start another on its SQLite file)."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        self._stop()

    def async_client(self, user: str | None = None, **options: Any) -> httpx.AsyncClient:
        """An asynchronous client presenting ``user``'s key; use it as a context manager."""
        options.setdefault("timeout", 30.0)
        headers = {**self.headers(user), **options.pop("headers", {})}
        return httpx.AsyncClient(base_url=self.url, headers=headers, **options)


class _Running:
    """One uvicorn server on a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            proxy_headers=False,  # as `gpurouter serve`: the router reads X-Forwarded-For itself
            http="httptools",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the test server stopped during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the test server did not start in time")
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(_STOP_TIMEOUT_S)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(_STOP_TIMEOUT_S)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server thread did not stop"


class _Servers:
    """The live servers one fixture started; :meth:`close` stops them all."""

    def __init__(self) -> None:
        self._running: list[tuple[_Running, LiveServer]] = []

    def start(
        self, settings: Settings | None = None, store: StateStore | None = None, **sections: Any
    ) -> LiveServer:
        """Start a live router for ``settings`` (or :func:`live_settings` of ``sections``).

        ``store`` replaces the store the settings name.
        """
        settings = settings if settings is not None else live_settings(**sections)
        app = create_app(settings, store=store, seed=1)
        runner = _Running(app)
        live = LiveServer(
            url=f"http://127.0.0.1:{runner.port}", app=app, settings=settings, _stop=runner.stop
        )
        self._running.append((runner, live))
        runner.start()
        return live

    def close(self) -> None:
        """Close every client, then stop every server and join its thread."""
        for _, live in reversed(self._running):
            live.stop()
        self._running.clear()


@pytest.fixture
def serve() -> Iterator[Callable[..., LiveServer]]:
    """A factory: ``serve(**settings)`` starts a live router and returns it; all stop at the end.

    Keywords are those of :func:`live_settings`; ``settings=`` passes ready-made settings.
    """
    servers = _Servers()
    try:
        yield servers.start
    finally:
        servers.close()


@pytest.fixture
def serve_app() -> Iterator[Callable[[FastAPI], str]]:
    """A factory: ``serve_app(app)`` runs ``app`` live on 127.0.0.1 and returns its URL."""
    running: list[_Running] = []

    def start(app: FastAPI) -> str:
        runner = _Running(app)
        running.append(runner)
        runner.start()
        return f"http://127.0.0.1:{runner.port}"

    try:
        yield start
    finally:
        for runner in reversed(running):
            runner.stop()


@pytest.fixture
def server(serve: Callable[..., LiveServer]) -> LiveServer:
    """A live router with the default test settings (two H100s, unlimited quotas)."""
    return serve()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[LiveServer]:
    """One live router for a whole module, for tests that change nothing on it.

    Tests using it must not submit requests, change GPUs or quotas, or present bad keys
    (the bad-key throttle counts per client address).
    """
    servers = _Servers()
    try:
        yield servers.start()
    finally:
        servers.close()


@pytest.fixture(scope="module")
def module_server() -> Iterator[LiveServer]:
    """One live router for a whole module that its tests may submit work to.

    For tests that look only at their own calls (not at counts or listings of all requests).
    """
    servers = _Servers()
    try:
        yield servers.start()
    finally:
        servers.close()

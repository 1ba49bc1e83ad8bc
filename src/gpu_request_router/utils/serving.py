"""Serving an application with uvicorn: the port first, the announcement last.

:func:`listen` binds the port before the application starts, so that a port in use stops a
start before the application's lifespan (the router's recovery, the worker's registration) has
changed anything. The kernel queues connections that arrive meanwhile; they are served once the
application has started. :class:`AnnouncingServer` calls its ``announce`` callback only once the
server accepts connections, so "listening" is never said of a port the process does not hold.
:class:`StandbyResponder` answers the probes on the bound port while a standby router waits for
its store.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

__all__ = ["AnnouncingServer", "StandbyResponder", "listen"]


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` and listening, as uvicorn would bind it.

    Raises:
        OSError: the address is in use, not available on this host, or not permitted.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class AnnouncingServer(uvicorn.Server):
    """A uvicorn server that calls ``announce`` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[], None]) -> None:
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start the application, then serve the sockets, then announce."""
        await super().startup(sockets=sockets)
        self.announce()


class StandbyResponder:
    """Answers on a bound socket while the router waits to take over as a standby.

    Probes get real answers — ``/healthz`` 200 (the process is alive: ``"status": "standby"``),
    ``/readyz`` 503 — and every other call 503 with ``Retry-After``, so that a load balancer
    and a liveness probe treat the standby as alive but not ready. Each connection gets one
    answer and is closed. Leaving the context stops the thread and leaves the socket, still
    listening, to the server that follows; connections that arrive meanwhile wait in the
    kernel's queue.
    """

    _POLL_S = 0.1
    _READ_S = 2.0
    _READ_LIMIT = 16 * 1024
    _IN_FLIGHT = 64

    def __init__(self, sock: socket.socket, reason: str) -> None:
        self._sock = sock
        self._reason = reason
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(self._IN_FLIGHT)
        self._thread = threading.Thread(target=self._serve, name="gpurouter-standby", daemon=True)

    def __enter__(self) -> StandbyResponder:
        self._sock.settimeout(self._POLL_S)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._POLL_S * 10)  # the accept loop; answers finish alone
        self._sock.settimeout(None)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:  # too many files, a connection reset before accept: go on
                self._stop.wait(self._POLL_S)
                continue
            # One thread per connection, so a slow client holds up only its own answer; at most
            # _IN_FLIGHT at once (more are closed unanswered).
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._answer_closing, args=(conn,), daemon=True).start()

    def _answer_closing(self, conn: socket.socket) -> None:
        try:
            with conn, contextlib.suppress(OSError):
                self._answer(conn)
        finally:
            self._slots.release()

    def _answer(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self._READ_S  # for the whole request head, not per read
        head = b""
        while b"\r\n\r\n" not in head and len(head) < self._READ_LIMIT:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(left)
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
        conn.settimeout(self._READ_S)
        body: dict[str, object]
        line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        path = line[1].split("?", 1)[0] if len(line) >= 2 else ""
        if path == "/healthz":
            status, body = "200 OK", {"status": "standby", "store": self._reason}
        elif path == "/readyz":
            body = {"status": "not ready", "checks": {"store": self._reason}}
            status = "503 Service Unavailable"
        else:
            status = "503 Service Unavailable"
            body = {
                "type": "/problems/standby",
                "title": "Service Unavailable",
                "status": 503,
                "detail": self._reason,
            }
        payload = json.dumps(body).encode()
        kind = "application/problem+json" if "detail" in body else "application/json"
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(payload)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n".encode()
            + payload
        )

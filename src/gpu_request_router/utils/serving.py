"""Serving an application with uvicorn: the port first, the announcement last.

:func:`listen` binds the port before the application starts, so that a port in use stops a
start before the application's lifespan (the router's recovery, the worker's registration) has
changed anything. The kernel queues connections that arrive meanwhile; they are served once the
application has started. :class:`AnnouncingServer` calls its ``announce`` callback only once the
server accepts connections, so "listening" is never said of a port the process does not hold.
:class:`StandbyResponder` answers the probes on the bound port while a standby router waits for
its store. :class:`Supervisor` runs several router processes on one bound port.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog
import uvicorn

__all__ = ["RESTART_S", "AnnouncingServer", "StandbyResponder", "Supervisor", "listen"]

_log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1  # prctl(2)

# A router's exit status when another took over its work (its store is fenced): it must be
# started again to serve (as a new router, or a standby), and a supervisor always restarts it.
EXIT_FENCED = 3

RESTART_S = 1.0
"""The pause before a child process that exited is started again."""

FAILED_START_S = 10.0
"""A child that fails within this long of its start stops them all: its start cannot succeed."""


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
    """A uvicorn server that calls ``announce`` once it accepts connections.

    ``stop_when`` is asked every second: a reason (not ``None``) stops the server gracefully,
    and stays in ``stopped_because``.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        announce: Callable[[], None],
        stop_when: Callable[[], str | None] = lambda: None,
    ) -> None:
        super().__init__(config)
        self.announce = announce
        self.stop_when = stop_when
        self.stopped_because: str | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start the application, then serve the sockets, then announce."""
        await super().startup(sockets=sockets)
        self.announce()

    async def on_tick(self, counter: int) -> bool:
        """Each tick of the server (0.1 s); once a second, whether to stop by ``stop_when``."""
        if counter % 10 == 0 and self.stopped_because is None:
            self.stopped_because = self.stop_when()
            if self.stopped_because is not None:
                _log.error("router_stopping", reason=self.stopped_because)
                self.should_exit = True
        return await super().on_tick(counter)


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


def _stop_with_parent(parent: int) -> None:
    """In a forked child: be sent SIGTERM when ``parent`` dies (Linux), or end if it already has.

    A supervisor killed outright (SIGKILL, OOM) must not leave its routers serving, unsupervised,
    on its port.
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request above took effect
        os._exit(0)


class Supervisor:
    """Runs ``count`` child processes of ``target`` (forked) and keeps them running.

    The children inherit what the parent holds, the listening socket among them: the kernel
    spreads the connections over them. SIGTERM or SIGINT to the supervisor is passed on to every
    child (each stops gracefully), and :meth:`run` returns once all have exited. A child that
    exits otherwise (killed, crashed, fenced) is started again after :data:`RESTART_S`, unless it
    exited with an error status other than :data:`EXIT_FENCED` within :data:`FAILED_START_S` of
    its start (a refused start: a store that cannot be used): then the others are stopped too
    and its exit status returned.
    """

    def __init__(self, count: int, target: Callable[[], None]) -> None:
        self.count = count
        self.target = target
        self._children: dict[int, tuple[int, float]] = {}  # pid: (slot, started)
        self._stopping = False
        self._status = 0

    def run(self) -> int:
        """Start the children and supervise them until they have all exited; the exit status."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in range(self.count):
                self._spawn(slot)
            while self._children:
                pid, status = os.wait()
                slot, started = self._children.pop(pid, (-1, 0.0))
                code = os.waitstatus_to_exitcode(status)
                if self._stopping or slot < 0:
                    continue
                failed = code > 0 and code != EXIT_FENCED
                if failed and time.monotonic() - started < FAILED_START_S:
                    _log.error("worker_failed_to_start", slot=slot, pid=pid, exit_code=code)
                    self._status = code
                    self._stop(signal.SIGTERM, None)
                    continue
                _log.warning("worker_exited", slot=slot, pid=pid, exit_code=code)
                time.sleep(RESTART_S)
                if not self._stopping:
                    self._spawn(slot)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self._status

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _spawn(self, slot: int) -> None:
        # A stop arriving between the fork and the child's record (or before the child has its
        # own handlers) would miss the child: both wait for it until then.
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        supervisor = os.getpid()
        pid = os.fork()
        if pid:
            self._children[pid] = (slot, time.monotonic())
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            return
        _stop_with_parent(supervisor)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        code = 0
        try:
            self.target()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # the child's end: report it as its exit status
            exit_code = getattr(exc, "exit_code", None)  # click's Exit (a refused start)
            if isinstance(exit_code, int):
                code = exit_code
            else:
                _log.exception("worker_crashed", slot=slot)
                code = 1
        finally:
            os._exit(code)

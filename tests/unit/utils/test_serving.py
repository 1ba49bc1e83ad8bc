"""The standby's answers on its bound port: probes, refusals, slow clients, the hand-over."""

from __future__ import annotations

import socket
import time

import httpx

from gpu_request_router.utils.serving import StandbyResponder, listen

REASON = "standby: another router holds Redis prefix 'p'"


def test_probes_and_calls_get_their_answers_while_a_slow_client_waits() -> None:
    """Probes and calls are answered at once although a client sent one byte and stalled.

    /healthz 200 standby, /readyz 503 with the reason, any call 503 with Retry-After.
    """
    sock = listen("127.0.0.1", 0, 16)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with StandbyResponder(sock, REASON):
            slow = socket.create_connection(sock.getsockname())
            slow.sendall(b"G")
            started = time.monotonic()
            health = httpx.get(f"{url}/healthz", timeout=2)
            assert time.monotonic() - started < 1.0
            assert (health.status_code, health.json()) == (
                200,
                {"status": "standby", "store": REASON},
            )
            ready = httpx.get(f"{url}/readyz?verbose=1", timeout=2)
            assert ready.status_code == 503
            assert ready.json()["checks"]["store"] == REASON
            call = httpx.post(f"{url}/v1/requests", json={"model": "m"}, timeout=2)
            assert (call.status_code, call.headers["Retry-After"]) == (503, "1")
            assert call.headers["content-type"] == "application/problem+json"
            assert call.json()["detail"] == REASON
            slow.close()
        # Handed over: still listening, blocking again, a connection waits in the queue.
        assert sock.gettimeout() is None
        waiting = socket.create_connection(sock.getsockname())
        conn, _ = sock.accept()
        conn.close()
        waiting.close()
    finally:
        sock.close()

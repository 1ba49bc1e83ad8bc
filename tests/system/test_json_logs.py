"""With `logging.format: json`, every line a server writes to stderr is JSON, tracebacks too.

Real `gpurouter serve` and `gpurouter worker` processes are provoked into logging through the
standard library (uvicorn's warning on a malformed request, asyncio's "Task exception was never
retrieved"); stdout carries only the start banner, which is for the person who started it.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from routers import GPUROUTER, Router, json_lines, submit, wait_status

from gpu_request_router.testing import free_port


def send_garbage(port: int) -> bytes:
    """Send bytes that are not HTTP to ``port``; what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"\x00\x01 this is not HTTP\r\n\r\n")
        return connection.recv(4096)


def wait_for_line(path: Path, text: str) -> None:
    """Wait until ``text`` appears in the file at ``path`` (20 s at most)."""
    deadline = time.monotonic() + 20
    while text not in path.read_text():
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


def test_router_stderr_is_json_through_a_refused_commit_traceback(tmp_path: Path) -> None:
    """Uvicorn's warnings and a commit the store refuses, with its traceback, are JSON lines.

    Another program writes the audit entry the router is about to write (behind the owner's
    lock, which SQLite itself does not check): the router's commit at the end of the execution
    collides with it. The writer logs the traceback, drops that one change, and serves on.
    """
    router = Router(tmp_path)
    try:
        router.wait_ready()
        request_id = submit(router.url, duration_s=3.0)
        wait_status(router.url, request_id, "running")
        database = sqlite3.connect(tmp_path / "router.db", timeout=10)
        try:
            with database:
                (seq,) = database.execute(
                    "SELECT max(seq) FROM transitions WHERE request_id = ?", (request_id,)
                ).fetchone()
                database.execute(
                    "INSERT INTO transitions (request_id, seq, body) VALUES (?, ?, '{}')",
                    (request_id, seq + 1),
                )
        finally:
            database.close()
        assert send_garbage(router.port).startswith(b"HTTP/1.1 400")
        wait_for_line(router.err, "changes_dropped")
        after = submit(router.url, duration_s=0.1)
        assert wait_status(router.url, after, "succeeded")["attempts"] == 1
    finally:
        router.stop()
    events = json_lines(router.err.read_text())
    (refused,) = [event for event in events if event["event"] == "commit_refused"]
    assert refused["level"] == "error"
    assert refused["exception"][0]["exc_type"] == "IntegrityError"
    assert refused["exception"][0]["frames"], "the traceback is in the JSON"
    (dropped,) = [event for event in events if event["event"] == "changes_dropped"]
    assert dropped["request_ids"] == [request_id]
    garbage = [event for event in events if event["event"] == "Invalid HTTP request received."]
    assert [(event["logger"], event["level"]) for event in garbage] == [
        ("uvicorn.error", "warning")
    ]
    assert router.out.read_text().splitlines() == [
        f"gpu-request-router listening on {router.url} (API docs: {router.url}/docs)"
    ]


def test_worker_stderr_is_json(tmp_path: Path) -> None:
    """A worker's uvicorn lines, a malformed request's warning among them, are JSON lines."""
    port = free_port()
    (tmp_path / "worker.yaml").write_text(
        yaml.safe_dump({"logging": {"level": "info", "format": "json"}})
    )
    out, err = tmp_path / "worker.out", tmp_path / "worker.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        worker = subprocess.Popen(
            [
                GPUROUTER,
                "worker",
                "--config",
                str(tmp_path / "worker.yaml"),
                "--simulate",
                "1xH100-80GB",
                "--name",
                "w1",
                "--port",
                str(port),
            ],
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert worker.poll() is None, err.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        assert send_garbage(port).startswith(b"HTTP/1.1 400")
        wait_for_line(err, "Invalid HTTP request received.")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
    events: list[dict[str, Any]] = json_lines(err.read_text())
    loggers = {event.get("logger") for event in events}
    assert "uvicorn.error" in loggers
    assert any(event["event"] == "Invalid HTTP request received." for event in events)
    (banner,) = out.read_text().splitlines()
    assert banner.startswith(f"gpurouter worker w1 listening on http://127.0.0.1:{port}")

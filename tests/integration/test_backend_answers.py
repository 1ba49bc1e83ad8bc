r"""Answers that JSON cannot carry back out never break a read (SPEC §5, §6).

A lone surrogate (``"\ud800"``), a number that is not finite or nesting hundreds of levels deep
is refused where it would enter: in a request's input at submit (422, nothing stored), in a
backend's answer when it is received (the attempt fails with ``backend_error``), whichever
backend gave it — the simulated one, a real ``gpurouter worker`` or an OpenAI-compatible server.
What an older version stored before these checks reads back repaired. Every test goes through
the real HTTP API, most on a real SQLite file and across a restart of the router on it.
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
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

from gpu_request_router.testing import free_port

if TYPE_CHECKING:
    from conftest import LiveServer

Serve = Callable[..., "LiveServer"]

GPUROUTER = str(Path(sys.executable).parent / "gpurouter")
CALLABLES_DIR = Path(__file__).resolve().parents[1] / "unit" / "worker"  # worker_callables
TERMINAL = {"succeeded", "failed", "cancelled", "expired"}
LONE = "\\ud800"  # as it is written inside a JSON string
DEEP = "[" * 900 + "0" + "]" * 900


def chat_input(simulate: str | None = None) -> str:
    """The JSON text of a chat input; ``simulate`` is the JSON text of ``simulate.output``."""
    extra = (
        "" if simulate is None else f', "simulate": {{"duration_s": 0.01, "output": {simulate}}}'
    )
    return f'{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 4{extra}}}'


def submit_raw(client: httpx.Client, body: str) -> httpx.Response:
    """POST ``body`` (JSON text, sent byte for byte) to /v1/requests."""
    return client.post(
        "/v1/requests", content=body.encode(), headers={"Content-Type": "application/json"}
    )


def until_terminal(client: httpx.Client, request_id: str) -> dict[str, Any]:
    """Long-poll the request until it has finished; return it."""
    deadline = time.monotonic() + 20
    while True:
        response = client.get(f"/v1/requests/{request_id}", params={"wait": 5})
        assert response.status_code == 200, response.text
        request: dict[str, Any] = response.json()
        if request["status"] in TERMINAL:
            return request
        assert time.monotonic() < deadline, f"{request_id} did not finish"


def every_read(server: LiveServer, request_ids: list[str]) -> list[dict[str, Any]]:
    """Read each request and every list holding it, as owner and admin: all 200; the requests."""
    alice, root = server.client("alice"), server.client("root")
    found = []
    for client in (alice, root):
        for path in ("/v1/requests", "/v1/requests?status=succeeded&status=failed"):
            listed = client.get(path)
            assert listed.status_code == 200, listed.text
            assert {item["id"] for item in listed.json()["items"]} >= set(request_ids)
        for request_id in request_ids:
            response = client.get(f"/v1/requests/{request_id}")
            assert response.status_code == 200, response.text
            found.append(response.json())
            events = client.get(f"/v1/requests/{request_id}/events")
            assert events.status_code == 200, events.text
    return found[: len(request_ids)]


def sqlite_state(tmp_path: Path) -> dict[str, Any]:
    """The ``state`` section of a router on a SQLite file in ``tmp_path``."""
    return {"backend": "sqlite", "sqlite_path": str(tmp_path / "router.db")}


# Inputs the router can never answer: refused at submit, on every route ---------------------


@pytest.mark.parametrize(
    "output", [f'"{LONE}"', f'{{"text": "{LONE}"}}', DEEP], ids=["lone", "lone-in-object", "deep"]
)
def test_an_unanswerable_simulate_output_is_refused_and_reads_survive_a_restart(
    serve: Serve, tmp_path: Path, output: str
) -> None:
    """simulate.output that JSON cannot send back is 422 at submit; every read stays 200.

    Before and after a restart of the router on the same SQLite file, on both doors.
    """
    server = serve(state=sqlite_state(tmp_path))
    alice = server.client("alice")
    good = submit_raw(alice, f'{{"model": "llama-3-8b", "input": {chat_input()}}}')
    assert good.status_code == 202, good.text
    good_id = good.json()["id"]
    refused = submit_raw(alice, f'{{"model": "llama-3-8b", "input": {chat_input(output)}}}')
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["loc"][:4] == ["body", "input", "simulate", "output"]
    chat = alice.post(
        "/v1/chat/completions",
        content=f'{{"model": "llama-3-8b", "messages": [{{"role": "user", "content": "x"}}], '
        f'"simulate": {{"output": {output}}}}}'.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert chat.status_code == 422, chat.text
    assert chat.json()["error"]["param"].startswith("simulate.output")
    assert until_terminal(alice, good_id)["status"] == "succeeded"
    assert [item["id"] for item in every_read(server, [good_id])] == [good_id]
    server.stop()

    again = serve(state=sqlite_state(tmp_path))
    assert [item["id"] for item in every_read(again, [good_id])] == [good_id]
    listed = again.client("root").get("/v1/requests").json()["items"]
    assert [item["id"] for item in listed] == [good_id], "nothing else was stored"


# What an older version stored reads back repaired ---------------------------------------------


def _tamper(database: Path, request_id: str, **state: Any) -> None:
    """Rewrite fields of a stored request's state as an older, unchecked version wrote them."""
    with sqlite3.connect(database) as db:
        (text,) = db.execute("SELECT state FROM requests WHERE id = ?", (request_id,)).fetchone()
        record = {**json.loads(text), **state}
        db.execute(
            "UPDATE requests SET state = ?, status = ? WHERE id = ?",
            (json.dumps(record, separators=(",", ":")), record["status"], request_id),
        )
        rows = db.execute(
            "SELECT seq, body FROM transitions WHERE request_id = ?", (request_id,)
        ).fetchall()
        for seq, body in rows:
            entry = {**json.loads(body), "detail": "\ud800 from an old backend"}
            db.execute(
                "UPDATE transitions SET body = ? WHERE request_id = ? AND seq = ?",
                (json.dumps(entry), request_id, seq),
            )
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _depth(value: Any) -> int:
    """Levels of arrays around the innermost value (``[[x]]``: 2)."""
    levels = 0
    while isinstance(value, list):
        value, levels = value[0], levels + 1
    return levels


def test_rows_an_older_version_stored_unchecked_read_back_repaired(
    serve: Serve, tmp_path: Path
) -> None:
    """A stored lone surrogate reads back as U+FFFD, nesting below level 64 as null: no 500.

    The rows are written as the codec writes them, as an older version stored backend answers
    without checking them; the router is then restarted on the file.
    """
    server = serve(state=sqlite_state(tmp_path))
    alice = server.client("alice")
    ids = []
    for _ in range(3):
        response = submit_raw(alice, f'{{"model": "llama-3-8b", "input": {chat_input()}}}')
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    for request_id in ids:
        assert until_terminal(alice, request_id)["status"] == "succeeded"
    server.stop()

    deep: Any = "bottom"
    for _ in range(900):
        deep = [deep]
    database = tmp_path / "router.db"
    lone, nested, failed = ids
    _tamper(database, lone, result={"text": "\ud800 and \udfff"})
    _tamper(database, nested, result=deep)
    _tamper(
        database,
        failed,
        status="failed",
        result=None,
        error={"type": "backend_error", "message": "backend error (500): \udc80"},
    )
    again = serve(state=sqlite_state(tmp_path))
    first, second, third = every_read(again, ids)
    assert first["result"] == {"text": "\ufffd and \ufffd"}
    assert _depth(second["result"]) == 64 and "bottom" not in json.dumps(second["result"])
    assert third["status"] == "failed"
    assert third["error"] == {"type": "backend_error", "message": "backend error (500): \ufffd"}
    stream = again.client("alice").get(f"/v1/requests/{lone}/events").text
    details = [json.loads(line[6:])["detail"] for line in stream.splitlines() if "data: " in line]
    assert details and set(details) == {"\ufffd from an old backend"}


# Backend answers are checked where they enter: every backend client ---------------------------


@pytest.fixture
def lone_surrogate_backend() -> Iterator[str]:
    """An OpenAI-compatible server on loopback whose chat answer holds a lone surrogate."""
    answer = (
        b'{"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "llama-3-8b",'
        b' "choices": [{"index": 0, "finish_reason": "stop",'
        b' "message": {"role": "assistant", "content": "\\ud800"}}]}'
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{backend.server_address[1]}"
    finally:
        backend.shutdown()
        backend.server_close()
        thread.join(5)


def test_an_openai_backend_answer_with_a_lone_surrogate_fails_the_call_not_the_reads(
    serve: Serve, tmp_path: Path, lone_surrogate_backend: str
) -> None:
    """Through the OpenAI door: 502 backend_error instead of a 500; the request reads back."""
    backend = {
        "name": "vllm-0",
        "kind": "openai",
        "url": lone_surrogate_backend,
        "gpu": {"type": "H100-80GB"},
        "models": ["llama-3-8b"],
    }
    server = serve(backends=[backend], state=sqlite_state(tmp_path))
    response = server.client("alice").post(
        "/v1/chat/completions",
        json={"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "backend_error" and error["type"] == "server_error"
    assert "cannot be sent back as JSON" in error["message"]
    assert "output.choices[0].message.content" in error["message"]
    (listed,) = server.listed()
    (request,) = every_read(server, [listed["id"]])
    assert request["status"] == "failed" and request["error"]["type"] == "backend_error"
    assert request["result"] is None


@pytest.fixture
def deep_worker(tmp_path: Path) -> Iterator[str]:
    """``gpurouter worker`` (one simulated H100) whose callable answers 900 levels deep."""
    port = free_port()
    config = {"worker": {"executor": "callable", "callable": "worker_callables:nested_900_deep"}}
    (tmp_path / "worker.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUROUTER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CALLABLES_DIR), env.get("PYTHONPATH")]))
    command = [GPUROUTER, "worker", "--config", str(tmp_path / "worker.yaml")]
    command += ["--simulate", "1xH100-80GB", "--port", str(port), "--name", "w1"]
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_an_agent_answer_nested_900_deep_fails_the_request_and_reads_survive_a_restart(
    serve: Serve, tmp_path: Path, deep_worker: str
) -> None:
    """A real worker's answer nested 900 deep fails the request (backend_error), not the reads."""
    backend = {"name": "w1", "kind": "agent", "url": deep_worker}
    server = serve(backends=[backend], state=sqlite_state(tmp_path))
    alice = server.client("alice")
    response = submit_raw(alice, f'{{"model": "llama-3-8b", "input": {chat_input()}}}')
    assert response.status_code == 202, response.text
    request_id = response.json()["id"]
    done = until_terminal(alice, request_id)
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "backend_error"
    assert "nest at most 64 levels" in done["error"]["message"]
    every_read(server, [request_id])
    server.stop()
    again = serve(backends=[backend], state=sqlite_state(tmp_path))
    (request,) = every_read(again, [request_id])
    assert request["status"] == "failed" and request["result"] is None

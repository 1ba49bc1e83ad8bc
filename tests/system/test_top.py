"""`gpurouter top` and `gpurouter explain` as processes, against a real `gpurouter serve`.

`top` runs under a real pseudo-terminal (``os.openpty``), sized wide enough for its tables.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from routers import GPUROUTER, HEADERS, KEY, Router, clean_environment

_COLUMNS, _ROWS = 220, 80
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _env(router: Router) -> dict[str, str]:
    """The client's environment: the router's URL and key; the terminal's size said twice.

    Rich takes ``COLUMNS`` and ``LINES`` over the terminal's own size, so any inherited value
    would win over the pseudo-terminal's: they are set to its size.
    """
    return {
        **clean_environment(),
        "GPUROUTER_URL": router.url,
        "GPUROUTER_API_KEY": KEY,
        "TERM": "xterm",
        "COLUMNS": str(_COLUMNS),
        "LINES": str(_ROWS),
    }


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    """A `gpurouter serve` process on two simulated H100s, one user (alice)."""
    started = Router(tmp_path)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


def _submit(router: Router, body: dict[str, object]) -> str:
    response = httpx.post(f"{router.url}/v1/requests", json=body, headers=HEADERS, timeout=10)
    assert response.status_code == 202, response.text
    request_id: str = response.json()["id"]
    return request_id


def _hanging(memory_mb: int) -> dict[str, object]:
    return {
        "model": "llama-3-8b",
        "input": {"messages": [{"role": "user", "content": "hi"}], "simulate": {"failure": "hang"}},
        "resources": {"gpu_memory_mb": memory_mb},
    }


def _run_in_pty(args: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run a command on a pseudo-terminal (_COLUMNS × _ROWS); return its exit code and output."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", _ROWS, _COLUMNS, 0, 0))
    process = subprocess.Popen(
        args, stdin=terminal, stdout=terminal, stderr=terminal, env=env, close_fds=True
    )
    os.close(terminal)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # the terminal closed: the process ended
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        code = process.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return code, _ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


def test_top_shows_the_gpus_and_a_submitted_request_on_a_terminal(router: Router) -> None:
    """`top --iterations 3` draws the GPU grid, a running and a queued request, then exits 0."""
    running = _submit(router, _hanging(60_000))
    _submit(router, _hanging(60_000))
    queued = _submit(router, _hanging(60_000))
    code, screen = _run_in_pty(
        [GPUROUTER, "top", "--interval", "0.2", "--iterations", "3"], _env(router), timeout_s=60
    )
    assert code == 0, screen
    assert "sim:0" in screen and "sim:1" in screen
    assert running in screen and queued in screen
    assert "usage / quota" in screen and "alice" in screen
    assert "queue wait" in screen


def test_top_ends_cleanly_on_ctrl_c(router: Router) -> None:
    """Without --iterations top runs until interrupted; SIGINT (Ctrl-C) ends it with 0, quietly."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", _ROWS, _COLUMNS, 0, 0))
    process = subprocess.Popen(
        [GPUROUTER, "top", "--interval", "0.1"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=_env(router),
        close_fds=True,
    )
    os.close(terminal)
    screen = b""
    try:
        deadline = time.monotonic() + 30
        while b"sim:1" not in screen and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                screen += os.read(controller, 65536)
        assert b"sim:1" in screen, screen
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=15)
        while select.select([controller], [], [], 0.2)[0]:
            try:
                data = os.read(controller, 65536)
            except OSError:
                break
            if not data:
                break
            screen += data
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    assert code == 0
    assert b"Traceback" not in screen and b"KeyboardInterrupt" not in screen


def test_explain_prints_the_candidates_and_json(router: Router) -> None:
    """`explain ID` names the placement and the candidates; `--json` is the API's document."""
    placed = _submit(router, _hanging(60_000))
    _submit(router, _hanging(60_000))
    waiting = _submit(router, _hanging(60_000))
    env = {**_env(router), "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [GPUROUTER, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    deadline = time.monotonic() + 10
    while True:
        document = json.loads(cli("explain", placed, "--json").stdout)
        if document["status"] == "running" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert document["placement"]["gpu_id"] in ("sim:0", "sim:1")
    assert [c["gpu_id"] for c in document["candidates"] if c["chosen"]] == [
        document["placement"]["gpu_id"]
    ]
    table = cli("explain", placed)
    assert table.returncode == 0, table.stderr
    assert "candidates weighed by balanced" in table.stdout
    assert document["placement"]["gpu_id"] in table.stdout
    queued = cli("explain", waiting)
    assert queued.returncode == 0, queued.stderr
    assert "blocked by memory" in queued.stdout and "queue position 0" in queued.stdout
    missing = cli("explain", "req_00000000000000000000000000")
    assert missing.returncode == 1 and "404" in missing.stderr

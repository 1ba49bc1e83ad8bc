"""How `gpurouter serve` and `gpurouter worker` start, or refuse to: real processes on loopback.

The order of a router's start: the SQLite file's lock, the port, recovery, then "listening". A
refused start exits non-zero with one log line saying why, and changes nothing.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from routers import (
    HEADERS,
    Router,
    json_lines,
    refused_start,
    submit,
    trail,
    wait_status,
    write_config,
)

from gpu_request_router.testing import free_port


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    """A ready router on a SQLite file in ``tmp_path``."""
    running = Router(tmp_path)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_a_second_router_on_the_same_file_is_refused_and_changes_nothing(
    router: Router, tmp_path: Path
) -> None:
    """The second process exits 1 naming the file and the owner's pid; the owner's work runs on."""
    # Long enough to still run when the second process has ended, on a busy machine too.
    request_id = submit(router.url, duration_s=8.0)
    wait_status(router.url, request_id, "running")
    before = trail(tmp_path / "router.db", request_id)

    # The same config, as `make run` twice in one folder: the same file and the same port.
    second = refused_start(["serve", "--config", str(router.config)], tmp_path)

    assert second.returncode == 1, second.stderr
    assert "listening" not in second.stdout
    (refusal,) = json_lines(second.stderr)
    assert refusal["event"] == "start_refused"
    assert refusal["reason"] == "state_store_in_use"
    assert refusal["pid"] == router.process.pid
    assert refusal["path"] == str(tmp_path / "router.db")
    assert f"{tmp_path / 'router.db'} is in use" in refusal["error"]
    assert f"pid {router.process.pid}" in refusal["error"]
    after = trail(tmp_path / "router.db", request_id)
    assert after[0][:2] == ("running", 1), "the request ended before the second process did"
    assert after == before  # untouched by the second process

    done = wait_status(router.url, request_id, "succeeded")
    assert done["attempts"] == 1
    gpus = httpx.get(f"{router.url}/v1/gpus", headers=HEADERS, timeout=10).json()["items"]
    assert [gpu["memory_reserved_mb"] for gpu in gpus] == [0, 0]
    router.stop()
    events = json_lines(router.err.read_text())
    assert not [event for event in events if event["level"] in ("error", "critical")], events


def test_a_port_in_use_refuses_the_start_before_recovery(tmp_path: Path) -> None:
    """A router whose port is taken exits 1, never says listening, and recovers nothing."""
    crashed = Router(tmp_path)
    crashed.wait_ready()
    request_id = submit(crashed.url, duration_s=60.0)
    wait_status(crashed.url, request_id, "running")
    crashed.process.send_signal(signal.SIGKILL)  # leaves a running request to recover
    crashed.process.wait(10)
    before = trail(tmp_path / "router.db", request_id)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, port)
        refused = refused_start(["serve", "--config", str(config)], tmp_path)

    assert refused.returncode == 1, refused.stderr
    assert "listening" not in refused.stdout
    assert refused.stdout == ""
    (refusal,) = json_lines(refused.stderr)
    assert refusal["event"] == "start_refused"
    assert refusal["reason"] == "cannot_listen"
    assert refusal["url"] == f"http://127.0.0.1:{port}"
    assert "in use" in refusal["error"]
    # Recovery did not run: the request is still as the killed router left it.
    assert trail(tmp_path / "router.db", request_id) == before
    assert before[0][:2] == ("running", 1)


def test_a_worker_port_in_use_refuses_the_start(tmp_path: Path) -> None:
    """A worker whose port is taken exits 1 with one line saying so, and never says listening."""
    (tmp_path / "worker.yaml").write_text(yaml.safe_dump({"logging": {"format": "json"}}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = refused_start(
            [
                "worker",
                "--config",
                str(tmp_path / "worker.yaml"),
                "--simulate",
                "1xH100-80GB",
                "--port",
                str(port),
            ],
            tmp_path,
        )
    assert refused.returncode == 1, refused.stderr
    assert refused.stdout == ""
    (refusal,) = json_lines(refused.stderr)
    assert refusal["reason"] == "cannot_listen"
    assert refusal["url"] == f"http://127.0.0.1:{port}"


def test_listening_is_printed_once_the_port_answers(tmp_path: Path) -> None:
    """When the banner appears on stdout, the router already answers on its port."""
    router = Router(tmp_path)
    try:
        deadline = time.monotonic() + 20
        while "listening" not in router.out.read_text():
            assert router.process.poll() is None, router.err.read_text()
            assert time.monotonic() < deadline, "no banner"
            time.sleep(0.01)
        assert httpx.get(f"{router.url}/healthz", timeout=5).status_code == 200
        banner = router.out.read_text().splitlines()
        assert banner == [
            f"gpu-request-router listening on {router.url} (API docs: {router.url}/docs)"
        ]
        events = json_lines(router.err.read_text())
        assert [e["url"] for e in events if e["event"] == "listening"] == [router.url]
    finally:
        router.stop()


@pytest.mark.parametrize(
    ("state", "reason", "code", "words"),
    [
        (
            {"backend": "redis", "redis_url": "redis://127.0.0.1:1/0"},
            "state_store_unavailable",
            1,
            "Redis state store redis://127.0.0.1:1/0",
        ),
        ({"sqlite_path": "/nonexistent-dir/router.db"}, "state_store_unavailable", 1, "lock"),
    ],
)
def test_a_store_that_cannot_open_refuses_the_start_in_one_line(
    tmp_path: Path, state: dict[str, str], reason: str, code: int, words: str
) -> None:
    """A file that cannot be created, a Redis that does not answer: one JSON line, no banner."""
    config = write_config(tmp_path, free_port())
    settings = yaml.safe_load(config.read_text())
    settings["state"] = state
    config.write_text(yaml.safe_dump(settings))
    refused = refused_start(["serve", "--config", str(config)], tmp_path)
    assert refused.returncode == code, refused.stderr
    assert refused.stdout == ""
    (refusal,) = json_lines(refused.stderr)
    assert (refusal["event"], refusal["reason"]) == ("start_refused", reason)
    assert words in refusal["error"]

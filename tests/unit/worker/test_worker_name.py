"""The name a ``gpurouter worker`` gives itself, and so its GPU ids (``<name>:<index>``)."""

from __future__ import annotations

import re

import pytest

from gpu_request_router.config.config_loader import WorkerSettings
from gpu_request_router.worker.app import worker_name

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # what the router accepts


def test_the_configured_name_wins() -> None:
    """``worker.name`` (``--name``) is the name, as given."""
    assert worker_name(WorkerSettings(name="gpu-node-a", port=9091)) == "gpu-node-a"


def test_two_unnamed_workers_on_one_host_are_told_apart_by_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a name a worker is ``<host>-<port>``: two on one host never share a GPU id."""
    monkeypatch.setattr("socket.gethostname", lambda: "gpu-node-a.example.org")
    assert worker_name(WorkerSettings(port=9090)) == "gpu-node-a-9090"
    assert worker_name(WorkerSettings(port=9091)) == "gpu-node-a-9091"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("", "worker-9090"),
        ("._-", "worker-9090"),
        ("node 1+gpu", "node-1-gpu-9090"),
        ("a" * 300, "a" * 123 + "-9090"),
    ],
)
def test_an_odd_host_name_still_makes_a_valid_name(
    monkeypatch: pytest.MonkeyPatch, host: str, expected: str
) -> None:
    """An empty, odd or overlong host name gives a name the router accepts, port kept."""
    monkeypatch.setattr("socket.gethostname", lambda: host)
    name = worker_name(WorkerSettings(port=9090))
    assert name == expected and NAME.match(name)

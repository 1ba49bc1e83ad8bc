"""Readings from a worker's ``GET /v1/gpus``, as the router parses them."""

from __future__ import annotations

from typing import Any

import pytest

from gpu_request_router.services.gpu_monitoring import reading_from_worker


def item(**fields: Any) -> dict[str, Any]:
    """One GPU of the worker protocol, with ``fields`` changed."""
    base: dict[str, Any] = {
        "index": 0,
        "type": "H100-80GB",
        "memory_total_mb": 81559,
        "memory_used_mb": 20_000,
        "memory_reserved_mb": 18_000,
        "running": ["exe_a_1", "exe_b_2"],
    }
    base.update(fields)
    return base


def test_the_executions_a_reading_saw_are_kept() -> None:
    """The ids under ``running`` say which executions the reading's memory figures include."""
    reading = reading_from_worker(item(), "w1", "w1")
    assert reading.running == ("exe_a_1", "exe_b_2")
    assert reading.memory_reserved_mb == 18_000


def test_a_worker_that_does_not_say_leaves_running_unknown() -> None:
    """Without ``running`` the reading cannot tell (None), which is not the same as idle (())."""
    body = item()
    del body["running"]
    assert reading_from_worker(body, "w1", "w1").running is None
    assert reading_from_worker(item(running=[]), "w1", "w1").running == ()


@pytest.mark.parametrize("running", ["exe_a_1", [1, 2], {"exe_a_1": 1}])
def test_a_malformed_running_list_is_refused(running: Any) -> None:
    """Anything but a list of ids is a malformed reading, named as such."""
    with pytest.raises(ValueError, match="malformed GPU reading: running"):
        reading_from_worker(item(running=running), "w1", "w1")

"""Readings from a worker's ``GET /v1/gpus``, as the router parses them."""

from __future__ import annotations

from typing import Any

import pytest

from gpu_request_router.services.gpu_monitoring import reading_from_worker


def item(**fields: Any) -> dict[str, Any]:
    """One GPU of the worker protocol, with ``fields`` changed."""
    base: dict[str, Any] = {
        "id": "node-7-9090:0",
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


def test_the_router_names_the_gpu_by_its_worker_and_keeps_the_reported_id() -> None:
    """The GPU is ``<worker as the router knows it>:<index>``; the worker's own id is kept."""
    reading = reading_from_worker(item(index=1, id="node-7-9090:1"), "w1", "w1")
    assert reading.gpu_id == "w1:1"
    assert reading.reported_id == "node-7-9090:1"


@pytest.mark.parametrize("reported", [None, "", 7, ["w:0"], "x" * 257])
def test_a_missing_or_malformed_id_is_refused(reported: Any) -> None:
    """A GPU the router could not name back to its worker is a malformed reading."""
    body = item(id=reported)
    if reported is None:
        del body["id"]
    with pytest.raises(ValueError, match="malformed GPU reading"):
        reading_from_worker(body, "w1", "w1")


@pytest.mark.parametrize(
    "field",
    [{"name": "H100\ud800"}, {"models_loaded": ["m\udc80"]}, {"temperature_c": float("nan")}],
    ids=["lone-surrogate-name", "lone-surrogate-model", "nan"],
)
def test_a_reading_the_router_could_not_send_back_is_malformed(field: dict[str, Any]) -> None:
    """A value no JSON answer can carry makes the reading malformed, so GET /v1/gpus stays sound."""
    with pytest.raises(ValueError, match="malformed GPU reading"):
        reading_from_worker(item(**field), "w1", "w1")

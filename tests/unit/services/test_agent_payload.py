"""The body the router sends a worker in ``POST /v1/executions`` (the worker protocol)."""

from __future__ import annotations

from gpu_request_router.core.events import Dispatch
from gpu_request_router.models.request import Estimate, Placement, Request, Task
from gpu_request_router.services.ai_orchestrator import agent_payload


def dispatch() -> Dispatch:
    """Attempt 2 of a request placed on GPUs ``w1:0`` and ``w1:1`` of backend ``w1``."""
    request = Request(
        id="req_1",
        user="alice",
        model="llama-3-8b",
        task=Task.CHAT,
        priority="normal",
        estimate=Estimate(
            gpu_memory_mb=46_080,
            weights_mb=16_000,
            kv_cache_mb=30_080,
            activations_mb=0,
            duration_s={"H100-80GB": 2.0},
            gpu_count=2,
        ),
        created_at=1_000.0,
        input={"messages": [{"role": "user", "content": "hi"}]},
    )
    return Dispatch(
        request=request,
        execution_id="exe_1_2",
        attempt=2,
        backend="w1",
        placement=Placement("w1", ("w1:0", "w1:1"), "test"),
        reservations={"w1:0": 46_080, "w1:1": 40_000},
        deadline=4_600.0,
    )


def test_gpus_are_named_as_the_worker_reported_them() -> None:
    """GPU ids and reservation keys are the worker's own ids, in the placement's order."""
    reported = {"w1:0": "node-7-9090:0", "w1:1": "node-7-9090:1"}
    body = agent_payload(dispatch(), reported.__getitem__)
    assert body["gpu_ids"] == ["node-7-9090:0", "node-7-9090:1"]
    assert body["reservations"] == {"node-7-9090:0": 46_080, "node-7-9090:1": 40_000}
    assert (body["execution_id"], body["request_id"], body["attempt"]) == ("exe_1_2", "req_1", 2)
    assert body["estimate"] == {
        "gpu_memory_mb": 46_080,
        "weights_mb": 16_000,
        "duration_s": {"H100-80GB": 2.0},
    }

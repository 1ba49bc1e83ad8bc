"""Tests for the simulated GPU fleet: memory accounting, execution plans, OpenAI-shaped output."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.engine import Engine
from gpu_request_router.core.events import Dispatch, FailureKind
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading
from gpu_request_router.models.request import ResourceHints, Shape, Task
from gpu_request_router.services.simulator import (
    FAILS_AFTER,
    SimulatedFleet,
    openai_output,
    plan_execution,
)
from gpu_request_router.testing import chat, make_settings, readings_for


class Router:
    """A real engine fed idle readings of its settings' fleet, handing out dispatches."""

    def __init__(self, settings: Settings, seed: int = 1) -> None:
        self.settings = settings
        self.engine = Engine.build(settings, seed=seed)
        self.engine.router.readings(readings_for(settings), 0.0, worker="sim")
        self.now = 0.0

    def dispatch(self, submission: Submission, user: str = "u") -> Dispatch:
        """Submit and return the single dispatch the admission produced."""
        self.now += 1.0
        admission = self.engine.receiver.submit(submission, Caller(user), self.now)
        dispatches = [d for d in admission.decisions if isinstance(d, Dispatch)]
        assert len(dispatches) == 1, admission.decisions
        return dispatches[0]


def by_id(readings: list[GPUReading]) -> dict[str, GPUReading]:
    """Readings keyed by GPU id."""
    return {reading.gpu_id: reading for reading in readings}


def one_gpu() -> tuple[Router, SimulatedFleet]:
    """A router and a fleet of one H100 on worker ``sim``."""
    settings = make_settings(gpus=[("H100-80GB", 1)])
    return Router(settings), SimulatedFleet(settings.backends)


# Inventory and readings ---------------------------------------------------------------------------


def test_gpu_ids_and_real_memory_of_builtin_types() -> None:
    """GPUs are named <backend>:<index> across groups and carry the real memory of their type."""
    settings = make_settings(
        gpus=[("H100-80GB", 2), ("A100-80GB", 1), ("H200-141GB", 1), ("L4-24GB", 1)]
    )
    fleet = SimulatedFleet(settings.backends)
    assert fleet.workers == ["sim"]
    assert fleet.gpu_types == {
        "sim:0": "H100-80GB",
        "sim:1": "H100-80GB",
        "sim:2": "A100-80GB",
        "sim:3": "H200-141GB",
        "sim:4": "L4-24GB",
    }
    readings = by_id(fleet.readings("sim"))
    memory = {gpu_id: reading.memory_total_mb for gpu_id, reading in readings.items()}
    assert memory == {
        "sim:0": 81559,
        "sim:1": 81559,
        "sim:2": 81920,
        "sim:3": 143771,
        "sim:4": 23034,
    }
    for reading in readings.values():
        assert reading.memory_used_mb == 0
        assert reading.memory_reserved_mb == 0
        assert reading.health is GPUHealth.HEALTHY
        assert reading.backend == "sim"
        assert reading.slots == 8
        assert reading.utilization_pct == 0.0


def test_each_simulated_backend_is_a_worker_and_others_are_skipped() -> None:
    """Every simulated backend is its own worker; agent and openai backends have no fleet GPUs."""
    settings = make_settings(
        backends=[
            {"name": "a", "kind": "simulated", "gpus": [{"type": "L4-24GB", "count": 2}]},
            {
                "name": "b",
                "kind": "simulated",
                "gpus": [{"type": "custom", "count": 1, "memory_mb": 12345}],
                "slots_per_gpu": 3,
            },
            {"name": "remote", "kind": "agent", "url": "http://127.0.0.1:9"},
        ]
    )
    fleet = SimulatedFleet(settings.backends)
    assert fleet.workers == ["a", "b"]
    assert sorted(fleet.gpu_types) == ["a:0", "a:1", "b:0"]
    assert [r.gpu_id for r in fleet.readings("a")] == ["a:0", "a:1"]
    (custom,) = fleet.readings("b")
    assert (custom.type, custom.memory_total_mb, custom.slots) == ("custom", 12345, 3)
    assert fleet.readings("remote") == []


def test_testing_readings_match_an_idle_fleet() -> None:
    """testing.readings_for gives the readings an idle simulated fleet reports (and no others)."""
    settings = make_settings(
        backends=[
            {
                "name": "a",
                "kind": "simulated",
                "gpus": [{"type": "L4-24GB", "count": 1}, {"type": "H200-141GB", "count": 1}],
                "slots_per_gpu": 4,
                "models": ["llama-3-8b"],
            },
            {"name": "b", "kind": "simulated", "gpus": [{"type": "A100-80GB", "count": 1}]},
            {
                "name": "remote",
                "kind": "agent",
                "url": "http://127.0.0.1:9",
                "gpus": [{"type": "H100-80GB", "count": 2}],
            },
        ]
    )
    fleet = SimulatedFleet(settings.backends)

    def key(r: GPUReading) -> tuple[Any, ...]:
        return (r.gpu_id, r.type, r.memory_total_mb, r.memory_used_mb, r.slots, r.backend, r.models)

    expected = [key(r) for worker in fleet.workers for r in fleet.readings(worker)]
    assert [key(r) for r in readings_for(settings)] == expected
    assert [row[0] for row in expected] == ["a:0", "a:1", "b:0"]


def test_loaded_model_weights_count_as_used_memory() -> None:
    """Weights of models_loaded are resident on every GPU of the backend, reported as used."""
    settings = make_settings(
        backends=[
            {
                "name": "sim",
                "kind": "simulated",
                "gpus": [{"type": "H100-80GB", "count": 2}],
                "models_loaded": ["llama-3-8b"],
            }
        ]
    )
    fleet = SimulatedFleet(settings.backends, {"llama-3-8b": 15317, "qwen2.5-7b": 14540})
    for reading in fleet.readings("sim"):
        assert reading.memory_used_mb == 15317
        assert reading.memory_reserved_mb == 0
        assert reading.external_used_mb == 15317
        assert reading.models_loaded == ("llama-3-8b",)


def test_readings_reflect_running_memory_and_router_reservations() -> None:
    """A running execution shows as used memory (its peak) and as reserved memory (the router's)."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat(duration_s=1.0, peak_memory_mb=20_000))
    reserved = dispatch.reservations["sim:0"]
    assert reserved != 20_000
    plan = fleet.plan(dispatch)
    assert fleet.start(dispatch, plan) is None
    assert fleet.running(dispatch.execution_id)
    (reading,) = fleet.readings("sim")
    assert reading.memory_used_mb == 20_000
    assert reading.memory_reserved_mb == reserved
    assert reading.external_used_mb == 20_000 - reserved
    assert reading.utilization_pct is not None and reading.utilization_pct > 0
    result = fleet.finish(dispatch.execution_id, plan, 1.0)
    assert result.peak_memory_mb == 20_000
    assert result.gpu_seconds == pytest.approx(1.0)
    assert not fleet.running(dispatch.execution_id)
    (after,) = fleet.readings("sim")
    assert (after.memory_used_mb, after.memory_reserved_mb) == (0, 0)


def test_readings_feed_the_router_without_double_counting() -> None:
    """Fed back to the router, a reading of its own running work leaves the room it computed."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat(duration_s=1.0))
    monitor = router.engine.router.monitor
    room_before = monitor.gpus["sim:0"].room_mb
    assert fleet.start(dispatch, fleet.plan(dispatch)) is None
    router.engine.router.readings(fleet.readings("sim"), router.now, worker="sim")
    assert monitor.gpus["sim:0"].room_mb == room_before
    assert monitor.gpus["sim:0"].reserved_mb == dispatch.reservations["sim:0"]


# Starting and stopping executions -----------------------------------------------------------------


def test_multi_gpu_execution_holds_memory_on_every_gpu_of_its_placement() -> None:
    """A two-GPU placement holds its peak and reservation on both GPUs until it stops."""
    settings = make_settings(gpus=[("H100-80GB", 2)])
    router, fleet = Router(settings), SimulatedFleet(settings.backends)
    dispatch = router.dispatch(chat(resources=ResourceHints(gpu_count=2), peak_memory_mb=30_000))
    assert sorted(dispatch.placement.gpu_ids) == ["sim:0", "sim:1"]
    plan = fleet.plan(dispatch)
    assert fleet.start(dispatch, plan) is None
    readings = by_id(fleet.readings("sim"))
    for gpu_id in ("sim:0", "sim:1"):
        assert readings[gpu_id].memory_used_mb == 30_000
        assert readings[gpu_id].memory_reserved_mb == dispatch.reservations[gpu_id]
    result = fleet.finish(dispatch.execution_id, plan, 2.0)
    assert result.gpu_seconds == pytest.approx(4.0)
    assert all(r.memory_used_mb == 0 for r in fleet.readings("sim"))


def test_start_refuses_out_of_memory_beside_running_work_and_holds_nothing() -> None:
    """An execution whose peak does not fit beside running work gets OOM and holds nothing."""
    router, fleet = one_gpu()
    first = router.dispatch(chat(duration_s=5.0, peak_memory_mb=60_000))
    second = router.dispatch(chat(duration_s=5.0, peak_memory_mb=30_000))
    assert second.placement.gpu_ids == ("sim:0",)
    assert fleet.start(first, fleet.plan(first)) is None
    refused = fleet.start(second, fleet.plan(second))
    assert refused is not None
    assert refused.kind is FailureKind.OUT_OF_MEMORY
    assert refused.peak_memory_mb == 30_000
    assert "out of memory" in refused.message
    assert not fleet.running(second.execution_id)
    (reading,) = fleet.readings("sim")
    assert reading.memory_used_mb == 60_000
    assert reading.memory_reserved_mb == first.reservations["sim:0"]
    # Once the first one is gone the same execution fits.
    fleet.stop(first.execution_id)
    assert fleet.start(second, fleet.plan(second)) is None
    assert fleet.readings("sim")[0].memory_used_mb == 30_000


def test_multi_gpu_oom_on_one_gpu_holds_nothing_on_the_others() -> None:
    """A two-GPU execution refused on one full GPU leaves the other GPU untouched."""
    settings = make_settings(gpus=[("H100-80GB", 2)])
    router, fleet = Router(settings), SimulatedFleet(settings.backends)
    blocker = router.dispatch(chat(duration_s=5.0, peak_memory_mb=70_000))
    (busy,) = blocker.placement.gpu_ids
    pair = router.dispatch(chat(resources=ResourceHints(gpu_count=2), peak_memory_mb=20_000))
    assert fleet.start(blocker, fleet.plan(blocker)) is None
    refused = fleet.start(pair, fleet.plan(pair))
    assert refused is not None and refused.kind is FailureKind.OUT_OF_MEMORY
    readings = by_id(fleet.readings("sim"))
    (idle,) = set(readings) - {busy}
    assert readings[idle].memory_used_mb == 0
    assert readings[idle].memory_reserved_mb == 0
    assert readings[busy].memory_used_mb == 70_000
    assert not fleet.running(pair.execution_id)


def test_repeated_execution_id_is_not_started_twice() -> None:
    """Starting the same execution id again holds no more memory."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat(peak_memory_mb=10_000))
    plan = fleet.plan(dispatch)
    assert fleet.start(dispatch, plan) is None
    assert fleet.start(dispatch, plan) is None
    (reading,) = fleet.readings("sim")
    assert reading.memory_used_mb == 10_000
    assert reading.memory_reserved_mb == dispatch.reservations["sim:0"]
    assert fleet.stop(dispatch.execution_id) == ("sim:0",)
    assert fleet.readings("sim")[0].memory_used_mb == 0
    assert fleet.stop(dispatch.execution_id) == ()


def test_start_refuses_when_every_slot_is_busy() -> None:
    """A GPU running as many executions as it has slots refuses another one."""
    settings = make_settings(gpus=[("H100-80GB", 1)], slots=2)
    fleet = SimulatedFleet(settings.backends)
    router = Router(settings)
    dispatches = [router.dispatch(chat(peak_memory_mb=1000)) for _ in range(2)]
    for dispatch in dispatches:
        assert fleet.start(dispatch, fleet.plan(dispatch)) is None
    # A third dispatch from another router (the first one has no free slot left).
    extra = Router(settings, seed=2).dispatch(chat(peak_memory_mb=1000))
    assert extra.execution_id not in {d.execution_id for d in dispatches}
    refused = fleet.start(extra, fleet.plan(extra))
    assert refused is not None and refused.kind is FailureKind.BACKEND_ERROR
    assert fleet.readings("sim")[0].memory_used_mb == 2000


def test_lose_gpu_drops_it_from_readings_and_kills_its_executions() -> None:
    """A lost GPU disappears from its worker's report and its executions die with it."""
    settings = make_settings(gpus=[("H100-80GB", 2)])
    router, fleet = Router(settings), SimulatedFleet(settings.backends)
    pair = router.dispatch(chat(resources=ResourceHints(gpu_count=2), peak_memory_mb=5000))
    assert fleet.start(pair, fleet.plan(pair)) is None
    single = router.dispatch(chat(peak_memory_mb=4000))
    assert fleet.start(single, fleet.plan(single)) is None
    (single_gpu,) = single.placement.gpu_ids
    other = "sim:1" if single_gpu == "sim:0" else "sim:0"
    dead = fleet.lose_gpu(single_gpu)
    assert sorted(dead) == sorted([pair.execution_id, single.execution_id])
    assert not fleet.running(pair.execution_id)
    assert not fleet.running(single.execution_id)
    (remaining,) = fleet.readings("sim")
    assert remaining.gpu_id == other
    assert (remaining.memory_used_mb, remaining.memory_reserved_mb) == (0, 0)
    # Nothing starts on a lost GPU.
    again = router.dispatch(chat(peak_memory_mb=1000))
    moved = dataclasses.replace(
        again,
        placement=dataclasses.replace(again.placement, gpu_ids=(single_gpu,)),
        reservations={single_gpu: 1000},
    )
    refused = fleet.start(moved, fleet.plan(moved))
    assert refused is not None and refused.kind is FailureKind.UNREACHABLE
    fleet.restore_gpu(single_gpu)
    assert sorted(r.gpu_id for r in fleet.readings("sim")) == ["sim:0", "sim:1"]
    assert fleet.start(moved, fleet.plan(moved)) is None


def test_lose_gpu_spares_executions_elsewhere() -> None:
    """Losing one GPU does not touch executions that run only on other GPUs."""
    settings = make_settings(gpus=[("H100-80GB", 2)])
    router, fleet = Router(settings), SimulatedFleet(settings.backends)
    dispatch = router.dispatch(chat(peak_memory_mb=3000))
    (gpu_id,) = dispatch.placement.gpu_ids
    other = "sim:1" if gpu_id == "sim:0" else "sim:0"
    assert fleet.start(dispatch, fleet.plan(dispatch)) is None
    assert fleet.lose_gpu(other) == []
    assert fleet.running(dispatch.execution_id)
    assert by_id(fleet.readings("sim"))[gpu_id].memory_used_mb == 3000


# Plans --------------------------------------------------------------------------------------------


def test_default_plan_uses_estimate_and_reserved_memory() -> None:
    """Without simulate, an execution takes its estimated duration and its reserved memory."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat())
    plan = plan_execution(dispatch, fleet.gpu_types)
    assert plan.duration_s == pytest.approx(dispatch.request.estimate.duration_on("H100-80GB"))
    assert dict(plan.peak_memory_mb) == dict(dispatch.reservations)
    assert plan.failure is None
    assert plan.output == openai_output(dispatch.request)


def test_plan_honours_simulate_duration_memory_and_output() -> None:
    """simulate.duration_s, peak_memory_mb and output override the defaults."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat(duration_s=2.5, peak_memory_mb=12_345, output={"answer": 42}))
    plan = fleet.plan(dispatch)
    assert plan.duration_s == 2.5
    assert dict(plan.peak_memory_mb) == {"sim:0": 12_345}
    assert plan.failure is None
    assert plan.output == {"answer": 42}


def test_plan_error_failure_applies_to_every_attempt_by_default() -> None:
    """failure=error without fail_attempts fails every attempt with a backend error."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat(duration_s=1.0, failure="error"))
    for attempt in (1, 2, 7):
        plan = fleet.plan(dataclasses.replace(dispatch, attempt=attempt))
        assert plan.failure is not None
        assert plan.failure.kind is FailureKind.BACKEND_ERROR
        assert plan.duration_s == 1.0


def test_plan_failure_only_for_the_first_fail_attempts() -> None:
    """fail_attempts=2 fails attempts 1 and 2; attempt 3 runs normally."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat(failure="error", fail_attempts=2))
    kinds = [
        fleet.plan(dataclasses.replace(dispatch, attempt=attempt)).failure for attempt in (1, 2, 3)
    ]
    assert kinds[0] is not None and kinds[1] is not None
    assert kinds[2] is None


def test_plan_oom_failure_reports_the_peak() -> None:
    """failure=oom fails with OUT_OF_MEMORY carrying the peak memory it needed."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat(failure="oom", fail_attempts=1, peak_memory_mb=25_000))
    plan = fleet.plan(dispatch)
    assert plan.failure is not None
    assert plan.failure.kind is FailureKind.OUT_OF_MEMORY
    assert plan.failure.peak_memory_mb == 25_000
    second = fleet.plan(dataclasses.replace(dispatch, attempt=2))
    assert second.failure is None


def test_plan_hang_never_finishes() -> None:
    """failure=hang has no duration (and no failure): the execution never ends by itself."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat(failure="hang", fail_attempts=1))
    plan = fleet.plan(dispatch)
    assert plan.duration_s is None
    assert plan.failure is None
    assert fleet.plan(dataclasses.replace(dispatch, attempt=2)).duration_s is not None


def test_fails_after_is_a_share_of_the_duration() -> None:
    """The failure is reported after a fraction of the duration, strictly between 0 and 1."""
    assert 0 < FAILS_AFTER < 1


@pytest.mark.parametrize(
    ("simulate", "message"),
    [
        ("fast", "must be an object"),
        ({"speed": 2}, "unknown field"),
        ({"duration_s": -1}, "duration_s"),
        ({"duration_s": "1"}, "duration_s"),
        ({"duration_s": math.inf}, "duration_s"),
        ({"peak_memory_mb": True}, "peak_memory_mb"),
        ({"fail_attempts": math.nan}, "fail_attempts"),
        ({"failure": "explode"}, "failure"),
    ],
)
def test_malformed_simulate_is_a_client_error(simulate: Any, message: str) -> None:
    """A malformed simulate object plans a CLIENT_ERROR failure that start() returns at once."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(
        Submission(
            model="llama-3-8b",
            input={"messages": [{"role": "user", "content": "x"}], "simulate": simulate},
        )
    )
    plan = fleet.plan(dispatch)
    assert plan.failure is not None
    assert plan.failure.kind is FailureKind.CLIENT_ERROR
    assert message in plan.failure.message
    refused = fleet.start(dispatch, plan)
    assert refused is plan.failure
    assert not fleet.running(dispatch.execution_id)
    assert fleet.readings("sim")[0].memory_used_mb == 0


# OpenAI-shaped output ----------------------------------------------------------------------------


def test_chat_output_is_a_chat_completion() -> None:
    """Chat output has one choice per sequence, output_tokens words each, and token usage."""
    router, _ = one_gpu()
    request = router.dispatch(chat(shape=Shape(batch_size=3, input_tokens=10, output_tokens=5)))
    output = openai_output(request.request)
    assert output["object"] == "chat.completion"
    assert output["id"] == f"chatcmpl-{request.request.id}"
    assert output["model"] == "llama-3-8b"
    assert [choice["index"] for choice in output["choices"]] == [0, 1, 2]
    for choice in output["choices"]:
        assert choice["message"]["role"] == "assistant"
        assert len(choice["message"]["content"].split()) == 5
    assert output["usage"] == {"prompt_tokens": 30, "completion_tokens": 15, "total_tokens": 45}


def test_chat_output_word_count_follows_max_tokens() -> None:
    """A chat asking for 16 new tokens gets 16 words."""
    router, _ = one_gpu()
    dispatch = router.dispatch(chat(max_tokens=16))
    output = openai_output(dispatch.request)
    (choice,) = output["choices"]
    assert len(choice["message"]["content"].split()) == 16
    assert output["usage"]["completion_tokens"] == 16


def test_completion_output_is_a_text_completion() -> None:
    """A completion request answers a text_completion with max_tokens words."""
    router, _ = one_gpu()
    dispatch = router.dispatch(
        Submission(
            model="tinyllama-1.1b",
            task=Task.COMPLETION,
            input={"prompt": "Once upon a time", "max_tokens": 7},
        )
    )
    output = openai_output(dispatch.request)
    assert output["object"] == "text_completion"
    assert output["id"] == f"cmpl-{dispatch.request.id}"
    (choice,) = output["choices"]
    assert len(choice["text"].split()) == 7
    usage = output["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7


def test_embedding_output_is_a_list_of_unit_vectors() -> None:
    """An embedding request answers a list with one unit-norm vector per input."""
    router, _ = one_gpu()
    dispatch = router.dispatch(
        Submission(model="all-minilm-l6-v2", task=Task.EMBEDDING, input={"input": ["a", "b", "c"]})
    )
    output = openai_output(dispatch.request)
    assert output["object"] == "list"
    assert [item["index"] for item in output["data"]] == [0, 1, 2]
    vectors = [item["embedding"] for item in output["data"]]
    for item, vector in zip(output["data"], vectors, strict=True):
        assert item["object"] == "embedding"
        assert len(vector) > 0
        assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-5)
    assert len({tuple(vector) for vector in vectors}) == 3
    assert output["usage"]["prompt_tokens"] == output["usage"]["total_tokens"] > 0


def test_output_is_deterministic_for_the_same_request() -> None:
    """The same request gets the same answer; another request gets a different one."""
    router, _ = one_gpu()
    first = router.dispatch(chat(max_tokens=12)).request
    second = router.dispatch(chat(max_tokens=12)).request
    assert openai_output(first) == openai_output(first.snapshot())
    assert openai_output(first) != openai_output(second)
    # The same seed and submissions give the same requests, hence the same output.
    again = Router(make_settings(gpus=[("H100-80GB", 1)])).dispatch(chat(max_tokens=12)).request
    assert again.id == first.id
    assert openai_output(again) == openai_output(first)


# Shared GPUs: sharing, loading on demand, caching -------------------------------------------------

LLAMA_MB = 15_317  # llama-3-8b's weights in the built-in catalog
TINY_MB = 2_098  # tinyllama-1.1b's, derived from its architecture
QWEN_MB = 14_540  # qwen2.5-7b's


def shared_gpu(
    kind: str = "H100-80GB", models_loaded: tuple[str, ...] = (), **service: Any
) -> tuple[Router, SimulatedFleet]:
    """A router and a fleet of one shared GPU of ``kind``, with ``placement.service``."""
    settings = make_settings(
        gpus=[(kind, 1)],
        service="shared",
        models_loaded=models_loaded,
        placement={"service": service},
    )
    router = Router(settings)
    return router, SimulatedFleet.for_engine(settings, router.engine.router.estimator)


def dispatch_of(model: str, seed: int, kind: str = "H100-80GB", **simulate: Any) -> Dispatch:
    """A dispatch of ``model`` on an idle GPU ``sim:0`` (its own router, so ids differ)."""
    router = Router(make_settings(gpus=[(kind, 1)], service="shared"), seed=seed)
    return router.dispatch(chat(model, **simulate))


def test_executions_sharing_a_gpu_slow_each_other_down_and_speed_up_when_one_ends() -> None:
    """Processor sharing: each of n runs 1 + α(n − 1) times slower; the work left carries over."""
    router, fleet = shared_gpu(models_loaded=("llama-3-8b",), batch_slowdown=0.5)
    first = router.dispatch(chat(duration_s=10.0, peak_memory_mb=20_000))
    second = router.dispatch(chat(duration_s=10.0, peak_memory_mb=20_000))
    assert fleet.start(first, fleet.plan(first), 0.0) is None
    assert fleet.changed() == {first.execution_id: 10.0}
    assert fleet.start(second, fleet.plan(second), 0.0) is None
    assert fleet.changed() == {first.execution_id: 15.0, second.execution_id: 15.0}
    fleet.stop(second.execution_id, 6.0)  # 4 s of work done, 6 s left, alone again
    assert fleet.changed() == {first.execution_id: 12.0}
    assert fleet.due(second.execution_id) is None
    (reading,) = fleet.readings("sim")
    assert reading.models_loaded == ("llama-3-8b",) and reading.models_cached == ()
    assert reading.memory_used_mb == LLAMA_MB + (20_000 - LLAMA_MB)  # pinned weights once


def test_a_generic_job_is_time_sliced() -> None:
    """Jobs take turns (α = 1): two together each take twice as long."""
    router, fleet = shared_gpu()
    jobs = [
        router.dispatch(
            Submission(model="tinyllama-1.1b", task=Task.GENERIC, input={"simulate": spec})
        )
        for spec in ({"duration_s": 4.0}, {"duration_s": 4.0})
    ]
    weights = jobs[0].request.estimate.weights_mb
    load = fleet.service.load_s(weights)
    for job in jobs:
        assert fleet.start(job, fleet.plan(job), 0.0) is None
    assert fleet.changed() == {job.execution_id: pytest.approx(load + 8.0) for job in jobs}


def test_a_cold_model_loads_first_and_stays_cached_after_its_last_execution() -> None:
    """A cold model loads first and stays cached after its last execution.

    Loading takes weights ÷ bandwidth (a second execution waits for the same load); once unused
    the weights stay, listed as cached and not counted as used, and the next execution of the
    model starts at once.
    """
    router, fleet = shared_gpu(load_gb_s=1.0, batch_slowdown=0.0)
    load = LLAMA_MB * 2**20 / 1e9
    first = router.dispatch(chat(duration_s=2.0, peak_memory_mb=20_000))
    second = router.dispatch(chat(duration_s=2.0, peak_memory_mb=20_000))
    plan = fleet.plan(first)
    assert fleet.start(first, plan, 0.0) is None
    assert fleet.start(second, fleet.plan(second), 1.0) is None
    assert fleet.changed() == {
        first.execution_id: pytest.approx(load + 2.0),
        second.execution_id: pytest.approx(load + 2.0),
    }
    (loading,) = fleet.readings("sim")
    assert loading.models_loaded == ("llama-3-8b",)
    assert loading.memory_used_mb == LLAMA_MB + 2 * (20_000 - LLAMA_MB)  # weights once
    result = fleet.finish(first.execution_id, plan, load + 2.0, load + 2.0)
    assert result.load_s == pytest.approx(load)
    second_result = fleet.finish(second.execution_id, plan, load + 1.0, load + 2.0)
    assert second_result.load_s == pytest.approx(load - 1.0)
    (idle,) = fleet.readings("sim")
    assert idle.models_loaded == () and idle.models_cached == ("llama-3-8b",)
    assert idle.memory_used_mb == 0
    third = router.dispatch(chat(duration_s=2.0, peak_memory_mb=20_000))
    assert fleet.start(third, fleet.plan(third), 100.0) is None
    assert fleet.changed() == {third.execution_id: 102.0}


def test_a_load_evicts_the_least_recently_used_idle_model_only() -> None:
    """A load evicts the least recently used unused weights, and no more.

    On an L4, a third model's load evicts one cached model; what no eviction of unused weights
    can make room for is out of memory, and changes nothing.
    """
    _, fleet = shared_gpu("L4-24GB", load_gb_s=100.0)
    llama = dispatch_of("llama-3-8b", 1, "L4-24GB", duration_s=1.0, peak_memory_mb=LLAMA_MB + 500)
    tiny = dispatch_of("tinyllama-1.1b", 2, "L4-24GB", duration_s=1.0, peak_memory_mb=TINY_MB)
    for at, execution in enumerate((llama, tiny)):
        assert fleet.start(execution, fleet.plan(execution), float(at)) is None
        fleet.stop(execution.execution_id, at + 0.5)
    (reading,) = fleet.readings("sim")
    assert reading.models_cached == ("llama-3-8b", "tinyllama-1.1b")
    qwen = dispatch_of("qwen2.5-7b", 3, "L4-24GB", duration_s=1.0, peak_memory_mb=QWEN_MB + 500)
    assert fleet.start(qwen, fleet.plan(qwen), 5.0) is None
    (reading,) = fleet.readings("sim")
    assert reading.models_loaded == ("qwen2.5-7b",)
    assert reading.models_cached == ("tinyllama-1.1b",)
    again = dispatch_of("llama-3-8b", 4, "L4-24GB", duration_s=1.0, peak_memory_mb=LLAMA_MB)
    refused = fleet.start(again, fleet.plan(again), 6.0)
    assert refused is not None and refused.kind is FailureKind.OUT_OF_MEMORY
    assert not fleet.running(again.execution_id)
    assert fleet.readings("sim") == [reading]


def test_fixed_gpus_keep_the_earlier_model() -> None:
    """A fixed GPU: each execution takes its duration whatever runs beside it, weights and all."""
    settings = make_settings(gpus=[("H100-80GB", 1)])
    router = Router(settings)
    fleet = SimulatedFleet.for_engine(settings, router.engine.router.estimator)
    first = router.dispatch(chat(duration_s=3.0, peak_memory_mb=20_000))
    second = router.dispatch(chat(duration_s=5.0, peak_memory_mb=20_000))
    assert fleet.start(first, fleet.plan(first), 1.0) is None
    assert fleet.start(second, fleet.plan(second), 2.0) is None
    assert fleet.changed() == {first.execution_id: 4.0, second.execution_id: 7.0}
    (reading,) = fleet.readings("sim")
    assert reading.memory_used_mb == 40_000 and reading.models_loaded == ()
    result = fleet.finish(first.execution_id, fleet.plan(first), 3.0, 4.0)
    assert result.load_s == 0.0
    assert fleet.changed() == {}


def test_durations_by_gpu_type_pick_the_one_the_execution_runs_on() -> None:
    """``simulate.duration_s`` as an object: the duration of the GPU's type."""
    router, fleet = one_gpu()
    dispatch = router.dispatch(chat(duration_s={"H100-80GB": 2.5, "L4-24GB": 9.0}))
    assert fleet.plan(dispatch).duration_s == 2.5
    refused = fleet.plan(router.dispatch(chat(duration_s={"H100-80GB": -1}))).failure
    assert refused is not None and refused.kind is FailureKind.CLIENT_ERROR
    assert "or an object of them by GPU type" in refused.message

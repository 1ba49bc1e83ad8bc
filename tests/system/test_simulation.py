"""System tests: the real core and a simulated fleet in virtual time, and ``gpurouter demo``."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_request_router.core.events import Decision
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.models.request import (
    Request,
    RequestStatus,
    ResourceHints,
    Task,
    Transition,
)
from gpu_request_router.simulation import Simulation, SimulationReport
from gpu_request_router.testing import chat, make_settings

TERMINAL = {status.value for status in RequestStatus if status.terminal}
PRIORITIES = ("critical", "high", "normal", "normal", "normal", "low", "batch")


def mixed_submission(rng: random.Random) -> Submission:
    """One request of the mixed workload: chat, completion or embeddings, of random size."""
    priority = rng.choice(PRIORITIES)
    kind = rng.random()
    if kind < 0.7:
        model = "llama-3-8b" if kind < 0.4 else "qwen2.5-7b"
        prompt = "word " * rng.randrange(10, 400)
        return Submission(
            model=model,
            input={
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": rng.randrange(64, 1024),
            },
            priority=priority,
        )
    if kind < 0.85:
        return Submission(
            model="tinyllama-1.1b",
            task=Task.COMPLETION,
            input={
                "prompt": "Once upon a time " * rng.randrange(1, 50),
                "max_tokens": rng.randrange(64, 1024),
            },
            priority=priority,
        )
    texts = ["some text " * rng.randrange(1, 50) for _ in range(rng.randrange(1, 16))]
    return Submission(
        model="all-minilm-l6-v2", task=Task.EMBEDDING, input={"input": texts}, priority=priority
    )


def mixed_workload(sim: Simulation, count: int, span_s: float, seed: int) -> None:
    """Schedule ``count`` mixed requests from ten users as a Poisson stream over ``span_s``."""
    rng = random.Random(seed)
    at = 0.0
    for _ in range(count):
        at += rng.expovariate(count / span_s)
        sim.submit(at, mixed_submission(rng), Caller(f"user{rng.randrange(10)}"))


def flaky_workload(sim: Simulation) -> None:
    """A small workload that exercises retries (with jittered backoff), OOM growth and expiry."""
    mixed_workload(sim, 300, 120.0, seed=11)
    for index in range(12):
        failure = ("error", "oom", "hang")[index % 3]
        sim.submit(
            5.0 + 7.0 * index,
            chat(duration_s=2.0, failure=failure, fail_attempts=1, timeout_s=60),
            Caller("flaky"),
        )


def i2_watcher(sim: Simulation, violations: list[str]) -> Callable[[Request, Transition], None]:
    """A listener checking, at every status change, reservations and slots on every GPU."""
    monitor = sim.router.monitor

    def check(request: Request, change: Transition) -> None:
        for gpu in monitor.gpus.values():
            if gpu.reserved_mb > monitor.limit_mb(gpu):
                violations.append(f"{gpu.id}: {gpu.reserved_mb} MiB > {monitor.limit_mb(gpu)}")
            if len(gpu.running) > gpu.slots:
                violations.append(f"{gpu.id}: {len(gpu.running)} executions > {gpu.slots} slots")
            if sum(gpu.running.values()) != gpu.reserved_mb:
                violations.append(f"{gpu.id}: holders do not add up to {gpu.reserved_mb} MiB")

    return check


def assert_all_terminal(sim: Simulation, report: SimulationReport, submitted: int) -> None:
    """Every submission was either rejected or is recorded in a terminal status."""
    assert len(report.records) + len(report.rejections) == submitted
    assert len({record.id for record in report.records}) == len(report.records)
    assert {record.status for record in report.records} <= TERMINAL
    assert sim.router.live == {}


@pytest.mark.slow
def test_ten_thousand_requests_over_an_hour_finish_in_well_under_a_minute() -> None:
    """10,000 mixed requests over one simulated hour on 4 H100s all end, mostly succeeded, fast."""
    started = time.perf_counter()
    sim = Simulation(make_settings(gpus=[("H100-80GB", 4)]), seed=1)
    violations: list[str] = []
    sim.listeners.append(i2_watcher(sim, violations))
    mixed_workload(sim, 10_000, 3600.0, seed=1)
    report = sim.run()
    elapsed = time.perf_counter() - started

    assert elapsed < 60.0, f"the simulated hour took {elapsed:.1f} s of wall time"
    assert_all_terminal(sim, report, 10_000)
    statuses = report.by_status()
    assert statuses.get("succeeded", 0) >= 0.95 * len(report.records)
    assert 3000.0 < report.end_time < 4000.0
    assert violations == []
    # The fleet was used, all of it, by every kind of request and user.
    assert {gpu for record in report.records for gpu in record.gpu_ids} == {
        "sim:0",
        "sim:1",
        "sim:2",
        "sim:3",
    }
    assert {record.model for record in report.records} == {
        "llama-3-8b",
        "qwen2.5-7b",
        "tinyllama-1.1b",
        "all-minilm-l6-v2",
    }
    assert len({record.user for record in report.records}) == 10
    assert len({record.priority for record in report.records}) == 5
    # Busy but not overloaded: nobody waits long, and the GPUs ran many requests at once.
    waits = sorted(record.queue_wait_s for record in report.records)
    assert waits[len(waits) // 2] < 1.0
    busy_s = sum(
        record.finished_at - record.started_at
        for record in report.records
        if record.started_at is not None and record.finished_at is not None
    )
    assert busy_s / report.end_time > 4.0
    assert {gpu.reserved_mb for gpu in sim.router.monitor.gpus.values()} == {0}


def test_same_seed_gives_the_same_report_and_another_seed_other_ids() -> None:
    """Runs with equal seeds produce equal records; a different seed produces different ids."""

    def run(seed: int) -> SimulationReport:
        sim = Simulation(make_settings(gpus=[("H100-80GB", 2)]), seed=seed)
        flaky_workload(sim)
        sim.lose_gpu(60.0, "sim:1")
        sim.restore_gpu(70.0, "sim:1")
        return sim.run()

    first, second, other = run(7), run(7), run(8)
    assert first.records == second.records
    assert first.rejections == second.rejections
    assert (first.end_time, first.events) == (second.end_time, second.events)
    # The run is not trivial: it retried, grew estimates, expired and placed on both GPUs.
    retried = Counter(reason for record in first.records for reason in record.retried_after)
    assert retried["backend_error"] > 0
    assert retried["gpu_out_of_memory"] > 0
    assert "expired" in first.by_status()
    assert {gpu for record in first.records for gpu in record.gpu_ids} == {"sim:0", "sim:1"}
    assert {record.id for record in first.records}.isdisjoint(
        {record.id for record in other.records}
    )


def test_demo_output_does_not_depend_on_the_hash_seed() -> None:
    """`gpurouter demo` prints the same table in processes with different string hash seeds."""
    outputs = {
        run_demo_process(extra_env={"PYTHONHASHSEED": hash_seed}).stdout
        for hash_seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


def test_overloaded_fleet_queues_everything_and_loses_nothing() -> None:
    """With demand far above the fleet's room, requests queue, none is lost, I2 always holds."""
    sim = Simulation(make_settings(gpus=[("H100-80GB", 2)]), seed=5)
    violations: list[str] = []
    sim.listeners.append(i2_watcher(sim, violations))
    for index in range(300):
        sim.submit(
            index * 0.1,
            chat(
                duration_s=5.0,
                max_tokens=64 + index % 200,
                priority=("high", "normal", "low")[index % 3],
            ),
            Caller(f"user{index % 5}"),
        )
    report = sim.run()

    assert_all_terminal(sim, report, 300)
    assert report.rejections == []
    assert report.by_status() == {"succeeded": 300}
    assert violations == []
    # The fleet was the bottleneck: most requests waited, some for long.
    waited = [record.queue_wait_s for record in report.records if record.queue_wait_s > 1.0]
    assert len(waited) > 200
    assert max(waited) > 60.0
    # The router never over-committed: the fleet never ran out of memory.
    assert all(record.retried_after == () for record in report.records)
    assert {gpu.reserved_mb for gpu in sim.router.monitor.gpus.values()} == {0}
    # Higher priority waited less on average.
    mean_wait = {
        priority: sum(r.queue_wait_s for r in report.records if r.priority == priority) / 100
        for priority in ("high", "normal", "low")
    }
    assert mean_wait["high"] < mean_wait["normal"] < mean_wait["low"]


def test_work_on_a_lost_gpu_finishes_elsewhere() -> None:
    """A GPU lost mid-run: its running request is retried on the other GPU and succeeds."""
    sim = Simulation(make_settings(gpus=[("H100-80GB", 2)]), seed=3)
    sim.submit(0.0, chat(duration_s=20.0), Caller("alice"))
    sim.run(until=5.0)
    (request,) = sim.router.live.values()
    assert request.status is RequestStatus.RUNNING
    assert request.placement is not None
    (lost,) = request.placement.gpu_ids
    sim.lose_gpu(0.0, lost)
    report = sim.run()

    (record,) = report.records
    assert record.status == "succeeded"
    assert record.attempts == 2
    assert record.retried_after == ("worker_lost",)
    assert record.gpu_ids and lost not in record.gpu_ids
    assert record.finished_at is not None and record.finished_at >= 25.0
    assert sim.router.monitor.gpus[lost].health.value == "unhealthy"


def test_loaded_run_survives_a_lost_gpu_and_uses_it_again_once_restored() -> None:
    """Losing a GPU under load retries its work elsewhere; after restore it takes work again."""
    settings = make_settings(gpus=[("H100-80GB", 3)], placement={"policy": "least_loaded"})
    sim = Simulation(settings, seed=9)
    violations: list[str] = []
    sim.listeners.append(i2_watcher(sim, violations))
    for index in range(200):
        sim.submit(index * 0.5, chat(duration_s=4.0, max_tokens=32), Caller(f"u{index % 4}"))
    sim.lose_gpu(20.0, "sim:1")
    sim.restore_gpu(50.0, "sim:1")
    report = sim.run()

    assert_all_terminal(sim, report, 200)
    assert report.by_status() == {"succeeded": 200}
    assert violations == []
    moved = [record for record in report.records if record.retried_after == ("worker_lost",)]
    assert moved
    assert all(record.attempts == 2 and "sim:1" not in record.gpu_ids for record in moved)
    # While it was gone nothing started there; after it came back it ran work again.
    during = [r for r in report.records if r.started_at is not None and 21.0 < r.started_at < 50.0]
    assert during and all("sim:1" not in record.gpu_ids for record in during)
    assert any(
        "sim:1" in record.gpu_ids
        for record in report.records
        if record.started_at is not None and record.started_at > 52.0
    )


def test_hang_expires_at_its_deadline_in_virtual_time() -> None:
    """A hanging request expires exactly at created_at + timeout_s and frees its GPU."""
    sim = Simulation(make_settings(gpus=[("H100-80GB", 1)]), seed=1)
    sim.submit(2.0, chat(failure="hang", timeout_s=30), Caller("alice"))
    report = sim.run()
    (record,) = report.records
    assert record.status == "expired"
    assert record.error == "timeout"
    assert record.finished_at == pytest.approx(32.0)
    assert [r.memory_used_mb for r in sim.fleet.readings("sim")] == [0]


def test_scheduled_actions_can_cancel_and_errors_are_ignored() -> None:
    """An action scheduled with at() cancels a running request; a failing action changes nothing."""
    sim = Simulation(make_settings(gpus=[("H100-80GB", 1)]), seed=1)
    sim.submit(0.0, chat(duration_s=100.0), Caller("alice"))
    sim.submit(0.0, chat(duration_s=1.0), Caller("bob"))

    def cancel_alice(s: Simulation) -> list[Decision]:
        (target,) = [r for r in s.router.live.values() if r.user == "alice"]
        return s.router.cancel(target.id, s.clock.now())

    sim.at(10.0, cancel_alice)
    sim.at(11.0, lambda s: s.router.cancel("req_unknown", s.clock.now()))
    report = sim.run()
    statuses = {record.user: record for record in report.records}
    assert statuses["alice"].status == "cancelled"
    assert statuses["alice"].finished_at == pytest.approx(10.0)
    assert statuses["bob"].status == "succeeded"
    # The run ends with the last action, not when the cancelled execution would have ended.
    assert report.end_time == pytest.approx(11.0)
    assert [r.memory_used_mb for r in sim.fleet.readings("sim")] == [0]


def test_unschedulable_submissions_are_reported_as_rejections() -> None:
    """A request no GPU could ever hold is rejected at its arrival time, not recorded as run."""
    sim = Simulation(make_settings(gpus=[("L4-24GB", 2)]), seed=1)
    sim.submit(1.0, chat(), Caller("alice"))
    sim.submit(3.0, chat(resources=ResourceHints(gpu_memory_mb=30_000)), Caller("bob"))
    report = sim.run()
    (record,) = report.records
    assert (record.user, record.status) == ("alice", "succeeded")
    (rejection,) = report.rejections
    assert (rejection.at, rejection.user, rejection.reason) == (3.0, "bob", "unschedulable")


# The demo, as a user runs it ----------------------------------------------------------------------


def run_demo_process(
    *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gpu_request_router.cli demo`` in a fresh process with a wide terminal."""
    env = {**os.environ, "COLUMNS": "250", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gpu_request_router.cli", "demo", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_demo_command_prints_the_decision_table() -> None:
    """`gpurouter demo` exits 0 and shows successes, an OOM retry, an expiry and a rejection."""
    result = run_demo_process()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Simulated fleet" in out
    assert "2×H100-80GB, 2×L4-24GB" in out
    assert "succeeded" in out
    assert "retried after gpu_out_of_memory" in out
    assert "retried after backend_error" in out
    assert "expired" in out
    assert "sim:0,sim:1" in out
    rejected = [line for line in out.splitlines() if line.startswith("rejected")]
    assert len(rejected) == 1
    assert "unschedulable" in rejected[0]
    assert "15 requests accepted, 1 rejected" in out


def test_demo_command_takes_a_policy_and_refuses_an_unknown_one() -> None:
    """--policy changes the placement policy shown; an unknown policy exits 2 with the reason."""
    chosen = run_demo_process("--policy", "least_loaded")
    assert chosen.returncode == 0, chosen.stderr
    assert "policy least_loaded" in chosen.stdout
    assert "least_loaded:" in chosen.stdout
    wrong = run_demo_process("--policy", "nonsense")
    assert wrong.returncode == 2
    assert "invalid configuration" in wrong.stdout
    assert "placement.policy" in wrong.stdout


def test_run_ends_when_the_last_request_ends() -> None:
    """end_time is when the work ended, not a leftover poll or timer tick after it."""
    sim = Simulation(make_settings(gpus=[("H100-80GB", 1)]), seed=1)
    sim.submit(1.0, chat(duration_s=3.0), Caller("alice"))
    report = sim.run()
    (record,) = report.records
    assert record.finished_at == pytest.approx(4.0)
    assert report.end_time == pytest.approx(4.0)


def test_a_settled_simulation_takes_more_work() -> None:
    """After a run has drained, new submissions run in a second run, later in virtual time."""
    sim = Simulation(make_settings(gpus=[("H100-80GB", 1)]), seed=1)
    sim.submit(0.0, chat(duration_s=2.0), Caller("alice"))
    first = sim.run()
    assert first.end_time == pytest.approx(2.0)
    sim.submit(30.0, chat(duration_s=2.0), Caller("bob"))
    second = sim.run()
    assert [record.status for record in second.records] == ["succeeded", "succeeded"]
    later = second.records[1]
    assert later.user == "bob"
    assert later.created_at == pytest.approx(32.0)
    assert later.queue_wait_s < 1.5
    assert second.end_time == pytest.approx(later.finished_at)


def test_demo_command_runs_on_the_example_configuration() -> None:
    """`gpurouter demo --config examples/config.yaml` runs the workload on that file's fleet."""
    example = Path(__file__).resolve().parents[2] / "examples" / "config.yaml"
    result = run_demo_process("--config", str(example))
    assert result.returncode == 0, result.stderr
    assert "Simulated fleet" in result.stdout
    assert "succeeded" in result.stdout


def test_demo_command_refuses_a_configuration_without_simulated_backends(tmp_path: Path) -> None:
    """A configuration with only real backends exits 2 instead of simulating an empty fleet."""
    config = tmp_path / "agents.yaml"
    config.write_text(
        "backends:\n"
        "  - name: remote\n"
        "    kind: agent\n"
        "    url: http://127.0.0.1:9\n"
        "    gpus: [{type: H100-80GB, count: 1}]\n"
    )
    result = run_demo_process("--config", str(config))
    assert result.returncode == 2
    assert "simulated" in result.stdout
    assert "Simulated fleet" not in result.stdout


@pytest.mark.parametrize(("service", "cold"), [("fixed", False), ("shared", True)])
def test_the_router_expects_a_cold_start_only_where_the_fleet_loads_weights(
    service: str, cold: bool
) -> None:
    """A fixed fleet never loads weights, so no reason promises one; a shared fleet loads once."""
    simulation = Simulation(make_settings(gpus=[("H100-80GB", 2)], service=service))
    caller = Caller(user="alice")
    for at in (0.0, 60.0):
        simulation.submit(at, chat("llama-3-8b"), caller)
    first, second = sorted(simulation.run().records, key=lambda record: record.created_at)
    assert (first.status, second.status) == ("succeeded", "succeeded")
    assert ("a cold start" in first.reason) is cold, first.reason
    assert "a cold start" not in second.reason, second.reason
    estimated_s = float(first.reason.split("expected to finish in ")[1].split(" s")[0])
    assert (estimated_s > 5.0) is cold  # 15,317 MiB of weights at 1.7 GB/s load in 9.4 s

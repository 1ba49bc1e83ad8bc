"""Edge cases of the GPU state monitor that mutation testing found unchecked."""

from __future__ import annotations

from test_gpu_state_monitor import H100_MB, MARGIN, make_monitor

from gpu_request_router.models.gpu_state import GPUHealth
from gpu_request_router.testing import reading


def test_a_source_failing_before_its_first_reading_is_noted_and_a_reading_then_counts() -> None:
    """A source failing before its worker ever reported is noted; the first reading is healthy."""
    monitor = make_monitor()
    monitor.source_failed("a", 0.0)
    assert monitor.apply([reading("a", 0)], 1.0, worker="a") == []
    assert monitor.get("a:0").health is GPUHealth.HEALTHY
    assert set(monitor.schedulable) == {"a:0"}


def test_time_passing_over_a_worker_that_never_reported_loses_nothing() -> None:
    """A worker that failed before its first reading has no GPUs: time makes none of them lost."""
    monitor = make_monitor()
    monitor.apply([reading("b", 0)], 0.0, worker="b")
    monitor.source_failed("a", 0.0)
    assert monitor.refresh(1_000.0) == []
    assert set(monitor.gpus) == {"b:0"}


def test_two_thrifty_executions_ending_uncover_the_sum_of_their_excess() -> None:
    """Each ending execution that used less than it reserved adds its excess to the hidden use."""
    monitor = make_monitor()
    monitor.apply([reading("a", 0)], 0.0, worker="a")
    assert monitor.reserve("a:0", "big", 10_000)  # will use 20,000
    assert monitor.reserve("a:0", "small_1", 10_000)  # will use 5,000
    assert monitor.reserve("a:0", "small_2", 10_000)  # will use 5,000
    # The reading sees 30,000 used against 30,000 reserved: the excess and the savings net out.
    monitor.apply([reading("a", 0, used_mb=30_000, reserved_mb=30_000)], 1.0)
    monitor.release("small_1", peak_mb=5_000)
    monitor.release("small_2", peak_mb=5_000)
    # 20,000 are in use by "big" alone: its 10,000 reserved and 10,000 uncovered.
    assert monitor.get("a:0").hidden_mb == 10_000
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 20_000


def test_busy_is_the_larger_of_the_busy_slots_and_the_backends_own_load() -> None:
    """An idle GPU is 0 busy; a backend's load signal (vLLM's KV cache use) counts when larger."""
    monitor = make_monitor()
    monitor.apply([reading("a", 0, slots=4), reading("a", 1, slots=4, load=0.9)], 0.0, worker="a")
    assert (monitor.get("a:0").busy, monitor.get("a:1").busy) == (0.0, 0.9)
    monitor.reserve("a:0", "exe_1", 1_000)
    assert monitor.get("a:0").busy == 0.25

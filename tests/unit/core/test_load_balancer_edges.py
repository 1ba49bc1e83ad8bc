"""Placement cases that mutation testing found unchecked."""

from __future__ import annotations

from test_load_balancer import chosen_ids, fleet, need, place

from gpu_request_router.core.load_balancer import Chosen, LoadBalancer, NoFit, make_policy
from gpu_request_router.testing import reading


def test_balanced_prefers_healthy_over_degraded_for_an_exact_size_too() -> None:
    """An exact size also goes to a healthy GPU before a degraded one that fits tighter."""
    monitor = fleet(reading("a", 0), reading("a", 1, used_mb=50_000, temperature_c=95.0))
    assert monitor.get("a:1").health == "degraded"
    assert chosen_ids(place(monitor, need(exact=True), "balanced")) == ("a:0",)


def test_prospect_skips_a_worker_with_too_few_gpus_and_looks_at_the_next() -> None:
    """A worker with fewer GPUs than the request needs is passed over, not the end of the search."""
    monitor = fleet(reading("a", 0), reading("b", 0), reading("b", 1))
    for gpu_id in ("a:0", "b:0", "b:1"):
        assert monitor.reserve(gpu_id, f"e_{gpu_id}", 70_000)
    pair = need(40_000, gpu_count=2)
    assert isinstance(place(monitor, pair), NoFit)
    balancer = LoadBalancer(make_policy("best_fit"))
    assert balancer.prospect(pair, monitor.schedulable.values()) == ("b:0", "b:1")


def test_balanced_prefers_a_healthy_pair_over_a_roomier_pair_with_a_degraded_gpu() -> None:
    """A multi-GPU group with one degraded GPU counts as degraded and is placed on last."""
    monitor = fleet(
        reading("a", 0),
        reading("a", 1, temperature_c=95.0),
        reading("b", 0, used_mb=30_000),
        reading("b", 1, used_mb=30_000),
    )
    assert monitor.get("a:1").health == "degraded"
    assert chosen_ids(place(monitor, need(gpu_count=2), "balanced")) == ("b:0", "b:1")


def test_a_multi_gpu_placement_reason_counts_the_slots_of_all_its_gpus() -> None:
    """The reason of a two-GPU placement counts busy slots out of both GPUs' slots."""
    monitor = fleet(reading("a", 0, slots=4), reading("a", 1, slots=4))
    monitor.reserve("a:0", "exe_other", 1_000)
    result = place(monitor, need(gpu_count=2))
    assert isinstance(result, Chosen)
    assert result.reason.startswith("best_fit: leaves "), "no affinity said where none is"
    assert result.reason.endswith("1/8 slots busy"), result.reason

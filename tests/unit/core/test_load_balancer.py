"""Tests of placement: the shared filter, each policy, prospects, and that placements always fit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_request_router.config import POLICIES as CONFIG_POLICIES
from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.core.load_balancer import (
    POLICIES,
    Chosen,
    LoadBalancer,
    Need,
    NoFit,
    make_policy,
)
from gpu_request_router.models.gpu_state import GPUReading, GPUState
from gpu_request_router.models.gpu_types import gpu_type
from gpu_request_router.testing import reading

MARGIN = 1024
GIB = 1024
H100_ROOM = gpu_type("H100-80GB").memory_mb - MARGIN
L4_ROOM = gpu_type("L4-24GB").memory_mb - MARGIN
MODEL = "llama-3-8b"


def fleet(*readings: GPUReading, margin: int = MARGIN) -> GPUStateMonitor:
    """A monitor on a memory store that has taken in ``readings`` at time 0."""
    monitor = GPUStateMonitor(stale_after_s=10.0, safety_margin_mb=margin)
    monitor.apply(readings, 0.0)
    return monitor


def place(
    monitor: GPUStateMonitor,
    need: Need,
    policy: str = "best_fit",
    held: Sequence[str] = (),
    seed: int = 0,
) -> Chosen | NoFit:
    """Place ``need`` on the schedulable GPUs of ``monitor`` with a fresh ``policy``."""
    return LoadBalancer(make_policy(policy, seed)).place(need, monitor.index, held)


def chosen_ids(result: Chosen | NoFit) -> tuple[str, ...]:
    """The GPU ids of a Chosen result (failing the test on NoFit)."""
    assert isinstance(result, Chosen), result
    return result.gpu_ids


def need(memory_mb: int = 20_000, **fields: Any) -> Need:
    """A need for ``MODEL``."""
    return Need(model=MODEL, memory_mb=memory_mb, **fields)


# --- the shared filter -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_requested_gpu_type_is_respected(policy: str) -> None:
    """A need for L4 lands on the L4, whatever the policy."""
    monitor = fleet(reading("a", 0, "H100-80GB"), reading("a", 1, "L4-24GB"))
    result = place(monitor, need(1000, gpu_type="L4-24GB"), policy)
    assert chosen_ids(result) == ("a:1",)


def test_no_gpu_of_the_requested_type_is_no_fit() -> None:
    """Asking for a type the fleet lacks does not fit, though slots are free."""
    monitor = fleet(reading("a", 0, "H100-80GB"))
    assert place(monitor, need(1000, gpu_type="A100-80GB")) == NoFit(free_slots=True)


def test_only_gpus_serving_the_model_are_used() -> None:
    """A GPU whose backend does not serve the model is skipped."""
    monitor = fleet(
        reading("a", 0, models=("qwen2.5-7b",)),
        reading("b", 0, models=(MODEL, "qwen2.5-7b"), used_mb=30_000),
    )
    assert chosen_ids(place(monitor, need(), "least_loaded")) == ("b:0",)
    assert isinstance(place(fleet(reading("a", 0, models=("x",))), need()), NoFit)


def test_a_gpu_without_a_free_slot_is_skipped() -> None:
    """A full GPU takes no more work, even with memory to spare."""
    monitor = fleet(reading("a", 0, slots=1), reading("a", 1, slots=1, used_mb=40_000))
    assert monitor.reserve("a:1", "exe_0", 100)
    assert chosen_ids(place(monitor, need(), "best_fit")) == ("a:0",)


def test_a_gpu_without_room_is_skipped() -> None:
    """A GPU whose room is below the need is skipped; room exactly equal to the need fits."""
    monitor = fleet(reading("a", 0, used_mb=H100_ROOM - 999), reading("a", 1, used_mb=10_000))
    assert chosen_ids(place(monitor, need(1000), "best_fit")) == ("a:1",)
    exact = fleet(reading("a", 0, used_mb=H100_ROOM - 1000))
    result = place(exact, need(1000))
    assert chosen_ids(result) == ("a:0",)
    assert isinstance(result, Chosen)
    assert result.reservations == {"a:0": 1000}


def test_held_gpus_are_skipped() -> None:
    """GPUs held for a starving request are not offered to others."""
    monitor = fleet(reading("a", 0), reading("a", 1))
    assert chosen_ids(place(monitor, need(), held=("a:0",))) == ("a:1",)
    # Held GPUs still have free slots: the pass must go on to the request they are held for.
    assert place(monitor, need(), held=("a:0", "a:1")) == NoFit(free_slots=True)


def test_avoided_gpu_is_used_only_when_nothing_else_fits() -> None:
    """A GPU the request failed on loses to any other fitting GPU, but beats no placement."""
    monitor = fleet(reading("a", 0), reading("a", 1, used_mb=70_000))
    # best_fit would pick a:1 (tighter), but a:1 is avoided.
    assert chosen_ids(place(monitor, need(5000, avoid=frozenset({"a:1"})))) == ("a:0",)
    # a:0 is avoided and a:1 cannot hold the need: a:0 is used after all.
    assert chosen_ids(place(monitor, need(20_000, avoid=frozenset({"a:0"})))) == ("a:0",)


def test_avoided_gpu_can_complete_a_multi_gpu_group() -> None:
    """A two-GPU request on a two-GPU worker is placed even if it should avoid one of them."""
    monitor = fleet(reading("a", 0), reading("a", 1))
    result = place(monitor, need(gpu_count=2, avoid=frozenset({"a:0"})))
    assert sorted(chosen_ids(result)) == ["a:0", "a:1"]


def test_multi_gpu_group_prefers_gpus_it_does_not_avoid() -> None:
    """When avoided GPUs must fill a group, the ones not avoided are taken first."""
    monitor = fleet(reading("a", 0), reading("a", 1), reading("a", 2, used_mb=30_000))
    result = place(monitor, need(gpu_count=2, avoid=frozenset({"a:1", "a:2"})))
    ids = chosen_ids(result)
    assert "a:0" in ids
    assert len(ids) == 2


def test_weights_are_not_reserved_where_the_model_is_loaded() -> None:
    """Where the model is resident only the rest is reserved, so it fits in less room."""
    need_ = need(20_000, weights_mb=15_000)
    monitor = fleet(
        reading("a", 0, used_mb=H100_ROOM - 6000, models_loaded=(MODEL,)),
        reading("a", 1, used_mb=H100_ROOM - 6000),
    )
    result = place(monitor, need_)
    assert isinstance(result, Chosen)
    assert result.gpu_ids == ("a:0",)
    assert result.reservations == {"a:0": 5000}


def test_multi_gpu_needs_that_many_gpus_on_one_worker() -> None:
    """Two workers with one free GPU each cannot hold a two-GPU request."""
    monitor = fleet(reading("a", 0), reading("b", 0))
    assert place(monitor, need(gpu_count=2)) == NoFit(free_slots=True)


def test_multi_gpu_lands_on_one_worker() -> None:
    """A two-GPU request takes two GPUs of the one worker that has them, each reserved."""
    monitor = fleet(reading("a", 0), reading("b", 0), reading("b", 1), reading("b", 2))
    assert monitor.reserve("b:1", "busy", 60_000)
    result = place(monitor, need(10_000, gpu_count=2))
    assert isinstance(result, Chosen)
    assert result.worker == "b"
    assert len(result.gpu_ids) == 2
    assert set(result.gpu_ids) <= {"b:0", "b:1", "b:2"}
    assert result.reservations == dict.fromkeys(result.gpu_ids, 10_000)
    # The tightest GPUs of the worker are grouped, keeping the big hole intact, listed in
    # index order (b:2 is tighter than b:0 only by the tie on id, so b:1 and one of them).
    assert "b:1" in result.gpu_ids
    assert list(result.gpu_ids) == sorted(result.gpu_ids, key=lambda gpu: int(gpu[2:]))


def test_a_group_lists_its_gpus_in_index_order_whatever_their_fit() -> None:
    """The tightest GPUs make the group; the first of them by index is its primary GPU."""
    monitor = fleet(reading("a", 0), reading("a", 1, used_mb=30_000), reading("a", 2))
    assert monitor.reserve("a:2", "busy", 40_000)
    result = place(monitor, need(10_000, gpu_count=2))
    assert chosen_ids(result) == ("a:1", "a:2")


def test_no_fit_without_any_free_slot() -> None:
    """NoFit.free_slots is false when no GPU has a slot, true when slots exist but room lacks."""
    full = fleet(reading("a", 0, slots=1))
    assert full.reserve("a:0", "exe_0", 10)
    assert place(full, need()) == NoFit(free_slots=False)
    roomless = fleet(reading("a", 0, used_mb=H100_ROOM))
    assert place(roomless, need()) == NoFit(free_slots=True)
    assert place(fleet(), need()) == NoFit(free_slots=False)


def test_unschedulable_gpus_are_not_offered_by_the_monitor() -> None:
    """Cordoned and hot-but-degraded GPUs: only the schedulable set is placed on."""
    monitor = fleet(reading("a", 0), reading("a", 1, temperature_c=95.0))
    monitor.cordon("a:0")
    assert chosen_ids(place(monitor, need())) == ("a:1",)


# --- policies ------------------------------------------------------------------------------------


def test_best_fit_picks_the_tightest() -> None:
    """best_fit leaves the least memory over."""
    monitor = fleet(
        reading("a", 0, used_mb=10_000),
        reading("a", 1, used_mb=50_000),
        reading("a", 2, used_mb=30_000),
    )
    result = place(monitor, need(), "best_fit")
    assert chosen_ids(result) == ("a:1",)
    assert isinstance(result, Chosen)
    assert result.reason.startswith("best_fit")


def test_least_loaded_picks_the_emptiest() -> None:
    """least_loaded picks the GPU with the fewest busy slots, then the most room."""
    monitor = fleet(reading("a", 0), reading("a", 1), reading("a", 2, used_mb=20_000))
    monitor.reserve("a:0", "e1", 100)
    monitor.reserve("a:0", "e2", 100)
    monitor.reserve("a:1", "e3", 100)
    assert chosen_ids(place(monitor, need(), "least_loaded")) == ("a:2",)
    monitor.reserve("a:2", "e4", 100)
    monitor.reserve("a:2", "e5", 100)
    # a:1 and a:2 now have one vs two busy slots.
    assert chosen_ids(place(monitor, need(), "least_loaded")) == ("a:1",)


def test_least_loaded_breaks_ties_by_most_room() -> None:
    """With equal load, least_loaded prefers the GPU with more room."""
    monitor = fleet(reading("a", 0, used_mb=30_000), reading("a", 1, used_mb=10_000))
    assert chosen_ids(place(monitor, need(), "least_loaded")) == ("a:1",)


def test_balanced_prefers_where_the_model_is_loaded() -> None:
    """The balanced policy picks a GPU with the model resident over a tighter one without it."""
    monitor = fleet(
        reading("a", 0, models_loaded=(MODEL,)),
        reading("a", 1, used_mb=50_000),
    )
    result = place(monitor, need(weights_mb=15_000), "balanced")
    assert chosen_ids(result) == ("a:0",)
    assert isinstance(result, Chosen)
    assert "model loaded" in result.reason


def test_balanced_prefers_healthy_over_degraded() -> None:
    """The balanced policy places on a degraded GPU last, even if it fits tighter."""
    monitor = fleet(reading("a", 0), reading("a", 1, used_mb=50_000, temperature_c=95.0))
    assert monitor.get("a:1").health == "degraded"
    assert chosen_ids(place(monitor, need(), "balanced")) == ("a:0",)
    alone = fleet(reading("a", 1, temperature_c=95.0))
    assert chosen_ids(place(alone, need(), "balanced")) == ("a:1",)


def test_balanced_packs_an_exact_size_into_the_tightest_gib_bucket_even_if_busier() -> None:
    """A known size: across whole-GiB buckets the tighter fit wins, load only breaks ties."""
    monitor = fleet(
        reading("a", 0, used_mb=10_000),
        reading("a", 1, used_mb=50_000),
        reading("a", 2, used_mb=50_500),
    )
    assert (H100_ROOM - 50_000 - 20_000) // GIB == 10
    assert (H100_ROOM - 50_500 - 20_000) // GIB == 9
    monitor.reserve("a:2", "busy", 0)
    assert chosen_ids(place(monitor, need(exact=True), "balanced")) == ("a:2",)


def test_balanced_with_an_exact_size_within_one_gib_prefers_idle() -> None:
    """Two GPUs whose leftovers share a GiB bucket: the idle one is chosen, not the tighter."""
    base = 40 * GIB
    monitor = fleet(
        reading("a", 0, used_mb=H100_ROOM - base - 20_000 - 100),
        reading("a", 1, used_mb=H100_ROOM - base - 20_000 - 900, slots=8),
    )
    monitor.reserve("a:0", "busy", 0)
    assert chosen_ids(place(monitor, need(exact=True), "balanced")) == ("a:1",)
    assert chosen_ids(place(monitor, need(), "best_fit")) == ("a:0",)


def test_balanced_keeps_room_a_typical_exact_size_can_use_rather_than_fit_tightest() -> None:
    """Once 10 GiB requests are typical, 2 GiB skips the GPU it would leave short of 10 GiB.

    Before the policy has placed any exact size it takes the tightest fit, as it always did.
    """
    monitor = fleet(
        reading("a", 0, used_mb=H100_ROOM - 11 * GIB),  # 11 GiB free: 9 GiB left, too little
        reading("b", 0, used_mb=H100_ROOM - 13 * GIB),  # 13 GiB free: 11 GiB left, enough
    )
    balancer = LoadBalancer(make_policy("balanced"))
    small, typical = need(2 * GIB, exact=True), need(10 * GIB, exact=True)
    placed = balancer.place(small, monitor.index)
    assert chosen_ids(placed) == ("a:0",)
    assert isinstance(placed, Chosen)
    for _ in range(3):  # placing without reserving changes nothing but what the policy learnt
        balancer.place(typical, monitor.index)
    chosen = balancer.place(small, monitor.index)
    assert chosen_ids(chosen) == ("b:0",)
    assert isinstance(chosen, Chosen)
    assert chosen.reason.startswith("balanced: fragmentation +0.0 GiB for the typical sizes; ")
    assert placed.reason.startswith("balanced: leaves 9.0 GiB")  # nothing typical yet
    # The estimated path does not look at it; best_fit still packs tightest.
    assert chosen_ids(place(monitor, small, "best_fit")) == ("a:0",)


def test_balanced_weighs_a_multi_gpu_exact_size_by_its_gpus_fragmentation_summed() -> None:
    """Two GPUs of 2 GiB each go to the worker whose GPUs keep room for the typical 10 GiB."""
    monitor = fleet(
        reading("a", 0, used_mb=H100_ROOM - 11 * GIB),
        reading("a", 1, used_mb=H100_ROOM - 11 * GIB),
        reading("b", 0, used_mb=H100_ROOM - 13 * GIB),
        reading("b", 1, used_mb=H100_ROOM - 13 * GIB),
    )
    balancer = LoadBalancer(make_policy("balanced"))
    pair = need(2 * GIB, gpu_count=2, exact=True)
    assert chosen_ids(balancer.place(pair, monitor.index)) == ("a:0", "a:1")
    for _ in range(3):
        balancer.place(need(10 * GIB, exact=True), monitor.index)
    assert chosen_ids(balancer.place(pair, monitor.index)) == ("b:0", "b:1")


def test_balanced_learns_fragmentation_only_from_exact_sizes_it_placed() -> None:
    """Estimated needs and needs that found no GPU teach the policy nothing."""
    monitor = fleet(
        reading("a", 0, used_mb=H100_ROOM - 11 * GIB),
        reading("b", 0, used_mb=H100_ROOM - 13 * GIB),
    )
    balancer = LoadBalancer(make_policy("balanced"))
    for _ in range(3):
        balancer.place(need(10 * GIB), monitor.index)  # estimated
        assert isinstance(balancer.place(need(70 * GIB, exact=True), monitor.index), NoFit)
    assert chosen_ids(balancer.place(need(2 * GIB, exact=True), monitor.index)) == ("a:0",)


def test_balanced_sends_an_estimated_size_where_the_fewest_share_then_the_most_room() -> None:
    """Alike in type and weights, the GPU running the fewest wins; among equals, the most room."""
    monitor = fleet(
        reading("a", 0, used_mb=10_000),
        reading("a", 1, used_mb=50_000),
        reading("a", 2, used_mb=10_000),
    )
    monitor.reserve("a:0", "busy", 0)
    monitor.reserve("a:0", "busier", 0)
    monitor.reserve("a:2", "busy", 0)
    # a:1 is idle though it has the least room: it finishes first.
    assert chosen_ids(place(monitor, need(), "balanced")) == ("a:1",)
    monitor.reserve("a:1", "busy", 0)
    # a:1 and a:2 run one each; a:2 leaves more room.
    assert chosen_ids(place(monitor, need(), "balanced")) == ("a:2",)
    # Packing takes the fullest GPU.
    assert chosen_ids(place(monitor, need(exact=True), "balanced")) == ("a:1",)


def test_balanced_weighs_gpu_speed_sharing_and_a_cold_start_into_the_finish() -> None:
    """The expected finish counts the GPU's speed, what shares it, and a cold start.

    Load where no copy of the weights is held, then the duration alone on the GPU's type,
    slowed by what shares the GPU (1 + 0.03 per other execution).
    """
    monitor = fleet(
        reading("a", 0, "H100-80GB"),
        reading("a", 1, "L4-24GB", models_cached=(MODEL,)),
        reading("a", 2, "H100-80GB", models_cached=(MODEL,)),
    )
    for holder in ("x", "y", "z"):
        monitor.reserve("a:2", holder, 0)
    durations = {"H100-80GB": 2.0, "L4-24GB": 10.0}
    quick = need(weights_mb=15_317, duration_s=durations)
    # A cold start of 15,317 MiB at 1.7 GB/s is 9.4 s: the L4 holding the weights (10 s)
    # finishes before the idle H100 without them (11.4 s), and the busy H100 holding them
    # (2 × 1.09 = 2.18 s) before both.
    chosen = place(monitor, quick, "balanced")
    assert chosen_ids(chosen) == ("a:2",)
    assert isinstance(chosen, Chosen)
    assert chosen.reason.startswith(
        "balanced: expected to finish in 2.2 s (H100-80GB, 3 running beside it); "
    )
    monitor.cordon("a:2")
    assert chosen_ids(place(monitor, quick, "balanced")) == ("a:1",)
    slow = need(weights_mb=15_317, duration_s={"H100-80GB": 2.0, "L4-24GB": 12.0})
    chosen = place(monitor, slow, "balanced")
    assert chosen_ids(chosen) == ("a:0",)
    assert isinstance(chosen, Chosen)
    assert "(H100-80GB, 0 running beside it, a cold start)" in chosen.reason


def test_round_robin_cycles_in_id_order() -> None:
    """round_robin walks the candidates in GPU id order and wraps around."""
    monitor = fleet(reading("b", 0), reading("a", 1), reading("a", 0))
    balancer = LoadBalancer(make_policy("round_robin"))
    picks = [chosen_ids(balancer.place(need(), monitor.index))[0] for _ in range(7)]
    assert picks == ["a:0", "a:1", "b:0", "a:0", "a:1", "b:0", "a:0"]


def test_round_robin_orders_gpu_indexes_as_numbers() -> None:
    """GPU a:10 comes after a:2, not before it as the strings would sort."""
    monitor = fleet(*(reading("a", index) for index in (10, 2, 1)))
    balancer = LoadBalancer(make_policy("round_robin"))
    picks = [chosen_ids(balancer.place(need(), monitor.index))[0] for _ in range(4)]
    assert picks == ["a:1", "a:2", "a:10", "a:1"]


def test_round_robin_skips_gpus_that_no_longer_fit() -> None:
    """round_robin moves to the next candidate after the last pick, among those that fit now."""
    monitor = fleet(reading("a", 0), reading("a", 1), reading("a", 2))
    balancer = LoadBalancer(make_policy("round_robin"))
    assert chosen_ids(balancer.place(need(), monitor.index)) == ("a:0",)
    monitor.cordon("a:1")
    assert chosen_ids(balancer.place(need(), monitor.index)) == ("a:2",)


@pytest.mark.parametrize("policy", ["random", "power_of_two"])
def test_random_policies_are_deterministic_for_a_seed(policy: str) -> None:
    """The same seed gives the same sequence of choices."""
    monitor = fleet(*(reading("a", index) for index in range(6)))

    def run(seed: int) -> list[str]:
        balancer = LoadBalancer(make_policy(policy, seed))
        return [chosen_ids(balancer.place(need(), monitor.index))[0] for _ in range(20)]

    assert run(3) == run(3)
    assert len({tuple(run(seed)) for seed in range(5)}) > 1


@pytest.mark.parametrize("policy", ["random", "power_of_two"])
def test_random_policies_only_pick_feasible_gpus(policy: str) -> None:
    """Over many seeds, random choices stay on GPUs that can take the request."""
    monitor = fleet(
        reading("a", 0),
        reading("a", 1, used_mb=H100_ROOM - 100),
        reading("a", 2, models=("other",)),
        reading("a", 3, "L4-24GB"),
        reading("a", 4),
    )
    seen = set()
    for seed in range(40):
        seen.update(chosen_ids(place(monitor, need(30_000), policy, seed=seed)))
    assert seen == {"a:0", "a:4"}


def test_power_of_two_picks_the_less_loaded_of_its_pair() -> None:
    """With two candidates, power_of_two always picks the less busy one."""
    monitor = fleet(reading("a", 0), reading("a", 1))
    monitor.reserve("a:0", "busy", 0)
    for seed in range(10):
        assert chosen_ids(place(monitor, need(), "power_of_two", seed=seed)) == ("a:1",)


def test_make_policy_knows_every_configurable_policy() -> None:
    """Every policy the config accepts can be made, and is named after itself."""
    assert set(POLICIES) == set(CONFIG_POLICIES)
    for name in CONFIG_POLICIES:
        assert make_policy(name).name == name


def test_make_policy_rejects_unknown_names() -> None:
    """An unknown policy name is a ValueError naming it."""
    with pytest.raises(ValueError, match="fastest"):
        make_policy("fastest")


# --- prospects -----------------------------------------------------------------------------------


def test_prospect_finds_where_it_fits_once_drained() -> None:
    """A prospect is the GPU that would fit after its work drains, the closest to fitting."""
    monitor = fleet(reading("a", 0), reading("a", 1), reading("a", 2, "L4-24GB"))
    monitor.reserve("a:0", "e1", 70_000)
    monitor.reserve("a:1", "e2", 60_000)
    big = need(40_000)
    assert isinstance(place(monitor, big), NoFit)
    balancer = LoadBalancer(make_policy("best_fit"))
    assert balancer.prospect(big, monitor.schedulable.values()) == ("a:1",)


def test_prospect_is_the_gpu_with_the_least_left_to_free_not_the_least_reserved() -> None:
    """Memory used by others counts: the GPU that must free the least for the request wins."""
    monitor = fleet(reading("a", 0, used_mb=30_000), reading("a", 1))
    monitor.reserve("a:0", "e1", 20_000)
    monitor.reserve("a:1", "e2", 40_000)
    big = need(45_000)
    assert isinstance(place(monitor, big), NoFit)
    # a:0 has the least reserved but 30 GB used by others: 45 GB needs 14.5 GB more freed
    # there (room 81,559 − 1,024 − 30,000 − 20,000), against 4.5 GB on a:1.
    balancer = LoadBalancer(make_policy("balanced"))
    assert balancer.prospect(big, monitor.schedulable.values()) == ("a:1",)


def test_prospect_is_the_gpu_expected_to_fit_soonest_when_that_is_known() -> None:
    """Given when each GPU frees enough, the soonest wins over the closest in memory."""
    monitor = fleet(reading("a", 0), reading("a", 1))
    monitor.reserve("a:0", "e1", 70_000)  # room 10,535 MiB: 29,465 short of 40 GB; frees at t=5
    monitor.reserve("a:1", "e2", 60_000)  # 19,465 short; frees at t=50
    balancer = LoadBalancer(make_policy("balanced"))
    gpus = list(monitor.schedulable.values())
    asked: list[tuple[str, int]] = []

    def frees_at(gpu: GPUState, short_mb: int) -> float:
        asked.append((gpu.id, short_mb))
        return {"a:0": 5.0, "a:1": 50.0}[gpu.id]

    assert balancer.prospect(need(40_000), gpus, frees_at) == ("a:0",)
    assert sorted(asked) == [("a:0", 29_465), ("a:1", 19_465)]
    assert balancer.prospect(need(40_000), gpus) == ("a:1",)  # unknown: the closest
    # A GPU the request failed on is still taken last, however soon it frees.
    assert balancer.prospect(need(40_000, avoid=frozenset({"a:0"})), gpus, frees_at) == ("a:1",)


def test_prospect_takes_a_gpu_the_request_failed_on_last() -> None:
    """A retried request does not hold the GPU it just failed on while another would do."""
    monitor = fleet(reading("a", 0), reading("a", 1))
    monitor.reserve("a:0", "e1", 70_000)
    monitor.reserve("a:1", "e2", 60_000)
    balancer = LoadBalancer(make_policy("balanced"))
    gpus = list(monitor.schedulable.values())
    assert balancer.prospect(need(40_000), gpus) == ("a:1",)
    assert balancer.prospect(need(40_000, avoid=frozenset({"a:1"})), gpus) == ("a:0",)


def test_prospect_respects_type_model_and_total_memory() -> None:
    """A prospect is never of the wrong type, without the model, or too small even when idle."""
    monitor = fleet(
        reading("a", 0, "L4-24GB"),
        reading("b", 0, models=("other",)),
        reading("c", 0, used_mb=55_000),
    )
    balancer = LoadBalancer(make_policy("best_fit"))
    gpus = list(monitor.schedulable.values())
    assert balancer.prospect(need(30_000), gpus) is None
    assert balancer.prospect(need(23_000), gpus) == ("c:0",)
    assert balancer.prospect(need(20_000, gpu_type="L4-24GB"), gpus) == ("a:0",)
    assert balancer.prospect(need(23_000, gpu_type="L4-24GB"), gpus) is None


def test_prospect_for_multi_gpu_stays_on_one_worker() -> None:
    """A multi-GPU prospect is a group on one worker with the least reserved in total."""
    monitor = fleet(
        reading("a", 0),
        reading("a", 1),
        reading("b", 0, used_mb=50_000),
        reading("b", 1),
        reading("c", 0),
        reading("c", 1),
    )
    for gpu_id, mb in [
        ("a:0", 50_000),
        ("a:1", 40_000),
        ("b:1", 10_000),
        ("c:0", 60_000),
        ("c:1", 60_000),
    ]:
        assert monitor.reserve(gpu_id, f"e-{gpu_id}", mb)
    balancer = LoadBalancer(make_policy("best_fit"))
    gpus = list(monitor.schedulable.values())
    # b:0 can never hold 40 GB (others use 50 GB of it), so b offers one GPU only;
    # a (90 GB reserved in all) drains sooner than c (120 GB).
    assert sorted(balancer.prospect(need(40_000, gpu_count=2), gpus) or ()) == ["a:0", "a:1"]
    assert balancer.prospect(need(40_000), gpus) == ("b:1",)
    assert balancer.prospect(need(gpu_count=3), gpus) is None


# --- the invariant --------------------------------------------------------------------------------

_gpu = st.fixed_dictionaries(
    {
        "worker": st.sampled_from(["a", "b", "c"]),
        "kind": st.sampled_from(["H100-80GB", "L4-24GB"]),
        "used": st.integers(0, 80_000),
        "slots": st.integers(1, 3),
        "busy": st.integers(0, 3),
        "serves": st.booleans(),
        "loaded": st.booleans(),
        "hot": st.booleans(),
    }
)


@settings(max_examples=200, deadline=None)
@given(
    gpus=st.lists(_gpu, min_size=0, max_size=10),
    memory=st.integers(0, 90_000),
    weights=st.integers(0, 20_000),
    count=st.integers(1, 3),
    gpu_kind=st.sampled_from([None, "H100-80GB", "L4-24GB"]),
    policy=st.sampled_from(sorted(POLICIES)),
    avoid_mask=st.integers(0, 1023),
    held_mask=st.integers(0, 1023),
    seed=st.integers(0, 5),
)
def test_any_chosen_placement_fits(
    gpus: list[dict[str, Any]],
    memory: int,
    weights: int,
    count: int,
    gpu_kind: str | None,
    policy: str,
    avoid_mask: int,
    held_mask: int,
    seed: int,
) -> None:
    """Whatever the fleet, need and policy, a placement fits every GPU it reserves on."""
    weights = min(weights, memory)
    readings = []
    index: dict[str, int] = {}
    for gpu in gpus:
        worker = str(gpu["worker"])
        kind = str(gpu["kind"])
        readings.append(
            reading(
                worker,
                index.setdefault(worker, 0),
                kind,
                used_mb=min(int(gpu["used"]), gpu_type(kind).memory_mb),
                slots=int(gpu["slots"]),
                models=(MODEL,) if gpu["serves"] else ("other",),
                models_loaded=(MODEL,) if gpu["loaded"] else (),
                temperature_c=95.0 if gpu["hot"] else 40.0,
            )
        )
        index[worker] += 1
    monitor = fleet(*readings)
    for position, (state, gpu) in enumerate(zip(monitor.gpus.values(), gpus, strict=True)):
        for slot in range(min(int(gpu["busy"]), state.slots)):
            monitor.reserve(state.id, f"busy-{position}-{slot}", 0)
    ids = list(monitor.gpus)
    avoid = frozenset(gpu_id for bit, gpu_id in enumerate(ids) if avoid_mask >> bit & 1)
    held = [gpu_id for bit, gpu_id in enumerate(ids) if held_mask >> bit & 1]
    need_ = Need(MODEL, memory, weights, count, gpu_kind, avoid)
    result = place(monitor, need_, policy, held=held, seed=seed)
    if isinstance(result, NoFit):
        return
    assert len(result.gpu_ids) == count
    assert len(set(result.gpu_ids)) == count
    assert set(result.reservations) == set(result.gpu_ids)
    for gpu_id in result.gpu_ids:
        state = monitor.get(gpu_id)
        assert state.worker == result.worker
        assert state.schedulable
        assert gpu_id not in held
        assert state.serves(MODEL)
        assert state.free_slots > 0
        assert gpu_kind is None or state.type == gpu_kind
        expected = memory - weights if state.has_loaded(MODEL) else memory
        assert result.reservations[gpu_id] == expected
        assert result.reservations[gpu_id] <= state.room_mb
    for gpu_id, mb in result.reservations.items():
        assert monitor.reserve(gpu_id, "the-placement", mb)


def test_a_prospect_counts_no_weights_where_the_model_is_loaded() -> None:
    """A held GPU is one where the request could fit once drained: there, without its weights.

    Both GPUs have 6 GB of room, taken by work outside the router; the request needs 20 GB,
    15 GB of it weights. Only on a:0, where the model is resident, do the 5 GB left fit.
    """
    need_ = need(20_000, weights_mb=15_000)
    monitor = fleet(
        reading("a", 0, used_mb=H100_ROOM - 6000, models_loaded=(MODEL,)),
        reading("a", 1, used_mb=H100_ROOM - 6000),
    )
    balancer = LoadBalancer(make_policy("best_fit", 0))
    assert balancer.prospect(need_, monitor.schedulable.values()) == ("a:0",)

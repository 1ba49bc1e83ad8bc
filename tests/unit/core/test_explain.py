"""Explain: placements with the candidates weighed, and waits with their cause, position and ETA."""

from __future__ import annotations

from typing import Any

import pytest
from core_harness import Harness

from gpu_request_router.core.explain import Decided, DecisionLog, Queued, project_start
from gpu_request_router.core.load_balancer import Need
from gpu_request_router.models.request import ResourceHints
from gpu_request_router.testing import chat, make_settings


def _sized(memory_mb: int, **kwargs: Any) -> Any:
    return chat(resources=ResourceHints(gpu_memory_mb=memory_mb), **kwargs)


def test_a_placed_request_lists_the_candidates_weighed_with_the_chosen_one() -> None:
    """The chosen candidate is the placement's GPU; every candidate has named scores."""
    h = Harness(make_settings(gpus=[("H100-80GB", 2), ("A100-80GB", 2)], placement={}))
    request = h.submit(_sized(20_000))
    explained = h.router.explain(request, h.now)
    placement = h.dispatch_of(request).placement
    assert explained.status == "dispatching"
    assert explained.gpu_id == placement.gpu_id
    assert explained.policy == "balanced"
    chosen = [c for c in explained.candidates if c.chosen]
    assert [c.gpu_id for c in chosen] == [placement.gpu_id]
    assert explained.candidates[0].chosen, "best first"
    assert all(c.score for c in explained.candidates)
    assert {c.type for c in explained.candidates} == {"H100-80GB", "A100-80GB"}
    assert placement.gpu_id in explained.summary


def test_a_request_waiting_for_memory_is_blocked_by_memory_with_an_eta() -> None:
    """A request that does not fit next to running work waits for memory; its ETA is its end."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    running = h.submit(_sized(60_000))
    waiting = h.submit(_sized(40_000), user="bob")
    explained = h.router.explain(waiting, h.now)
    assert explained.waiting is not None
    assert explained.waiting.blocked_by == "memory"
    assert explained.waiting.queue_position == 0
    duration = running.estimate.typical_duration_s
    assert explained.waiting.eta_s is not None
    assert abs(explained.waiting.eta_s - duration) < 1e-6


def test_without_a_projection_a_wait_keeps_its_cause_and_position_and_has_no_eta() -> None:
    """``project=False`` (the runtime's time budget spent): the same cause, no ETA, and why."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    h.submit(_sized(60_000))
    waiting = h.submit(_sized(40_000), user="bob")
    projected = h.router.explain(waiting, h.now)
    skipped = h.router.explain(waiting, h.now, project=False)
    assert projected.waiting is not None and skipped.waiting is not None
    assert projected.waiting.eta_s is not None and skipped.waiting.eta_s is None
    assert skipped.waiting.blocked_by == projected.waiting.blocked_by == "memory"
    assert skipped.waiting.queue_position == projected.waiting.queue_position == 0
    assert "no ETA now, as the router is busy" in skipped.summary
    assert "expected to start in about" in projected.summary


def test_a_request_behind_another_counts_its_wait_too() -> None:
    """The ETA of the second waiting request includes the run of the first one ahead of it."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    running = h.submit(_sized(60_000))
    first = h.submit(_sized(60_000), user="bob")
    second = h.submit(_sized(60_000), user="carol")
    one = h.router.explain(first, h.now).waiting
    two = h.router.explain(second, h.now).waiting
    assert one is not None and two is not None
    assert (one.queue_position, two.queue_position) == (0, 1)
    duration = running.estimate.typical_duration_s
    assert one.eta_s is not None and two.eta_s is not None
    assert abs(two.eta_s - (one.eta_s + first.estimate.typical_duration_s)) < 1e-6
    assert abs(one.eta_s - duration) < 1e-6


def test_a_fleet_all_cordoned_says_no_gpu_and_no_eta() -> None:
    """With every GPU cordoned nothing could hold the request: no_gpu, no ETA."""
    h = Harness(make_settings(gpus=[("H100-80GB", 2)]))
    for gpu_id in list(h.router.monitor.gpus):
        h.apply(h.router.cordon(gpu_id, h.now))
    waiting = h.submit(chat())
    explained = h.router.explain(waiting, h.now).waiting
    assert explained is not None
    assert explained.blocked_by == "no_gpu"
    assert "2 cordoned" in explained.detail
    assert explained.eta_s is None


def test_a_user_at_max_concurrent_is_blocked_by_quota() -> None:
    """A request whose user already runs max_concurrent waits for the quota, not the fleet."""
    settings = make_settings(gpus=[("H100-80GB", 2)], quotas={"default": {"max_concurrent": 1}})
    h = Harness(settings)
    h.submit(chat())
    second = h.submit(chat())
    explained = h.router.explain(second, h.now).waiting
    assert explained is not None
    assert explained.blocked_by == "quota"
    assert "max_concurrent" in explained.detail
    assert explained.eta_s is not None and explained.eta_s > 0


def test_a_full_slot_says_slots() -> None:
    """Memory to spare but every slot taken: blocked by slots."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)], slots=1))
    h.submit(_sized(10_000))
    waiting = h.submit(_sized(10_000), user="bob")
    explained = h.router.explain(waiting, h.now).waiting
    assert explained is not None and explained.blocked_by == "slots"


def test_an_ended_request_keeps_its_placement_and_candidates() -> None:
    """After it succeeds, explain still says where it ran and what was weighed."""
    h = Harness(make_settings(gpus=[("H100-80GB", 2)]))
    request = h.submit(chat())
    h.finish(request)
    ended = h.store.get_request(request.id)
    explained = h.router.explain(ended, h.now)
    assert explained.status == "succeeded"
    assert explained.candidates and explained.candidates[0].chosen
    assert "succeeded" in explained.summary


def test_the_decision_log_keeps_only_the_latest() -> None:
    """Past its limit the oldest decisions are forgotten: memory stays bounded."""
    log = DecisionLog(limit=2)
    need = Need(model="m", memory_mb=1)
    for name in ("a", "b", "c"):
        log.record(name, Decided(0.0, need, ("w:0",), ()))
    assert log.get("a") is None and log.get("c") is not None and len(log) == 2


def test_a_projection_without_releases_never_starts_what_does_not_fit() -> None:
    """Nothing running and no room: no start can be projected."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)]))
    gpu = next(iter(h.router.monitor.gpus.values()))
    too_big = Need(model="llama-3-8b", memory_mb=gpu.room_mb + 1)
    assert project_start(0.0, [], Queued("r", too_big, 0.0), [gpu], [], depth=8) is None


def test_power_of_two_lists_the_pair_it_sampled_and_random_only_its_choice() -> None:
    """The baselines say what they weighed: two sampled GPUs, or the random choice alone."""
    sampled = Harness(make_settings(gpus=[("H100-80GB", 4)], placement={"policy": "power_of_two"}))
    request = sampled.submit(chat())
    candidates = sampled.router.explain(request, sampled.now).candidates
    assert len(candidates) == 2 and candidates[0].chosen
    assert all("busy" in c.score and c.note == "sampled among 4 feasible" for c in candidates)
    drawn = Harness(make_settings(gpus=[("H100-80GB", 4)], placement={"policy": "random"}))
    request = drawn.submit(chat())
    [only] = drawn.router.explain(request, drawn.now).candidates
    assert only.chosen and only.score == {} and only.note == "chosen by random among 4 feasible"


def test_a_two_gpu_request_lists_worker_groups() -> None:
    """A multi-GPU placement weighs whole groups; the note names the group's other GPUs."""
    h = Harness(make_settings(gpus=[("H100-80GB", 4)]))
    request = h.submit(chat(resources=ResourceHints(gpu_count=2)))
    [group] = h.router.explain(request, h.now).candidates
    placement = h.dispatch_of(request).placement
    assert group.chosen and group.gpu_id == placement.gpu_ids[0]
    assert group.note == f"with {placement.gpu_ids[1]}"


def test_a_request_kept_off_a_gpu_held_for_a_starving_one_says_starvation_hold() -> None:
    """A small request that would fit, on the GPU held for a large starving one, says so."""
    h = Harness(make_settings(gpus=[("H100-80GB", 1)], placement={"starvation_bound_s": 30}))
    running = h.submit(_sized(40_000), user="a")
    large = h.submit(_sized(60_000), user="b")
    h.now += 31  # past the bound: the large one holds the GPU from the next pass on
    small = h.submit(_sized(30_000), user="c")
    assert h.router.holds.of(large.id) == ("sim:0",)
    waiting = h.router.explain(small, h.now).waiting
    assert waiting is not None and waiting.blocked_by == "starvation_hold"
    assert "held for an older request, queued 31 s ago" in waiting.detail
    held = h.router.explain(large, h.now).waiting
    assert (
        held is not None and held.blocked_by == "memory" and "sim:0 are held for it" in held.detail
    )
    # The running one is long overdue (31 s against its estimate): expected to run a tenth as
    # long again; the large one starts then, the small one once the large one is done.
    assert running.estimate.typical_duration_s < 31
    assert held.eta_s == pytest.approx(0.1 * 31)
    assert waiting.eta_s == pytest.approx(0.1 * 31 + large.estimate.typical_duration_s)

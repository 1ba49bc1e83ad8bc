"""Fragmentation of free GPU shares against a learnt request mix (FGD's measure, online)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_request_router.core.fragmentation import (
    Demand,
    RequestMix,
    cost_bucket,
    fragmentation,
    placement_cost,
    share_breaks,
    share_cost,
    unusable,
)

GPU = 1000

free_shares = st.lists(st.integers(0, GPU), min_size=1, max_size=8).map(sorted)
demands = st.lists(
    st.builds(
        Demand,
        size=st.sampled_from([0, 100, 250, 470, 500, 810, GPU]),
        count=st.integers(1, 4),
        weight=st.floats(0.01, 1.0),
        runs=st.booleans(),
    ),
    min_size=1,
    max_size=6,
)


def test_unusable_is_what_one_request_cannot_use() -> None:
    """GPUs too small for it, or everything when it cannot run there or asks for no GPU."""
    free = [100, 300, 600, 1000]
    assert unusable(free, Demand(500, 1, 1.0)) == 400  # the 100 and the 300
    assert unusable(free, Demand(500, 2, 1.0)) == 400  # 600 and 1000 fit two
    assert unusable(free, Demand(500, 3, 1.0)) == 2000  # three GPUs of 500: none of it
    assert unusable(free, Demand(GPU, 1, 1.0)) == 1000
    assert unusable(free, Demand(0, 0, 1.0)) == 2000  # asks for no GPU
    assert unusable(free, Demand(100, 1, 1.0, runs=False)) == 2000  # another model, no CPU


def test_fragmentation_is_the_mix_weighted_unusable_share() -> None:
    """Half the mix wants 500 (400 unusable), half wants a whole GPU (1,000 unusable)."""
    mix = [Demand(500, 1, 0.5), Demand(GPU, 1, 0.5)]
    assert fragmentation([100, 300, 600, 1000], mix) == pytest.approx(700)


def test_placement_cost_prefers_keeping_a_gpu_usable() -> None:
    """A 300 on the 600 leaves 300 nobody of the mix can use; on the empty GPU, nothing."""
    mix = [Demand(500, 1, 1.0)]
    on_the_tightest = placement_cost([600, 1000], [300, 1000], mix)
    on_the_empty = placement_cost([600, 1000], [600, 700], mix)
    assert on_the_tightest == 300
    assert on_the_empty == 0
    assert cost_bucket(on_the_empty, GPU) < cost_bucket(on_the_tightest, GPU)


def test_placement_cost_sees_the_mix_change_with_the_node() -> None:
    """Using up the node's CPU makes every GPU of it unusable to a request that needs CPU."""
    runs, starved = [Demand(500, 1, 1.0)], [Demand(500, 1, 1.0, runs=False)]
    assert placement_cost([1000, 1000], [1000, 1000], runs, starved) == 2000


@given(free_shares, demands)
def test_fragmentation_lies_between_nothing_and_all_the_idle_share(
    free: list[int], mix: list[Demand]
) -> None:
    """With weights summing to one, the expected unusable share is within [0, idle]."""
    total = sum(demand.weight for demand in mix)
    normalised = [Demand(d.size, d.count, d.weight / total, d.runs) for d in mix]
    assert -1e-9 <= fragmentation(free, normalised) <= sum(free) + 1e-6


def _placements(free: list[int], size: int) -> list[list[int]]:
    """Every way to put ``size`` on one GPU of a node: the node's free shares after."""
    return [
        sorted(value - size if i == index else value for i, value in enumerate(free))
        for index, value in enumerate(free)
        if value >= size
    ]


@given(free_shares, free_shares, demands, st.integers(1, GPU))
def test_the_score_never_prefers_a_placement_worse_for_every_typical_request(
    node_x: list[int], node_y: list[int], mix: list[Demand], size: int
) -> None:
    """The score never prefers a placement worse for every typical request.

    Among the placements of one request on two nodes: if A leaves at least as much new unusable
    idle share as B for every typical request, and strictly more for one, A costs more and its
    bucket is never lower.
    """
    options = [(node_x, after) for after in _placements(node_x, size)]
    options += [(node_y, after) for after in _placements(node_y, size)]
    for before_a, after_a in options:
        for before_b, after_b in options:
            growth = [
                (
                    unusable(after_a, d) - unusable(before_a, d),
                    unusable(after_b, d) - unusable(before_b, d),
                )
                for d in mix
            ]
            if all(a >= b for a, b in growth) and any(a > b for a, b in growth):
                cost_a = placement_cost(before_a, after_a, mix)
                cost_b = placement_cost(before_b, after_b, mix)
                assert cost_a > cost_b
                assert cost_bucket(cost_a, GPU) >= cost_bucket(cost_b, GPU)


@given(st.floats(-8000, 8000), st.floats(-8000, 8000))
def test_buckets_are_monotone(low: float, high: float) -> None:
    """A larger cost never lands in a smaller bucket."""
    low, high = min(low, high), max(low, high)
    assert cost_bucket(low, GPU) <= cost_bucket(high, GPU)


def test_a_bucket_is_seven_percent_of_a_gpu() -> None:
    """Costs within 35 milli of each other share a bucket; 70 apart never do."""
    assert cost_bucket(0, GPU) == cost_bucket(34, GPU) == cost_bucket(-34, GPU) == 0
    assert cost_bucket(36, GPU) == 1
    assert cost_bucket(140, GPU) == 2


# --- the learnt mix -----------------------------------------------------------------------------


def test_the_mix_covers_95_percent_of_what_it_saw_renormalised() -> None:
    """The most frequent shapes until 95 % are covered; the rare tail is left out."""
    mix: RequestMix[str] = RequestMix()
    for shape, times in (("a", 60), ("b", 30), ("c", 7), ("d", 3)):
        for _ in range(times):
            mix.observe(shape)
    typical = dict(mix.typical())
    assert list(typical) == ["a", "b", "c"]
    assert typical["a"] == pytest.approx(60 / 97)
    assert sum(typical.values()) == pytest.approx(1)
    assert mix.total == 100


def test_an_empty_mix_has_no_typical_request() -> None:
    """Nothing seen, nothing typical (every placement then costs nothing)."""
    assert RequestMix[int]().typical() == []


def test_the_mix_refuses_a_meaningless_bound() -> None:
    """No room for a shape, or a coverage outside (0, 1], is an error."""
    with pytest.raises(ValueError, match="at least one shape"):
        RequestMix[int](shapes=0)
    with pytest.raises(ValueError, match="coverage"):
        RequestMix[int](coverage=0)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=400), st.integers(1, 12))
def test_the_mix_is_bounded_and_keeps_every_frequent_shape(stream: list[int], shapes: int) -> None:
    """At most ``shapes`` shapes are held; every frequent one is among them.

    A shape seen more than total/shapes times is always held (Space-Saving's guarantee).
    """
    mix: RequestMix[int] = RequestMix(shapes=shapes, coverage=1.0)
    for shape in stream:
        mix.observe(shape)
    assert len(mix) <= shapes
    held = dict(mix.typical())
    truth = Counter(stream)
    for shape, count in truth.items():
        if count > len(stream) / shapes:
            assert shape in held
    if len(truth) <= shapes:  # nothing evicted: the counts are exact
        assert held == pytest.approx({s: c / len(stream) for s, c in truth.items()})


@given(
    free=free_shares,
    data=st.data(),
    mix=st.lists(
        st.builds(
            Demand,
            size=st.sampled_from([0, 100, 250, 470, 500, 810, GPU]),
            count=st.just(1),
            weight=st.floats(0.01, 1.0),
            runs=st.booleans(),
        ),
        max_size=5,
    ),
)
def test_one_gpus_share_cost_is_its_nodes_placement_cost_for_one_gpu_requests(
    free: list[int], data: st.DataObject, mix: list[Demand]
) -> None:
    """For typical requests of one GPU, the GPU's own cost is the node's, whatever the others."""
    index = data.draw(st.integers(0, len(free) - 1))
    memory = data.draw(st.integers(0, free[index]))
    after = sorted([*free[:index], free[index] - memory, *free[index + 1 :]])
    assert share_cost(free[index], memory, mix) == pytest.approx(
        placement_cost(free, after, mix), abs=1e-6
    )


@given(
    memory=st.integers(1, GPU),
    mix=st.lists(
        st.builds(
            Demand,
            size=st.integers(1, 2 * GPU),
            count=st.integers(1, 3),
            weight=st.floats(0.01, 1.0),
        ),
        max_size=5,
    ),
    rooms=st.lists(st.integers(1, 3 * GPU), min_size=2, max_size=2).map(sorted),
)
def test_share_cost_never_decreases_between_its_breaks(
    memory: int, mix: list[Demand], rooms: list[int]
) -> None:
    """Two rooms ≥ the memory with no break after the smaller, up to the larger: cost grows."""
    low, high = max(rooms[0], memory), max(rooms[1], memory)
    breaks = share_breaks(memory, mix)
    assert breaks[0] == memory and breaks == sorted(set(breaks))
    if not any(low < point <= high for point in breaks):
        assert share_cost(low, memory, mix) <= share_cost(high, memory, mix)

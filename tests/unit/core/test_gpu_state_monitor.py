"""Tests of the GPU state monitor: room for placement, health over time, operator actions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_request_router.config import load_settings
from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.exceptions import NotFound
from gpu_request_router.models.gpu_state import GPUHealth
from gpu_request_router.models.gpu_types import gpu_type
from gpu_request_router.testing import reading

H100_MB = gpu_type("H100-80GB").memory_mb
MARGIN = 1024
STALE = 10.0


def make_monitor(*, margin: int = MARGIN) -> GPUStateMonitor:
    """A monitor with the default monitor settings, holding its reservations in memory."""
    monitor_settings = load_settings().monitor
    assert monitor_settings.stale_after_s == STALE
    return GPUStateMonitor(
        stale_after_s=monitor_settings.stale_after_s,
        safety_margin_mb=margin,
        max_temperature_c=monitor_settings.max_temperature_c,
    )


def two_gpu_monitor(now: float = 0.0) -> GPUStateMonitor:
    """A monitor that has seen worker "a" report two idle H100s at ``now``."""
    monitor = make_monitor()
    monitor.apply([reading("a", 0), reading("a", 1)], now, worker="a")
    return monitor


# --- room for placement -----------------------------------------------------------------------


def test_room_of_an_idle_gpu_is_total_minus_margin() -> None:
    """An idle GPU offers its whole memory but the safety margin, and all its slots."""
    monitor = two_gpu_monitor()
    state = monitor.get("a:0")
    assert state.room_mb == H100_MB - MARGIN
    assert state.free_slots == 8
    assert state.schedulable
    assert set(monitor.schedulable) == {"a:0", "a:1"}


@pytest.mark.parametrize(
    ("used", "worker_reserved", "router_reserved"),
    [(0, 0, 0), (5000, 0, 0), (5000, 5000, 0), (9000, 4000, 3000), (2000, 6000, 1000)],
)
def test_room_is_total_minus_margin_reserved_and_memory_used_by_others(
    used: int, worker_reserved: int, router_reserved: int
) -> None:
    """Room is total − margin − reservations − (used − what the worker attributes to the router)."""
    monitor = make_monitor()
    monitor.apply([reading("a", 0, used_mb=used, reserved_mb=worker_reserved)], 0.0)
    if router_reserved:
        assert monitor.reserve("a:0", "exe_1", router_reserved)
    state = monitor.get("a:0")
    others = max(0, used - worker_reserved)
    assert state.room_mb == H100_MB - MARGIN - router_reserved - others
    assert monitor.limit_mb(state) == H100_MB - MARGIN - others


def test_a_new_reading_updates_the_room() -> None:
    """Room follows the memory other processes use, reading by reading."""
    monitor = two_gpu_monitor()
    monitor.apply([reading("a", 0, used_mb=10_000)], 1.0)
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 10_000
    monitor.apply([reading("a", 0, used_mb=0)], 2.0)
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN


def test_reserve_takes_room_and_a_slot() -> None:
    """A reservation lowers room by its size and uses one slot, held under its execution."""
    monitor = make_monitor()
    monitor.apply([reading("a", 0, slots=2)], 0.0)
    assert monitor.reserve("a:0", "exe_1", 20_000)
    state = monitor.get("a:0")
    assert state.room_mb == H100_MB - MARGIN - 20_000
    assert state.free_slots == 1
    assert state.reserved_mb == 20_000
    assert state.running == {"exe_1": 20_000}
    assert monitor.holders_on("a:0") == ["exe_1"]


def test_reserve_refuses_without_a_free_slot_and_changes_nothing() -> None:
    """With every slot taken a reservation is refused, however small."""
    monitor = make_monitor()
    monitor.apply([reading("a", 0, slots=1)], 0.0)
    assert monitor.reserve("a:0", "exe_1", 1000)
    assert not monitor.reserve("a:0", "exe_2", 0)
    state = monitor.get("a:0")
    assert state.free_slots == 0
    assert state.reserved_mb == 1000
    assert state.running == {"exe_1": 1000}
    assert monitor.holders_on("a:0") == ["exe_1"]
    assert monitor.release("exe_2") == []


def test_reserve_refuses_without_enough_room_and_changes_nothing() -> None:
    """A reservation larger than the room is refused and leaves room and slots alone."""
    monitor = make_monitor()
    monitor.apply([reading("a", 0, used_mb=50_000)], 0.0)
    room = monitor.get("a:0").room_mb
    assert not monitor.reserve("a:0", "exe_1", room + 1)
    state = monitor.get("a:0")
    assert state.room_mb == room
    assert state.free_slots == 8
    assert state.reserved_mb == 0
    assert state.running == {}
    assert monitor.reserve("a:0", "exe_1", room)
    assert monitor.get("a:0").room_mb == 0


def test_reserve_on_an_unknown_gpu_is_not_found() -> None:
    """Reserving on a GPU the monitor never saw raises NotFound."""
    with pytest.raises(NotFound):
        make_monitor().reserve("nope:0", "exe_1", 1)


def test_release_restores_room_and_slots_on_every_gpu() -> None:
    """Releasing an execution frees all its GPUs and says which they were."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "exe_1", 10_000)
    assert monitor.reserve("a:1", "exe_1", 10_000)
    assert monitor.reserve("a:0", "exe_2", 5_000)
    assert sorted(monitor.release("exe_1")) == ["a:0", "a:1"]
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 5_000
    assert monitor.get("a:0").free_slots == 7
    assert monitor.get("a:1").room_mb == H100_MB - MARGIN
    assert monitor.get("a:1").free_slots == 8
    assert monitor.release("exe_1") == []


def test_an_ending_execution_that_used_less_than_it_reserved_uncovers_the_others_excess() -> None:
    """A thrifty execution ending uncovers the excess of another that a reading netted away.

    The excess counts as used until the next reading shows the truth.
    """
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "big", 10_000)  # will use 16,000
    assert monitor.reserve("a:0", "small", 10_000)  # will use 5,000
    # The reading sees 21,000 used against 20,000 reserved: 1,000 used by "others".
    monitor.apply([reading("a", 0, used_mb=21_000, reserved_mb=20_000)], 1.0)
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 20_000 - 1_000
    monitor.release("small", peak_mb=5_000)
    # 16,000 are in use now, not 10,000 + 1,000: the room says so before any reading.
    assert monitor.get("a:0").hidden_mb == 5_000
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 16_000
    assert not monitor.reserve("a:0", "next", H100_MB - MARGIN - 16_000 + 1)
    monitor.apply([reading("a", 0, used_mb=16_000, reserved_mb=10_000)], 2.0)
    assert monitor.get("a:0").hidden_mb == 0
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 16_000


def test_weights_an_ending_execution_loaded_stay_counted_while_the_model_is_in_use() -> None:
    """Weights an ending execution loaded stay counted while its model is in use.

    Two executions of a model share the weights the first one loaded (and reserved): when the
    first ends, the weights stay in use, so its release frees its working memory only until a
    reading shows the truth. A model the reading does not list as loaded leaves nothing behind.
    """
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "loader", 20_000)  # 15,000 weights + 5,000 working
    assert monitor.reserve("a:0", "rider", 5_000)  # the weights were loaded: working only
    loaded = reading("a", 0, used_mb=25_000, reserved_mb=25_000, models_loaded=("m",))
    monitor.apply([loaded], 1.0)
    monitor.release("loader", peak_mb=20_000, size_mb=20_000, model="m", weights_mb=15_000)
    assert monitor.get("a:0").hidden_mb == 15_000
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 5_000 - 15_000
    monitor.apply([reading("a", 0, used_mb=20_000, reserved_mb=5_000, models_loaded=("m",))], 2.0)
    assert monitor.get("a:0").hidden_mb == 0
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 5_000 - 15_000
    # Reserved without the weights (the model was loaded): they were never its to leave.
    monitor.release("rider", peak_mb=20_000, size_mb=20_000, model="m", weights_mb=15_000)
    assert monitor.get("a:0").hidden_mb == 0
    # Elsewhere, the model unlisted: the weights went with the execution (or to the cache).
    assert monitor.reserve("a:1", "alone", 20_000)
    monitor.release("alone", peak_mb=20_000, size_mb=20_000, model="m", weights_mb=15_000)
    assert monitor.get("a:1").hidden_mb == 0
    assert monitor.get("a:1").room_mb == H100_MB - MARGIN


def test_a_reading_begun_before_a_release_does_not_wipe_what_the_release_uncovered() -> None:
    """A reading on its way while an execution ends still nets it: the hidden excess stays."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "big", 10_000)  # will use 16,000
    assert monitor.reserve("a:0", "small", 10_000)  # will use 5,000
    netted = reading("a", 0, used_mb=21_000, reserved_mb=20_000)
    monitor.apply([netted], 1.0)
    mark = monitor.mark()  # a poll begins: its reading still sees "small"
    monitor.release("small", peak_mb=5_000, size_mb=10_000)
    monitor.apply([netted], 2.0, mark=mark)
    assert monitor.get("a:0").hidden_mb == 5_000
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 16_000
    # A reading begun after the release shows the truth and ends the correction.
    monitor.apply([reading("a", 0, used_mb=16_000, reserved_mb=10_000)], 3.0)
    assert monitor.get("a:0").hidden_mb == 0
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 16_000


def test_a_reading_that_lists_its_executions_says_exactly_what_it_saw() -> None:
    """A worker's reading lists the executions in its figures: no mark is needed."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "big", 10_000)  # will use 16,000
    assert monitor.reserve("a:0", "small", 10_000)  # will use 5,000
    netted = reading("a", 0, used_mb=21_000, reserved_mb=20_000, running=("big", "small"))
    monitor.apply([netted], 1.0)
    assert monitor.get("a:0").unseen == {}
    assert monitor.reserve("a:0", "late", 1_000)
    monitor.release("small", peak_mb=5_000, size_mb=10_000)
    # Pushed late, the same reading still lists "small": its correction stays; "late" is unseen.
    monitor.apply([netted], 2.0)
    assert monitor.get("a:0").hidden_mb == 5_000
    assert list(monitor.get("a:0").unseen) == ["late"]
    # A reading without "small" shows the truth; one with "late" has seen it.
    truth = reading("a", 0, used_mb=17_000, reserved_mb=11_000, running=("big", "late"))
    monitor.apply([truth], 3.0)
    assert monitor.get("a:0").hidden_mb == 0
    assert monitor.get("a:0").unseen == {}
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 17_000


def test_placements_during_a_reading_stay_unseen_by_it() -> None:
    """An execution placed while a reading is on its way is not one that reading saw."""
    monitor = two_gpu_monitor()
    mark = monitor.mark()
    assert monitor.reserve("a:0", "late", 10_000)
    monitor.apply([reading("a", 0)], 1.0, mark=mark)
    assert list(monitor.get("a:0").unseen) == ["late"]
    monitor.release("late", peak_mb=1_000, size_mb=10_000)
    assert monitor.get("a:0").hidden_mb == 0  # the reading never counted its spare room


def test_with_the_model_loaded_the_peak_is_compared_with_the_full_size() -> None:
    """The peak includes resident weights; the reservation does not: compare like with like."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "kv", 8_000)  # 14,000 of weights resident, uses 1,000 more
    assert monitor.reserve("a:0", "other", 10_000)  # uses 17,000
    monitor.apply([reading("a", 0, used_mb=14_000 + 18_000, reserved_mb=18_000)], 1.0)
    monitor.release("kv", peak_mb=15_000, size_mb=22_000)
    assert monitor.get("a:0").hidden_mb == 7_000
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN - 14_000 - 17_000


def test_executions_placed_after_the_reading_or_without_a_peak_uncover_nothing() -> None:
    """Only an execution the latest reading saw, ending below its reservation, moves the room."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "seen", 10_000)
    monitor.apply([reading("a", 0, used_mb=10_000, reserved_mb=10_000)], 1.0)
    assert monitor.reserve("a:0", "unseen", 10_000)
    assert list(monitor.get("a:0").unseen) == ["unseen"]
    monitor.release("unseen", peak_mb=2_000)  # the reading never counted it
    monitor.release("seen")  # no peak reported
    assert monitor.get("a:0").hidden_mb == 0
    assert monitor.get("a:0").room_mb == H100_MB - MARGIN
    assert monitor.reserve("a:0", "again", 10_000)
    monitor.apply([reading("a", 0, used_mb=10_000, reserved_mb=10_000)], 2.0)
    monitor.release("again", peak_mb=12_000)  # used more than reserved: frees what it used
    assert monitor.get("a:0").hidden_mb == 0


def test_an_out_of_memory_failure_cuts_the_room_to_what_it_proves_free() -> None:
    """Fewer MiB than the failed execution needed were free: the room says so until a reading."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "hog", 30_000)  # uses 50,000: the reading has not seen it
    assert monitor.reserve("a:0", "failed", 20_000)
    monitor.release("failed", peak_mb=25_000, size_mb=20_000, out_of_memory=True)
    gpu = monitor.get("a:0")
    assert gpu.room_mb == 25_000 - MARGIN - 1
    assert gpu.hidden_mb == H100_MB - MARGIN - 30_000 - gpu.room_mb
    assert not monitor.reserve("a:0", "next", 25_000 - MARGIN)
    assert monitor.get("a:1").room_mb == H100_MB - MARGIN, "only its own GPUs are cut"
    monitor.apply([reading("a", 0, used_mb=50_000, reserved_mb=30_000)], 1.0)
    assert gpu.hidden_mb == 0
    assert gpu.room_mb == H100_MB - MARGIN - 50_000


def test_out_of_memory_without_a_peak_or_with_weights_resident() -> None:
    """No peak: its reservation was not free. Resident weights are not part of what it needed."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "no_peak", 20_000)
    monitor.release("no_peak", out_of_memory=True)
    assert monitor.get("a:0").room_mb == 20_000 - MARGIN - 1
    assert monitor.reserve("a:1", "kv", 8_000)  # 14,000 of weights resident there
    monitor.release("kv", peak_mb=24_000, size_mb=22_000, out_of_memory=True)
    assert monitor.get("a:1").room_mb == 24_000 - 14_000 - MARGIN - 1


def test_out_of_memory_never_raises_the_room_and_a_reading_on_its_way_keeps_the_cut() -> None:
    """A room already below the proof stays; a reading begun before the failure is no proof."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "hog", H100_MB - MARGIN - 5_000)
    assert monitor.reserve("a:0", "failed", 4_000)
    monitor.release("failed", peak_mb=40_000, size_mb=4_000, out_of_memory=True)
    assert monitor.get("a:0").room_mb == 5_000 and monitor.get("a:0").hidden_mb == 0
    assert monitor.reserve("a:1", "failed", 30_000)
    mark = monitor.mark()
    monitor.release("failed", peak_mb=31_000, size_mb=30_000, out_of_memory=True)
    monitor.apply([reading("a", 1)], 1.0, mark=mark)
    assert monitor.get("a:1").room_mb == 31_000 - MARGIN - 1
    monitor.apply([reading("a", 1)], 2.0)
    assert monitor.get("a:1").room_mb == H100_MB - MARGIN


@given(
    st.lists(
        st.tuples(st.sampled_from(["e1", "e2", "e3", "e4"]), st.integers(0, 40_000), st.booleans()),
        max_size=30,
    )
)
def test_room_never_goes_negative_through_reservations(ops: list[tuple[str, int, bool]]) -> None:
    """Reservations never over-commit: room stays ≥ 0 and slots within bounds."""
    monitor = make_monitor()
    monitor.apply([reading("a", 0, slots=3)], 0.0)
    for holder, amount, release in ops:
        if release:
            monitor.release(holder)
        else:
            before = monitor.get("a:0").room_mb
            fits = holder not in monitor.holders_on("a:0") and amount <= before
            ok = monitor.reserve("a:0", holder, amount)
            if ok and fits:
                assert monitor.get("a:0").room_mb == before - amount
        state = monitor.get("a:0")
        assert state.room_mb >= 0
        assert 0 <= state.free_slots <= 3
        assert state.room_mb == H100_MB - MARGIN - sum(state.running.values())


# --- health from readings ---------------------------------------------------------------------


def test_a_gpu_missing_from_a_complete_report_is_lost() -> None:
    """A worker's report without one of its GPUs marks that GPU unhealthy and returns it."""
    monitor = two_gpu_monitor()
    lost = monitor.apply([reading("a", 0)], 5.0, worker="a")
    assert lost == ["a:1"]
    assert monitor.get("a:1").health is GPUHealth.UNHEALTHY
    assert not monitor.get("a:1").schedulable
    assert "a:1" not in monitor.schedulable
    assert monitor.get("a:0").schedulable
    assert monitor.apply([reading("a", 0)], 6.0, worker="a") == []


def test_a_partial_batch_without_worker_marks_nothing_missing() -> None:
    """Readings handed in without ``worker`` are not a complete report."""
    monitor = two_gpu_monitor()
    assert monitor.apply([reading("a", 0)], 5.0) == []
    assert monitor.get("a:1").health is GPUHealth.HEALTHY


def test_uncorrected_ecc_errors_make_a_gpu_unhealthy() -> None:
    """Any uncorrected ECC error makes the GPU unhealthy, and its work is lost."""
    monitor = two_gpu_monitor()
    lost = monitor.apply([reading("a", 0, ecc_uncorrected=1), reading("a", 1)], 1.0, worker="a")
    assert lost == ["a:0"]
    assert monitor.get("a:0").health is GPUHealth.UNHEALTHY
    assert not monitor.get("a:0").schedulable


def test_source_verdict_unhealthy_is_lost() -> None:
    """A source that reports a GPU unhealthy makes it unhealthy."""
    monitor = two_gpu_monitor()
    assert monitor.apply([reading("a", 1, health=GPUHealth.UNHEALTHY)], 1.0) == ["a:1"]
    assert not monitor.get("a:1").schedulable


@pytest.mark.parametrize(("temperature", "health"), [(89.9, "healthy"), (90.0, "degraded")])
def test_hot_gpus_are_degraded_but_schedulable(temperature: float, health: str) -> None:
    """At or above max_temperature_c a GPU is degraded, and still takes work."""
    monitor = two_gpu_monitor()
    assert monitor.apply([reading("a", 0, temperature_c=temperature)], 1.0) == []
    state = monitor.get("a:0")
    assert state.health == health
    assert state.schedulable


def test_a_fresh_good_reading_heals_an_unhealthy_gpu() -> None:
    """An unhealthy GPU comes back once a reading says it is fine."""
    monitor = two_gpu_monitor()
    monitor.apply([reading("a", 0, ecc_uncorrected=2)], 1.0)
    monitor.apply([reading("a", 0)], 2.0)
    assert monitor.get("a:0").health is GPUHealth.HEALTHY
    assert "a:0" in monitor.schedulable


# --- health over time -------------------------------------------------------------------------


def test_no_reading_for_stale_after_s_makes_gpus_unknown() -> None:
    """After stale_after_s without a reading the worker's GPUs are unknown and not schedulable."""
    monitor = two_gpu_monitor(now=0.0)
    assert monitor.refresh(STALE - 0.1) == []
    assert monitor.get("a:0").health is GPUHealth.HEALTHY
    assert monitor.refresh(STALE) == []
    for gpu_id in ("a:0", "a:1"):
        assert monitor.get(gpu_id).health is GPUHealth.UNKNOWN
        assert not monitor.get(gpu_id).schedulable
    assert monitor.schedulable == {}


def test_a_fresh_reading_brings_an_unknown_gpu_back() -> None:
    """A new report of a stale worker makes its GPUs healthy and schedulable again."""
    monitor = two_gpu_monitor(now=0.0)
    monitor.refresh(20.0)
    assert monitor.apply([reading("a", 0), reading("a", 1)], 21.0, worker="a") == []
    assert set(monitor.schedulable) == {"a:0", "a:1"}


def test_unknown_then_unhealthy_reading_counts_as_lost() -> None:
    """A GPU that was unknown and is then reported unhealthy is returned as lost."""
    monitor = two_gpu_monitor(now=0.0)
    monitor.refresh(STALE)
    assert monitor.apply([reading("a", 0, health=GPUHealth.UNHEALTHY)], 11.0) == ["a:0"]


def test_a_failing_source_makes_its_gpus_unhealthy_after_stale_after_s() -> None:
    """A worker whose source keeps failing for stale_after_s loses its GPUs, reported once."""
    monitor = two_gpu_monitor(now=0.0)
    monitor.source_failed("a", 5.0)
    monitor.source_failed("a", 8.0)
    assert monitor.refresh(14.9) == []
    assert monitor.get("a:0").health is GPUHealth.UNKNOWN
    assert sorted(monitor.refresh(15.0)) == ["a:0", "a:1"]
    assert monitor.get("a:0").health is GPUHealth.UNHEALTHY
    assert monitor.refresh(20.0) == []


def test_a_fresh_reading_ends_the_failure() -> None:
    """After a failing source answers again its GPUs are healthy and the failure clock restarts."""
    monitor = two_gpu_monitor(now=0.0)
    monitor.source_failed("a", 1.0)
    monitor.refresh(11.0)
    assert monitor.apply([reading("a", 0), reading("a", 1)], 12.0, worker="a") == []
    assert set(monitor.schedulable) == {"a:0", "a:1"}
    monitor.source_failed("a", 13.0)
    assert monitor.refresh(22.9) == []
    assert monitor.get("a:0").health is GPUHealth.UNKNOWN
    assert sorted(monitor.refresh(23.0)) == ["a:0", "a:1"]


def test_staleness_is_per_worker() -> None:
    """A silent worker goes unknown while a reporting one stays healthy."""
    monitor = make_monitor()
    monitor.apply([reading("a", 0)], 0.0, worker="a")
    monitor.apply([reading("b", 0)], 0.0, worker="b")
    monitor.apply([reading("b", 0)], 8.0, worker="b")
    monitor.refresh(12.0)
    assert monitor.get("a:0").health is GPUHealth.UNKNOWN
    assert monitor.get("b:0").health is GPUHealth.HEALTHY


def test_next_change_is_when_the_next_worker_goes_stale() -> None:
    """next_change is the earliest last-reading + stale_after_s among usable workers."""
    monitor = make_monitor()
    assert monitor.next_change() is None
    monitor.apply([reading("a", 0)], 3.0, worker="a")
    monitor.apply([reading("b", 0)], 1.0, worker="b")
    assert monitor.next_change() == 1.0 + STALE
    monitor.refresh(1.0 + STALE)
    assert monitor.get("b:0").health is GPUHealth.UNKNOWN
    assert monitor.next_change() == 3.0 + STALE
    monitor.refresh(3.0 + STALE)
    assert monitor.next_change() is None


def test_next_change_includes_a_failing_source() -> None:
    """A failing worker whose GPUs are still usable or unknown changes at failing_since + stale."""
    monitor = two_gpu_monitor(now=0.0)
    monitor.source_failed("a", 4.0)
    assert monitor.next_change() == STALE
    monitor.refresh(STALE)
    assert monitor.next_change() == 4.0 + STALE
    monitor.refresh(4.0 + STALE)
    assert monitor.next_change() is None


def test_refresh_at_next_change_makes_a_change() -> None:
    """Refreshing exactly at next_change changes some GPU's health."""
    monitor = two_gpu_monitor(now=2.5)
    when = monitor.next_change()
    assert when is not None
    monitor.refresh(when)
    assert monitor.get("a:0").health is GPUHealth.UNKNOWN


# --- operator actions -------------------------------------------------------------------------


def test_cordon_and_uncordon() -> None:
    """A cordoned GPU is not schedulable; uncordoning makes it schedulable again."""
    monitor = two_gpu_monitor()
    state = monitor.cordon("a:0")
    assert state.cordoned
    assert not state.schedulable
    assert set(monitor.schedulable) == {"a:1"}
    state = monitor.uncordon("a:0")
    assert not state.cordoned
    assert state.schedulable
    assert set(monitor.schedulable) == {"a:0", "a:1"}


def test_cordon_keeps_running_work_and_its_reservation() -> None:
    """Cordoning stops new work only: reservations on the GPU stay."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "exe_1", 1000)
    monitor.cordon("a:0")
    assert monitor.holders_on("a:0") == ["exe_1"]
    assert monitor.get("a:0").reserved_mb == 1000


def test_uncordon_does_not_make_an_unhealthy_gpu_schedulable() -> None:
    """Uncordoning leaves health in charge."""
    monitor = two_gpu_monitor()
    monitor.apply([reading("a", 0, ecc_uncorrected=1)], 1.0)
    monitor.cordon("a:0")
    assert not monitor.uncordon("a:0").schedulable


def test_drain_stays_draining_until_running_work_is_released() -> None:
    """Draining lasts while executions hold the GPU; it ends, still cordoned, after the last."""
    monitor = two_gpu_monitor()
    assert monitor.reserve("a:0", "exe_1", 1000)
    assert monitor.reserve("a:0", "exe_2", 1000)
    state = monitor.drain("a:0")
    assert state.draining
    assert state.cordoned
    assert not state.schedulable
    monitor.release("exe_1")
    assert monitor.get("a:0").draining
    monitor.release("exe_2")
    assert not monitor.get("a:0").draining
    assert monitor.get("a:0").cordoned
    assert not monitor.get("a:0").schedulable


def test_drain_of_an_idle_gpu_is_cordon_only() -> None:
    """An idle GPU has nothing to drain."""
    state = two_gpu_monitor().drain("a:1")
    assert not state.draining
    assert state.cordoned


def test_uncordon_ends_a_drain() -> None:
    """Uncordoning a draining GPU ends the drain and makes it schedulable."""
    monitor = two_gpu_monitor()
    monitor.reserve("a:0", "exe_1", 1000)
    monitor.drain("a:0")
    state = monitor.uncordon("a:0")
    assert not state.draining
    assert state.schedulable


def test_operator_actions_on_unknown_gpus_are_not_found() -> None:
    """Cordon, uncordon and drain of an unknown GPU raise NotFound."""
    monitor = two_gpu_monitor()
    for action in (monitor.cordon, monitor.uncordon, monitor.drain, monitor.holders_on):
        with pytest.raises(NotFound) as info:
            action("z:9")
        assert info.value.resource_id == "z:9"


def test_open_circuit_is_not_schedulable() -> None:
    """An open circuit keeps new work away; closing it lets work back."""
    monitor = two_gpu_monitor()
    monitor.set_circuit("a:0", True)
    assert monitor.get("a:0").circuit_open
    assert not monitor.get("a:0").schedulable
    assert "a:0" not in monitor.schedulable
    monitor.set_circuit("a:0", False)
    assert monitor.get("a:0").schedulable
    monitor.set_circuit("z:9", True)  # an unknown GPU is ignored
    assert "z:9" not in monitor.gpus


def test_gpus_of_a_worker_are_in_index_order() -> None:
    """on_worker lists a worker's GPUs by index, whatever order they were first seen in."""
    monitor = make_monitor()
    monitor.apply([reading("a", 2), reading("a", 0), reading("a", 1)], 0.0)
    assert [state.id for state in monitor.on_worker("a")] == ["a:0", "a:1", "a:2"]
    assert list(monitor.on_worker("nobody")) == []

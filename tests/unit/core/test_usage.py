"""The quota windows in the core's memory: rate admissions and GPU-seconds charges.

These rules were the state store's while it kept the counters; the core keeps them now
(``core/usage.py``), and the store only persists what rides with the status changes.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_request_router.core.state_store import Charge
from gpu_request_router.core.usage import Admission, UsageLedger

MINUTE = 60.0
HOUR = 3600.0
EPOCH = 1_760_000_000.0


def ledger() -> UsageLedger:
    """A ledger with the router's windows: a minute of admissions, an hour of charges."""
    return UsageLedger(MINUTE, HOUR)


def admit(
    usage: UsageLedger, user: str, at: float, limit: int | None, rid: str = ""
) -> float | None:
    """Admit a request of ``user`` at ``at``; the wait when refused."""
    return usage.admit(Admission(user, at, rid or f"req_{user}_{at}"), limit)


def charge(usage: UsageLedger, user: str, charge_id: str, at: float, amount: float) -> None:
    """Charge ``amount`` GPU-seconds to ``user`` under ``charge_id``, dated ``at``."""
    usage.charge(Charge(user, charge_id, at, amount))


# --- rate admissions ------------------------------------------------------------------------------


def test_a_rate_admission_allows_exactly_the_limit_in_a_window() -> None:
    """Three admissions fit a limit of three; the fourth gets the time until the first leaves."""
    usage = ledger()
    assert admit(usage, "alice", 0.0, 3) is None
    assert admit(usage, "alice", 10.0, 3) is None
    assert admit(usage, "alice", 20.0, 3) is None
    assert admit(usage, "alice", 30.0, 3) == pytest.approx(30.0)
    assert usage.admissions("alice", 30.0) == 3


def test_a_refused_admission_is_not_recorded() -> None:
    """Refusals do not count, so a place opens when the oldest admission leaves the window."""
    usage = ledger()
    admit(usage, "alice", 0.0, 2)
    admit(usage, "alice", 50.0, 2)
    for now in (51.0, 55.0, 59.0):
        assert admit(usage, "alice", now, 2) == pytest.approx(60.0 - now)
    assert admit(usage, "alice", 60.0, 2) is None
    assert admit(usage, "alice", 61.0, 2) == pytest.approx(49.0)
    assert usage.admissions("alice", 61.0) == 2


def test_without_a_limit_every_admission_is_counted() -> None:
    """Usage is counted for every user, limited or not."""
    usage = ledger()
    for at in range(5):
        assert admit(usage, "alice", float(at), None) is None
    assert usage.admissions("alice", 5.0) == 5


def test_admissions_are_per_user() -> None:
    """One user's admissions do not use up another's."""
    usage = ledger()
    assert admit(usage, "alice", 0.0, 1) is None
    assert admit(usage, "alice", 1.0, 1) is not None
    assert admit(usage, "bob", 1.0, 1) is None
    assert usage.admissions("carol", 1.0) == 0


def test_an_undone_admission_frees_its_place() -> None:
    """The admission of a request the store never took is forgotten; others stay."""
    usage = ledger()
    assert admit(usage, "alice", 0.0, 2, "r1") is None
    assert admit(usage, "alice", 1.0, 2, "r2") is None
    assert admit(usage, "alice", 2.0, 2, "r3") is not None
    usage.undo_admission("alice", "r1")
    usage.undo_admission("alice", "never")
    usage.undo_admission("nobody", "r1")
    assert usage.admissions("alice", 2.0) == 1
    assert admit(usage, "alice", 2.0, 2, "r3") is None


@given(
    # Clock readings as a router sees them: epoch seconds with sub-millisecond jitter.
    times=st.lists(st.integers(0, 300_000_000).map(lambda us: EPOCH + us / 1e6), max_size=40).map(
        sorted
    ),
    limit=st.integers(1, 5),
)
def test_admissions_in_any_window_never_pass_the_limit(times: list[float], limit: int) -> None:
    """Over any sequence of attempts, no 60 s window holds more than ``limit`` admissions."""
    usage = ledger()
    admitted: list[float] = []
    for index, now in enumerate(times):
        retry_after = admit(usage, "u", now, limit, f"r{index}")
        recent = [t for t in admitted if t > now - MINUTE]
        if retry_after is None:
            assert len(recent) < limit
            admitted.append(now)
        else:
            assert len(recent) >= limit
            assert retry_after == pytest.approx(min(recent) + MINUTE - now, abs=1e-6)
            assert 0 < retry_after <= MINUTE + 1e-6
            later = now + retry_after
            assert len([t for t in admitted if t > later - MINUTE]) < limit


def test_retry_after_is_positive_despite_float_rounding() -> None:
    """An admission far smaller than the window still yields a positive, sufficient wait."""
    usage = ledger()
    assert admit(usage, "u", 1e-128, 1, "r1") is None
    retry_after = admit(usage, "u", 60.0, 1, "r2")
    assert retry_after is not None
    assert retry_after > 0
    assert admit(usage, "u", 60.0 + retry_after, 1, "r3") is None


# --- GPU-seconds charges --------------------------------------------------------------------------


def test_charges_add_up_in_the_window() -> None:
    """GPU-seconds of several charges add up, per user."""
    usage = ledger()
    charge(usage, "alice", "c1", 0.0, 10.0)
    charge(usage, "alice", "c2", 5.0, 20.0)
    charge(usage, "bob", "c3", 5.0, 99.0)
    assert usage.gpu_seconds("alice", 10.0) == 30.0
    assert usage.gpu_seconds("bob", 10.0) == 99.0
    assert usage.gpu_seconds("carol", 10.0) == 0.0


def test_charging_the_same_id_replaces() -> None:
    """A second charge with the same id settles the first instead of adding to it."""
    usage = ledger()
    charge(usage, "alice", "exe_1", 0.0, 100.0)
    charge(usage, "alice", "exe_2", 1.0, 5.0)
    charge(usage, "alice", "exe_1", 0.0, 40.0)
    assert usage.gpu_seconds("alice", 2.0) == 45.0


def test_charges_older_than_the_window_drop_out() -> None:
    """A charge leaves the window once it is an hour old."""
    usage = ledger()
    charge(usage, "alice", "c1", 0.0, 10.0)
    charge(usage, "alice", "c2", 100.0, 20.0)
    assert usage.gpu_seconds("alice", 3599.0) == 30.0
    assert usage.gpu_seconds("alice", 3600.0) == 20.0
    assert usage.gpu_seconds("alice", 3700.0) == 0.0


@pytest.mark.parametrize("amount", [float("inf"), float("nan"), -1.0])
def test_a_charge_no_window_could_hold_is_refused_and_changes_nothing(amount: float) -> None:
    """Negative, infinite or NaN GPU-seconds are refused; the window keeps what it had."""
    usage = ledger()
    charge(usage, "alice", "c1", 0.0, 10.0)
    with pytest.raises(ValueError, match="GPU-seconds"):
        charge(usage, "alice", "c2", 1.0, amount)
    with pytest.raises(ValueError, match="GPU-seconds"):
        charge(usage, "alice", "c1", 0.0, amount)
    assert usage.gpu_seconds("alice", 2.0) == 10.0
    charge(usage, "alice", "c1", 0.0, 4.0)
    assert usage.gpu_seconds("alice", 2.0) == 4.0


def test_oldest_charge_in_window() -> None:
    """The oldest charge still counted tells when usage next drops; None when there is none."""
    usage = ledger()
    assert usage.oldest_charge("alice", 0.0) is None
    charge(usage, "alice", "c1", 10.0, 1.0)
    charge(usage, "alice", "c2", 20.0, 1.0)
    assert usage.oldest_charge("alice", 100.0) == 10.0
    assert usage.oldest_charge("alice", 3610.0) == 20.0
    assert usage.oldest_charge("alice", 3620.0) is None


def test_settling_a_charge_that_already_left_the_window_does_not_count() -> None:
    """Re-charging an id dated outside the window, after it dropped out, adds nothing."""
    usage = ledger()
    charge(usage, "alice", "long", 0.0, 10.0)
    charge(usage, "alice", "short", 3000.0, 5.0)
    assert usage.gpu_seconds("alice", 3700.0) == 5.0
    charge(usage, "alice", "long", 0.0, 4000.0)
    assert usage.gpu_seconds("alice", 3700.0) == 5.0
    assert usage.oldest_charge("alice", 3700.0) == 3000.0


def test_charges_recorded_out_of_time_order_drop_out_on_time() -> None:
    """A charge dated before an earlier-recorded one still leaves the window at its own time."""
    usage = ledger()
    charge(usage, "alice", "b", 100.0, 2.0)
    charge(usage, "alice", "a", 50.0, 1.0)
    assert usage.oldest_charge("alice", 200.0) == 50.0
    assert usage.gpu_seconds("alice", 3660.0) == 2.0
    assert usage.oldest_charge("alice", 3660.0) == 100.0


def test_an_undone_charge_counts_for_nothing_and_its_id_starts_afresh() -> None:
    """A charge whose status change was never stored is forgotten; charging the id again adds."""
    usage = ledger()
    charge(usage, "alice", "exe_1", 0.0, 10.0)
    charge(usage, "alice", "exe_2", 1.0, 3.0)
    usage.undo_charge("alice", "exe_1")
    usage.undo_charge("alice", "never")
    assert usage.gpu_seconds("alice", 2.0) == 3.0
    assert usage.oldest_charge("alice", 2.0) == 1.0
    charge(usage, "alice", "exe_1", 2.0, 7.0)
    assert usage.gpu_seconds("alice", 3.0) == 10.0


def test_what_the_store_kept_is_loaded_back() -> None:
    """After a restart the windows are refilled, in any order, and keep their rules."""
    usage = ledger()
    usage.load(
        [Admission("alice", 30.0, "r2"), Admission("alice", 10.0, "r1")],
        [Charge("alice", "exe_2", 20.0, 5.0), Charge("alice", "exe_1", 10.0, 8.0)],
    )
    assert usage.admissions("alice", 60.0) == 2
    assert admit(usage, "alice", 60.0, 2, "r3") == pytest.approx(10.0)
    assert usage.gpu_seconds("alice", 60.0) == 13.0
    assert usage.oldest_charge("alice", 60.0) == 10.0
    charge(usage, "alice", "exe_1", 10.0, 2.0)
    assert usage.gpu_seconds("alice", 60.0) == 7.0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["c1", "c2", "c3", "c4"]),
            st.integers(0, 100),
            st.integers(0, 50),
        ),
        max_size=25,
    ),
    st.integers(0, 200),
)
def test_usage_equals_the_latest_amount_of_each_charge_in_the_window(
    charges: list[tuple[str, int, int]], now_offset: int
) -> None:
    """Usage is the sum, over charge ids dated inside the window, of each id's latest amount."""
    usage = UsageLedger(MINUTE, 150.0)
    latest: dict[str, tuple[int, int]] = {}
    for charge_id, at, amount in sorted(charges, key=lambda c: c[1]):
        charge(usage, "u", charge_id, float(at), float(amount))
        first_at = latest.get(charge_id, (at, 0))[0]
        latest[charge_id] = (first_at, amount)
    now = 100.0 + now_offset
    expected = sum(amount for at, amount in latest.values() if at > now - 150.0)
    assert usage.gpu_seconds("u", now) == pytest.approx(expected)

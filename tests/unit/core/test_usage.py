"""UsageLedger: each user's rate admissions and GPU-seconds charges in sliding windows.

Checked by hand on small cases, against a model of its own (a list of timestamped entries per
user), and through a store: what the store keeps, loaded back, counts as it did.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gpu_request_router.core.request_router import transition_of
from gpu_request_router.core.state_store import Charge, StateChange
from gpu_request_router.core.usage import Admission, UsageLedger
from gpu_request_router.models.request import Estimate, Placement, Request, RequestStatus, Task
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.store.sqlite import SQLiteStore

RATE_S = 60.0
CHARGE_S = 3600.0
EPOCH = 1_700_000_000.0


def ledger() -> UsageLedger:
    """A ledger with the router's windows: a minute of admissions, an hour of charges."""
    return UsageLedger(RATE_S, CHARGE_S)


def admit(
    usage: UsageLedger, at: float, limit: int | None, rid: str = "r", user: str = "u"
) -> float | None:
    """Admit request ``rid`` of ``user`` at ``at``; None, or the seconds to wait."""
    return usage.admit(Admission(user, at, rid), limit)


# --- admissions --------------------------------------------------------------------------------


def test_exactly_the_limit_is_admitted_in_a_window() -> None:
    """Three fit a limit of three; the fourth waits until the first leaves the window."""
    usage = ledger()
    assert admit(usage, 0.0, 3, "a") is None
    assert admit(usage, 10.0, 3, "b") is None
    assert admit(usage, 20.0, 3, "c") is None
    assert admit(usage, 30.0, 3, "d") == 30.0
    assert usage.admissions("u", 30.0) == 3
    assert usage.admissions("u", 60.0) == 2  # the one at 0 left exactly 60 s later
    assert admit(usage, 60.0, 3, "d") is None


def test_a_refused_admission_is_not_counted() -> None:
    """Refusals never take a place, so a place opens when the oldest admission leaves."""
    usage = ledger()
    admit(usage, 0.0, 2, "a")
    admit(usage, 50.0, 2, "b")
    for now in (51.0, 55.0, 59.0):
        assert admit(usage, now, 2, f"x{now}") == 60.0 - now
    assert usage.admissions("u", 59.0) == 2
    assert admit(usage, 60.0, 2, "c") is None
    assert admit(usage, 61.0, 2, "d") == 49.0


def test_no_limit_admits_and_counts_everything() -> None:
    """Without a limit every admission is taken, and each counts."""
    usage = ledger()
    for index in range(10):
        assert admit(usage, float(index), None, f"r{index}") is None
    assert usage.admissions("u", 9.0) == 10


def test_admissions_are_per_user() -> None:
    """One user's admissions use up nothing of another's."""
    usage = ledger()
    assert admit(usage, 0.0, 1, "a", user="alice") is None
    assert admit(usage, 1.0, 1, "b", user="alice") is not None
    assert admit(usage, 1.0, 1, "c", user="bob") is None
    assert usage.admissions("carol", 1.0) == 0


def test_retry_after_is_positive_and_sufficient_despite_float_rounding() -> None:
    """An admission far smaller than the window still yields a wait that is > 0 and enough."""
    usage = ledger()
    assert admit(usage, 1e-128, 1, "a") is None
    wait = admit(usage, 60.0, 1, "b")
    assert wait is not None
    assert wait > 0
    assert admit(usage, 60.0 + wait, 1, "b") is None


def test_an_undone_admission_frees_its_place() -> None:
    """The admission of a request the store could not take is forgotten; others stay."""
    usage = ledger()
    admit(usage, 0.0, 2, "a")
    admit(usage, 1.0, 2, "b")
    assert admit(usage, 2.0, 2, "c") is not None
    usage.undo_admission("u", "b")
    assert usage.admissions("u", 2.0) == 1
    usage.undo_admission("u", "never")  # unknown ids and users change nothing
    usage.undo_admission("nobody", "a")
    assert usage.admissions("u", 2.0) == 1
    assert admit(usage, 2.0, 2, "c") is None
    assert admit(usage, 3.0, 2, "d") == 57.0  # "a" at 0 is still the oldest


# --- charges -----------------------------------------------------------------------------------


def test_charges_add_up_per_user_in_the_window() -> None:
    """GPU-seconds of several charges add up, per user."""
    usage = ledger()
    usage.charge(Charge("alice", "c1", 0.0, 10.0))
    usage.charge(Charge("alice", "c2", 5.0, 20.0))
    usage.charge(Charge("bob", "c3", 5.0, 99.0))
    assert usage.gpu_seconds("alice", 10.0) == 30.0
    assert usage.gpu_seconds("bob", 10.0) == 99.0
    assert usage.gpu_seconds("carol", 10.0) == 0.0
    assert usage.oldest_charge("carol", 10.0) is None


def test_charging_an_id_again_replaces_its_amount_and_keeps_its_time() -> None:
    """A reconciled charge settles the first, and still leaves the window at the first time."""
    usage = ledger()
    usage.charge(Charge("u", "exe_1", 0.0, 100.0))
    usage.charge(Charge("u", "exe_2", 1.0, 5.0))
    usage.charge(Charge("u", "exe_1", 500.0, 40.0))
    assert usage.gpu_seconds("u", 600.0) == 45.0
    assert usage.oldest_charge("u", 600.0) == 0.0
    assert usage.gpu_seconds("u", CHARGE_S) == 5.0  # exe_1 left at 0 + 3600, not 500 + 3600


def test_charges_leave_the_window_at_their_own_time() -> None:
    """A charge leaves once it is a window old, recorded in time order or not."""
    usage = ledger()
    usage.charge(Charge("u", "b", 100.0, 2.0))
    usage.charge(Charge("u", "a", 50.0, 1.0))
    assert usage.oldest_charge("u", 200.0) == 50.0
    assert usage.gpu_seconds("u", 3649.0) == 3.0
    assert usage.gpu_seconds("u", 3650.0) == 2.0
    assert usage.oldest_charge("u", 3650.0) == 100.0
    assert usage.gpu_seconds("u", 3700.0) == 0.0
    assert usage.oldest_charge("u", 3700.0) is None


def test_a_charge_dated_before_the_window_counts_for_nothing() -> None:
    """Settling an execution dispatched more than a window ago adds nothing to usage."""
    usage = ledger()
    usage.charge(Charge("u", "short", 3000.0, 5.0))
    assert usage.gpu_seconds("u", 3700.0) == 5.0
    usage.charge(Charge("u", "long", 0.0, 4000.0))
    assert usage.gpu_seconds("u", 3700.0) == 5.0
    assert usage.oldest_charge("u", 3700.0) == 3000.0


def test_a_charge_that_left_the_window_is_forgotten() -> None:
    """Once pruned, charging its id again starts a new charge at the new time."""
    usage = ledger()
    usage.charge(Charge("u", "c", 0.0, 10.0))
    assert usage.gpu_seconds("u", 3600.0) == 0.0  # prunes it
    usage.charge(Charge("u", "c", 3500.0, 7.0))
    assert usage.gpu_seconds("u", 3601.0) == 7.0
    assert usage.oldest_charge("u", 3601.0) == 3500.0


def test_an_undone_charge_is_forgotten() -> None:
    """The charge of a status change the store could not take counts no more."""
    usage = ledger()
    usage.charge(Charge("u", "keep", 0.0, 1.5))
    usage.charge(Charge("u", "undo", 1.0, 8.0))
    usage.undo_charge("u", "undo")
    assert usage.gpu_seconds("u", 2.0) == 1.5
    usage.undo_charge("u", "undo")  # twice, or unknown: nothing changes
    usage.undo_charge("nobody", "keep")
    assert usage.gpu_seconds("u", 2.0) == 1.5
    usage.charge(Charge("u", "undo", 2.0, 3.0))  # a new charge of that id, at its own time
    assert usage.gpu_seconds("u", 2.0) == 4.5
    assert usage.gpu_seconds("u", 3601.0) == 3.0


@pytest.mark.parametrize("amount", [math.inf, math.nan, -1.0])
def test_a_charge_no_window_could_hold_is_refused_and_changes_nothing(amount: float) -> None:
    """Negative, infinite or NaN GPU-seconds raise ValueError; the window keeps what it had."""
    usage = ledger()
    usage.charge(Charge("u", "c1", 0.0, 10.0))
    with pytest.raises(ValueError, match="GPU-seconds"):
        usage.charge(Charge("u", "c2", 1.0, amount))
    with pytest.raises(ValueError, match="GPU-seconds"):
        usage.charge(Charge("u", "c1", 0.0, amount))
    assert usage.gpu_seconds("u", 2.0) == 10.0
    usage.charge(Charge("u", "c1", 0.0, 4.0))
    assert usage.gpu_seconds("u", 2.0) == 4.0


def test_usage_is_exactly_zero_once_every_charge_has_left() -> None:
    """Amounts that do not add up exactly in floating point leave no residue behind."""
    usage = ledger()
    usage.charge(Charge("u", "a", 0.0, 0.1))
    usage.charge(Charge("u", "b", 1.0, 0.2))
    usage.charge(Charge("u", "c", 2.0, 0.7))
    usage.undo_charge("u", "c")
    assert usage.gpu_seconds("u", 2.0) == pytest.approx(0.3)
    assert usage.gpu_seconds("u", 3600.0) == pytest.approx(0.2)
    assert usage.gpu_seconds("u", 3601.0) == 0.0
    usage.charge(Charge("u", "d", 3601.0, 0.7))
    usage.undo_charge("u", "d")
    assert usage.gpu_seconds("u", 3601.0) == 0.0


# --- loading what a store kept ------------------------------------------------------------------


def test_load_takes_back_admissions_and_charges_in_any_order() -> None:
    """Loaded admissions and charges count as recorded ones, each leaving at its own time."""
    usage = ledger()
    usage.load(
        [Admission("u", 30.0, "b"), Admission("u", 10.0, "a"), Admission("v", 20.0, "c")],
        [Charge("u", "c2", 200.0, 2.0), Charge("u", "c1", 100.0, 1.0)],
    )
    assert usage.admissions("u", 40.0) == 2
    assert admit(usage, 40.0, 2, "d") == 30.0  # until "a" at 10 leaves
    assert usage.admissions("u", 70.0) == 1
    assert usage.admissions("v", 40.0) == 1
    assert usage.gpu_seconds("u", 300.0) == 3.0
    assert usage.oldest_charge("u", 300.0) == 100.0
    usage.charge(Charge("u", "c1", 100.0, 6.0))  # a loaded charge is replaced like any other
    assert usage.gpu_seconds("u", 300.0) == 8.0


_ESTIMATE = Estimate(gpu_memory_mb=1, weights_mb=0, kv_cache_mb=1, activations_mb=0, duration_s={})


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_ledger_loaded_from_a_stores_history_counts_as_the_live_one(
    kind: str, tmp_path: Path
) -> None:
    """After a restart, the store's quota_history loaded back gives the same answers."""
    live = ledger()
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "state.db")
    try:
        for index in range(6):
            at = EPOCH + 20.0 * index
            request = Request(
                id=f"r{index}",
                user="u",
                model="m",
                task=Task.CHAT,
                priority="normal",
                estimate=_ESTIMATE,
                created_at=at,
            )
            assert admit(live, at, None, request.id) is None
            changes = [StateChange(request.snapshot(), transition_of(request, None, "u", at))]
            before = request.transition(
                RequestStatus.DISPATCHING, at, placement=Placement("w", ("g",))
            )
            charge = Charge("u", request.execution_id, at, 10.0 * index)
            live.charge(charge)
            changes.append(
                StateChange(
                    request.snapshot(), transition_of(request, before, "router", at), charge
                )
            )
            store.write(changes)
        now = EPOCH + 130.0
        history = store.quota_history(now, RATE_S, CHARGE_S)
    finally:
        store.close()
    loaded = ledger()
    loaded.load((Admission(user, at, rid) for user, at, rid in history.admissions), history.charges)
    assert loaded.admissions("u", now) == 2  # those at +80 and +100 (+70 is the window's edge)
    assert loaded.gpu_seconds("u", now) == 150.0
    for later in (now, now + 30.0, now + 3500.0):
        assert loaded.admissions("u", later) == live.admissions("u", later)
        assert loaded.gpu_seconds("u", later) == live.gpu_seconds("u", later)
        assert loaded.oldest_charge("u", later) == live.oldest_charge("u", later)


# --- against a model ---------------------------------------------------------------------------


class Model:
    """The rules written plainly: each user's entries as a list of (time, id, amount)."""

    def __init__(self) -> None:
        self.admissions: dict[str, list[tuple[float, str]]] = {}
        self.charges: dict[str, list[list[object]]] = {}

    def prune(self, user: str, now: float) -> None:
        kept = [c for c in self.charges.get(user, []) if c[0] > now - CHARGE_S]  # type: ignore[operator]
        self.charges[user] = kept

    def in_rate_window(self, user: str, now: float) -> list[tuple[float, str]]:
        kept = [a for a in self.admissions.get(user, []) if a[0] > now - RATE_S]
        self.admissions[user] = kept
        return kept


_users = st.sampled_from(["u", "v"])
_times = st.integers(0, 8000).map(lambda t: EPOCH + t / 2)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), _users, _times, st.integers(1, 3)),
        st.tuples(st.just("undo_admission"), _users, st.integers(0, 20)),
        st.tuples(
            st.just("charge"),
            _users,
            _times,
            st.sampled_from(["c1", "c2", "c3"]),
            st.sampled_from([0.0, 0.1, 0.2, 2.5, 7.0]),
        ),
        st.tuples(st.just("undo_charge"), _users, st.sampled_from(["c1", "c2", "c3"])),
        st.tuples(st.just("read"), _users, _times),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_ops)
@example(
    [
        ("charge", "u", EPOCH, "c1", 0.1),
        ("charge", "u", EPOCH, "c2", 0.2),
        ("read", "u", EPOCH + 4000),
    ]
)
@example(  # the limit lowered after two admissions: both must leave, not just the oldest
    [("admit", "u", EPOCH + 0.5, 1), ("admit", "u", EPOCH, 2), ("admit", "u", EPOCH + 0.5, 1)]
)
def test_the_ledger_answers_as_the_model(ops: list[tuple[object, ...]]) -> None:
    """Any sequence of admissions, charges, undos and reads, clock jumps included.

    Admission: taken while fewer than the limit are in the window, else a wait that is exact,
    positive and enough. Usage: the sum of the entries still in the window, exactly 0 when none
    is; the oldest entry's time.
    """
    usage, model = ledger(), Model()
    ids = iter(range(10_000))
    for op in ops:
        if op[0] == "admit":
            _, user, at, limit = op
            assert isinstance(user, str) and isinstance(at, float) and isinstance(limit, int)
            rid = f"r{next(ids)}"
            recent = model.in_rate_window(user, at)
            wait = admit(usage, at, limit, rid, user)
            if len(recent) < limit:
                assert wait is None
                model.admissions[user].append((at, rid))
            else:
                assert wait is not None
                # As many must leave as are over the limit, and one more.
                leaving = sorted(t for t, _ in recent)[len(recent) - limit]
                assert wait > 0
                assert wait == pytest.approx(leaving + RATE_S - at, abs=1e-6)
                if all(t <= at for t, _ in recent):  # enough, on a clock that went forward
                    assert len([t for t, _ in recent if t > at + wait - RATE_S]) < limit
        elif op[0] == "undo_admission":
            _, user, index = op
            assert isinstance(user, str) and isinstance(index, int)
            entries = model.admissions.get(user, [])
            rid = entries[index % len(entries)][1] if entries else "none"
            usage.undo_admission(user, rid)
            model.admissions[user] = [a for a in entries if a[1] != rid]
        elif op[0] == "charge":
            _, user, at, charge_id, amount = op
            assert isinstance(user, str) and isinstance(at, float) and isinstance(charge_id, str)
            assert isinstance(amount, float)
            usage.charge(Charge(user, charge_id, at, amount))
            entries = model.charges.setdefault(user, [])
            kept = next((c for c in entries if c[1] == charge_id), None)
            if kept is None:
                entries.append([at, charge_id, amount])
            else:
                kept[2] = amount
        elif op[0] == "undo_charge":
            _, user, charge_id = op
            assert isinstance(user, str) and isinstance(charge_id, str)
            usage.undo_charge(user, charge_id)
            model.charges[user] = [c for c in model.charges.get(user, []) if c[1] != charge_id]
        else:
            _, user, now = op
            assert isinstance(user, str) and isinstance(now, float)
            model.prune(user, now)
            entries = model.charges[user]
            expected = sum(float(c[2]) for c in entries)  # type: ignore[arg-type]
            used = usage.gpu_seconds(user, now)
            assert used == pytest.approx(expected, abs=1e-9)
            if not entries:
                assert used == 0.0
            oldest = min((float(c[0]) for c in entries), default=None)  # type: ignore[arg-type]
            assert usage.oldest_charge(user, now) == oldest
            assert usage.admissions(user, now) == len(model.in_rate_window(user, now))

"""Each user's quota counters, in memory: rate admissions and GPU-seconds charges in windows.

The core decides quota in memory and hands what must persist to the store with its decisions
(an admission rides with the request it admits, a charge with the status change of its
execution). After a restart the windows are refilled from the store (:meth:`UsageLedger.load`).

Rules, as the stores keep them:

- an admission is counted at its time for ``window_s``; a refused one counts for nothing;
- a charge is GPU-seconds dated at its execution's dispatch; charging its id again replaces the
  amount of a charge still in the window (which keeps its time); a charge that has left the
  window is forgotten, so charging its id again starts a new one; a charge dated before the
  window counts for nothing.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from gpu_request_router.core.state_store import Charge, check_charge, retry_after

__all__ = ["Admission", "UsageLedger"]


@dataclass(frozen=True, slots=True)
class Admission:
    """A rate admission: ``user`` admitted request ``request_id`` at ``at``."""

    user: str
    at: float
    request_id: str


class _Entry:
    """One timestamped amount in a window; its amount can be corrected in place."""

    __slots__ = ("amount", "at", "entry_id")

    def __init__(self, at: float, entry_id: str, amount: float) -> None:
        self.at = at
        self.entry_id = entry_id
        self.amount = amount


def _at(entry: _Entry) -> float:
    return entry.at


class _Window:
    """A sliding window of entries (oldest first) with a running total."""

    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.total = 0.0

    def add(self, at: float, entry_id: str, amount: float) -> _Entry:
        """Add an entry in time order (usually at the end), so that pruning stays exact."""
        entry = _Entry(at, entry_id, amount)
        entries = self.entries
        if not entries or entries[-1].at <= at:
            entries.append(entry)
        else:
            entries.insert(bisect.bisect_right(entries, at, key=_at), entry)
        self.total += amount
        return entry

    def prune(self, cutoff: float) -> list[str]:
        """Drop entries at or before ``cutoff``; return their ids."""
        dropped = []
        entries = self.entries
        while entries and entries[0].at <= cutoff:
            entry = entries.popleft()
            self.total -= entry.amount
            dropped.append(entry.entry_id)
        if not entries:
            self.total = 0.0  # no rounding left behind by the amounts that came and went
        return dropped

    def remove(self, entry_id: str) -> None:
        """Drop the entry ``entry_id`` wherever it is (rare: an admission undone)."""
        for entry in self.entries:
            if entry.entry_id == entry_id:
                self.entries.remove(entry)
                self.total = self.total - entry.amount if self.entries else 0.0
                return

    def oldest(self) -> float | None:
        return self.entries[0].at if self.entries else None


class UsageLedger:
    """Admissions per user within ``rate_window_s``, charges per user within ``charge_window_s``."""

    def __init__(self, rate_window_s: float, charge_window_s: float) -> None:
        self._rate_window_s = rate_window_s
        self._charge_window_s = charge_window_s
        self._admissions: dict[str, _Window] = {}
        self._charges: dict[str, _Window] = {}
        self._charge_index: dict[tuple[str, str], _Entry] = {}

    def load(self, admissions: Iterable[Admission], charges: Iterable[Charge]) -> None:
        """Add what the store kept (after a restart), in any order."""
        for admission in admissions:
            window = self._admissions.setdefault(admission.user, _Window())
            window.add(admission.at, admission.request_id, 1.0)
        for charge in charges:
            self.charge(charge)

    # Admissions ----------------------------------------------------------------------------------

    def admit(self, admission: Admission, limit: int | None) -> float | None:
        """Record an admission unless ``limit`` are in the window; else the seconds to wait.

        The wait is positive and enough: an admission that much later is accepted (it waits for
        as many admissions to leave as are over the limit, one more than that: a limit lowered
        since may leave more than one to wait for). Admissions that have left the window are
        dropped either way.
        """
        window = self._admissions.setdefault(admission.user, _Window())
        window.prune(admission.at - self._rate_window_s)
        entries = window.entries
        if limit is not None and len(entries) >= limit:
            # The limit is at least 1 (the quota's validation).
            return retry_after(admission.at, entries[len(entries) - limit].at, self._rate_window_s)
        window.add(admission.at, admission.request_id, 1.0)
        return None

    def undo_admission(self, user: str, request_id: str) -> None:
        """Forget the admission of a request that was never stored."""
        window = self._admissions.get(user)
        if window is not None:
            window.remove(request_id)

    def admissions(self, user: str, now: float) -> int:
        """How many admissions of ``user`` fall within the window ending ``now``."""
        window = self._admissions.get(user)
        if window is None:
            return 0
        window.prune(now - self._rate_window_s)
        if not window.entries:
            del self._admissions[user]
        return len(window.entries)

    # Charges -------------------------------------------------------------------------------------

    def charge(self, charge: Charge) -> None:
        """Record a charge (see the module docstring); a negative or non-finite one is refused.

        Raises:
            ValueError: ``gpu_seconds`` is negative or not finite (nothing is recorded).
        """
        check_charge(charge.gpu_seconds)
        user, charge_id, amount = charge.user, charge.charge_id, charge.gpu_seconds
        entry = self._charge_index.get((user, charge_id))
        if entry is not None:
            window = self._charges[user]
            window.total += amount - entry.amount
            entry.amount = amount
            return
        window = self._charges.setdefault(user, _Window())
        self._charge_index[(user, charge_id)] = window.add(charge.at, charge_id, amount)

    def undo_charge(self, user: str, charge_id: str) -> None:
        """Forget a charge whose status change was never stored."""
        entry = self._charge_index.pop((user, charge_id), None)
        if entry is not None:
            self._charges[user].remove(charge_id)

    def gpu_seconds(self, user: str, now: float) -> float:
        """GPU-seconds charged to ``user`` at times within the window ending ``now``."""
        window = self._pruned(user, now)
        return 0.0 if window is None else max(0.0, window.total)

    def oldest_charge(self, user: str, now: float) -> float | None:
        """The time of the oldest charge still in the window (when usage next drops)."""
        window = self._pruned(user, now)
        return None if window is None else window.oldest()

    def _pruned(self, user: str, now: float) -> _Window | None:
        window = self._charges.get(user)
        if window is not None:
            for charge_id in window.prune(now - self._charge_window_s):
                self._charge_index.pop((user, charge_id), None)
        return window

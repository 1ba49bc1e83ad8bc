"""An in-memory :class:`StateStore`: fast and exact, for tests, simulation and single runs."""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

from gpu_request_router.core.state_store import (
    Charge,
    Page,
    RateAdmission,
    RateRefused,
    RequestQuery,
    StateStore,
    check_charge,
    decode_cursor,
    encode_cursor,
    retry_after,
)
from gpu_request_router.models.request import Request, RequestStatus, Transition
from gpu_request_router.store._reservations import ReservationLedger

__all__ = ["MemoryStore"]


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
        return dropped

    def oldest(self) -> float | None:
        return self.entries[0].at if self.entries else None


class MemoryStore(StateStore):
    """Keeps everything in dictionaries; nothing survives the process."""

    def __init__(self) -> None:
        self._requests: dict[str, Request] = {}
        self._by_key: dict[tuple[str, str], str] = {}
        self._unfinished: OrderedDict[str, None] = OrderedDict()
        self._reservations = ReservationLedger()
        self._admissions: dict[str, _Window] = {}
        self._charges: dict[str, _Window] = {}
        self._charge_index: dict[tuple[str, str], _Entry] = {}
        self._trails: dict[str, list[Transition]] = {}
        self._overrides: dict[str, dict[str, Any]] = {}

    # Requests ------------------------------------------------------------------------------

    def add_request(
        self, request: Request, created: Transition, admission: RateAdmission | None = None
    ) -> Request:
        """Store a new request and its creation entry, or return the one with its key."""
        key = None
        if request.idempotency_key is not None:
            key = (request.user, request.idempotency_key)
            existing = self._by_key.get(key)
            if existing is not None:
                return self._requests[existing].snapshot()
        if admission is not None:
            self._admit(request.user, admission)
        if key is not None:
            self._by_key[key] = request.id
        self._requests[request.id] = request.snapshot()
        self._trails[request.id] = [created]
        if not request.status.terminal:
            self._unfinished[request.id] = None
        return request.snapshot()

    def get_request(self, request_id: str) -> Request | None:
        """The stored request, or ``None``."""
        stored = self._requests.get(request_id)
        return None if stored is None else stored.snapshot()

    def find_idempotent(self, user: str, key: str) -> Request | None:
        """The request ``user`` submitted with idempotency key ``key``, or ``None``."""
        request_id = self._by_key.get((user, key))
        return None if request_id is None else self._requests[request_id].snapshot()

    def transition(
        self,
        request: Request,
        from_status: RequestStatus,
        attempt: int,
        change: Transition,
        charge: Charge | None = None,
    ) -> bool:
        """Write ``request`` and its entry if the stored one has ``from_status``, ``attempt``."""
        if charge is not None:
            check_charge(charge.gpu_seconds)
        stored = self._requests.get(request.id)
        if stored is None or stored.status is not from_status or stored.attempts != attempt:
            return False
        if charge is not None:
            self._charge(charge)
        self._requests[request.id] = request.snapshot()
        self._trails[request.id].append(change)
        if request.status.terminal:
            self._unfinished.pop(request.id, None)
        return True

    def transitions(self, request_id: str, after: int = -1) -> list[Transition]:
        """The request's audit trail, oldest first, after entry ``after``."""
        return [entry for entry in self._trails.get(request_id, ()) if entry.seq > after]

    def list_requests(self, query: RequestQuery) -> Page:
        """Requests matching ``query``, newest first, one page at a time."""
        after = decode_cursor(query.cursor) if query.cursor else None
        candidates: Iterable[Request] = (r for r in self._requests.values() if query.matches(r))
        ordered = sorted(candidates, key=lambda r: (r.created_at, r.id), reverse=True)
        if after is not None:
            ordered = [r for r in ordered if (r.created_at, r.id) < after]
        items = [r.snapshot() for r in ordered[: query.limit]]
        more = len(ordered) > query.limit
        return Page(items=items, next_cursor=encode_cursor(items[-1]) if more else None)

    def unfinished_requests(self) -> list[Request]:
        """Every request not yet in a terminal status, oldest first."""
        unfinished = (self._requests[request_id] for request_id in self._unfinished)
        ordered = sorted(unfinished, key=lambda r: (r.created_at, r.id))
        return [request.snapshot() for request in ordered]

    # Quota overrides --------------------------------------------------------------------------

    def quota_overrides(self) -> dict[str, dict[str, Any]]:
        """Per-user quota overrides set at run time."""
        return {user: dict(values) for user, values in self._overrides.items()}

    def set_quota_override(self, user: str, values: dict[str, Any]) -> None:
        """Replace ``user``'s run-time quota override."""
        self._overrides[user] = dict(values)

    def ping(self) -> None:
        """Always usable."""

    def check_writable(self, now: float) -> None:
        """Always takes writes."""

    # GPU memory reservations -----------------------------------------------------------------

    def reserve(self, gpu_id: str, holder: str, memory_mb: int, limit_mb: int) -> int | None:
        """Reserve memory on a GPU unless the total would pass ``limit_mb``."""
        return self._reservations.reserve(gpu_id, holder, memory_mb, limit_mb)

    def release(self, holder: str) -> dict[str, int]:
        """Drop every reservation of ``holder``; return each touched GPU's new reserved total."""
        return self._reservations.release(holder)

    def reserved_mb(self, gpu_id: str) -> int:
        """The memory reserved on a GPU right now."""
        return self._reservations.reserved_mb(gpu_id)

    # Quota counters ----------------------------------------------------------------------------

    def _admit(self, user: str, admission: RateAdmission) -> None:
        """Record ``user``'s admission, or raise ``RateRefused`` and record nothing."""
        window = self._admissions.setdefault(user, _Window())
        window.prune(admission.at - admission.window_s)
        if admission.limit is not None and len(window.entries) >= admission.limit:
            oldest = window.oldest()
            assert oldest is not None
            raise RateRefused(retry_after(admission.at, oldest, admission.window_s))
        window.add(admission.at, "", 1.0)

    def admissions_in_window(self, user: str, now: float, window_s: float) -> int:
        """How many admissions of ``user`` fall within the last ``window_s``."""
        window = self._admissions.get(user)
        if window is None:
            return 0
        window.prune(now - window_s)
        return len(window.entries)

    def _charge(self, charge: Charge) -> None:
        """Record a checked charge; the same ``charge_id`` again replaces its amount."""
        user, charge_id, amount = charge.user, charge.charge_id, charge.gpu_seconds
        window = self._charges.setdefault(user, _Window())
        entry = self._charge_index.get((user, charge_id))
        if entry is not None:
            window.total += amount - entry.amount
            entry.amount = amount
            return
        self._charge_index[(user, charge_id)] = window.add(charge.at, charge_id, amount)

    def gpu_seconds_in_window(self, user: str, now: float, window_s: float) -> float:
        """GPU-seconds charged to ``user`` at times within the last ``window_s``."""
        window = self._charges_pruned(user, now - window_s)
        return 0.0 if window is None else max(0.0, window.total)

    def oldest_charge_in_window(self, user: str, now: float, window_s: float) -> float | None:
        """The time of the oldest charge still in the window."""
        window = self._charges_pruned(user, now - window_s)
        return None if window is None else window.oldest()

    def _charges_pruned(self, user: str, cutoff: float) -> _Window | None:
        window = self._charges.get(user)
        if window is not None:
            for charge_id in window.prune(cutoff):
                self._charge_index.pop((user, charge_id), None)
        return window

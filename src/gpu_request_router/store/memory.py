"""An in-memory :class:`StateStore`: fast and exact, for tests and single runs."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from gpu_request_router.core.state_store import (
    PRUNE_INTERVAL_S,
    RETENTION_BATCH,
    Change,
    Charge,
    OverrideChange,
    Page,
    QuotaHistory,
    Refusal,
    RequestQuery,
    StateStore,
    batch_time,
    check_charge,
    check_retention,
    decode_cursor,
    encode_cursor,
)
from gpu_request_router.models.request import Request, Transition
from gpu_request_router.utils.every import Every

__all__ = ["MemoryStore"]


class MemoryStore(StateStore):
    """Keeps everything in dictionaries; nothing survives the process.

    ``retention_s``: finished requests created longer ago are dropped by the writes (as the
    durable stores do, at most ``RETENTION_BATCH`` at a time).
    """

    def __init__(self, *, retention_s: float | None = None) -> None:
        check_retention(retention_s)
        self.retention_s = retention_s
        self._prunes = Every(PRUNE_INTERVAL_S)
        self._requests: dict[str, Request] = {}
        self._by_key: dict[tuple[str, str], str] = {}
        self._unfinished: OrderedDict[str, None] = OrderedDict()
        self._admissions: list[tuple[str, float, str]] = []
        self._charges: dict[tuple[str, str], Charge] = {}
        self._trails: dict[str, list[Transition]] = {}
        self._overrides: dict[str, dict[str, Any]] = {}

    def write(self, changes: Sequence[Change]) -> list[Refusal]:
        """Apply ``changes`` in order (all are checked first: all or none); refuse nothing."""
        self._check(changes)
        for change in changes:
            if isinstance(change, OverrideChange):
                if change.values:
                    self._overrides[change.user] = dict(change.values)
                else:
                    self._overrides.pop(change.user, None)
                continue
            request = change.request
            if change.created:
                if request.idempotency_key is not None:
                    self._by_key[request.user, request.idempotency_key] = request.id
                self._trails[request.id] = []
                self._unfinished[request.id] = None
                self._admissions.append((request.user, request.created_at, request.id))
            self._requests[request.id] = request.snapshot()
            self._trails[request.id].append(change.entry)
            if request.status.terminal:
                self._unfinished.pop(request.id, None)
            charge = change.charge
            if charge is not None:
                kept = self._charges.get((charge.user, charge.charge_id))
                at = charge.at if kept is None else kept.at
                self._charges[charge.user, charge.charge_id] = Charge(
                    charge.user, charge.charge_id, at, charge.gpu_seconds
                )
        now = batch_time(changes)
        if self.retention_s is not None and now is not None and self._prunes.due(now):
            self._forget_old(now - self.retention_s)
        return []

    def _forget_old(self, cutoff: float) -> None:
        """Drop finished requests created before ``cutoff``, at most ``RETENTION_BATCH``."""
        old = sorted(
            (
                request
                for request in self._requests.values()
                if request.created_at < cutoff and request.status.terminal
            ),
            key=lambda request: request.created_at,
        )[:RETENTION_BATCH]
        if len(old) == RETENTION_BATCH:
            self._prunes.again()  # more to do: again with the next write
        for request in old:
            del self._requests[request.id]
            del self._trails[request.id]
            if request.idempotency_key is not None:
                del self._by_key[request.user, request.idempotency_key]

    def _check(self, changes: Sequence[Change]) -> None:
        """Refuse a batch the SQLite store would refuse too, before anything is applied.

        Raises:
            ValueError: a charge no window could hold, a request created twice or under an
                idempotency key already taken, or a change of a request never created.
        """
        known: set[str] = set()
        keys: set[tuple[str, str]] = set()
        for change in changes:
            if isinstance(change, OverrideChange):
                continue
            if change.charge is not None:
                check_charge(change.charge.gpu_seconds)
            request = change.request
            stored = request.id in self._requests or request.id in known
            if change.created:
                if stored:
                    raise ValueError(f"request {request.id} is stored already")
                known.add(request.id)
                if request.idempotency_key is not None:
                    key = (request.user, request.idempotency_key)
                    if key in self._by_key or key in keys:
                        raise ValueError(f"idempotency key {key} is taken already")
                    keys.add(key)
            elif not stored:
                raise ValueError(f"request {request.id} was never created")

    # Reads -------------------------------------------------------------------------------------

    def get_request(self, request_id: str) -> Request | None:
        """The stored request, or ``None``."""
        stored = self._requests.get(request_id)
        return None if stored is None else stored.snapshot()

    def find_idempotent(self, user: str, key: str) -> Request | None:
        """The request ``user`` submitted with idempotency key ``key``, or ``None``."""
        request_id = self._by_key.get((user, key))
        return None if request_id is None else self._requests[request_id].snapshot()

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
        """Every request not yet in a terminal status, oldest first, ties in creation order."""
        unfinished = (self._requests[request_id] for request_id in self._unfinished)
        ordered = sorted(unfinished, key=lambda r: r.created_at)  # stable: creation order
        return [request.snapshot() for request in ordered]

    def quota_overrides(self) -> dict[str, dict[str, Any]]:
        """Per-user quota overrides set at run time."""
        return {user: dict(values) for user, values in self._overrides.items()}

    def quota_history(
        self, now: float, rate_window_s: float, charge_window_s: float
    ) -> QuotaHistory:
        """The quota windows that end at ``now`` (older entries are dropped on the way)."""
        self._admissions = [a for a in self._admissions if a[1] > now - rate_window_s]
        cutoff = now - charge_window_s
        self._charges = {key: c for key, c in self._charges.items() if c.at > cutoff}
        return QuotaHistory(list(self._admissions), list(self._charges.values()))

    def ping(self) -> None:
        """Always usable."""

    def check_writable(self, now: float) -> None:
        """Always takes writes."""

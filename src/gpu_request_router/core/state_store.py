"""The state-store interface: what the core hands over to persist, and what it reads back.

The core decides in memory and never waits on the store. Every status change it makes comes out
with its decisions as a :class:`StateChange` (the request as it now is, its audit entry, and the
GPU-seconds charge or rate admission that goes with it); the runtime hands those to the store in
batches (:meth:`StateStore.write`: all of a batch or none of it) and feeds the outcome back.

The store is read for what the core does not keep: finished requests, listings, audit trails,
idempotency keys of requests no longer live, and, after a restart, the unfinished requests and
the quota windows (:meth:`StateStore.unfinished_requests`, :meth:`StateStore.quota_history`).
Implementations raise :class:`~gpu_request_router.exceptions.StoreUnavailable` when they cannot
be used (disk full, locked database, lost connection); nothing is half-written then.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpu_request_router.exceptions import InvalidRequest
from gpu_request_router.models.request import Request, RequestStatus, Transition

__all__ = [
    "PRUNE_INTERVAL_S",
    "RETENTION_BATCH",
    "WRITE_PROBE_INTERVAL_S",
    "Change",
    "Charge",
    "OverrideChange",
    "Page",
    "QuotaHistory",
    "RequestQuery",
    "StateChange",
    "StateStore",
    "batch_time",
    "check_charge",
    "check_retention",
    "decode_cursor",
    "encode_cursor",
    "retry_after",
]


@dataclass(frozen=True, slots=True)
class RequestQuery:
    """A filtered page of requests, newest first."""

    user: str | None = None
    statuses: frozenset[RequestStatus] | None = None
    model: str | None = None
    priority: str | None = None
    limit: int = 50
    cursor: str | None = None

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise InvalidRequest("limit", "a page holds at least one request", location="query")

    def matches(self, request: Request) -> bool:
        """Whether ``request`` passes the filters (the cursor aside)."""
        return (
            (self.user is None or request.user == self.user)
            and (self.statuses is None or request.status in self.statuses)
            and (self.model is None or request.model == self.model)
            and (self.priority is None or request.priority == self.priority)
        )


@dataclass(frozen=True, slots=True)
class Charge:
    """GPU-seconds charged to ``user`` at time ``at`` under ``charge_id``.

    Charging the same ``charge_id`` again replaces the amount of a charge still in the window
    (which keeps its time); a charge dated before the window counts for nothing. The amount
    must be finite and ≥ 0 (:func:`check_charge`).
    """

    user: str
    charge_id: str
    at: float
    gpu_seconds: float


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing and the cursor of the next (``None`` on the last page)."""

    items: list[Request]
    next_cursor: str | None


def encode_cursor(request: Request) -> str:
    """An opaque cursor pointing just after ``request`` in newest-first order."""
    raw = json.dumps([request.created_at, request.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (created_at, id) position a cursor points after.

    Raises:
        InvalidRequest: the cursor was not made by :func:`encode_cursor`.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, request_id = json.loads(raw)
        if not isinstance(request_id, str) or not isinstance(created_at, int | float):
            raise TypeError
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidRequest(
            "cursor", "not a cursor returned by a previous page", location="query"
        ) from exc
    return float(created_at), request_id


@dataclass(frozen=True, slots=True)
class StateChange:
    """A status change to persist: the request as the change left it, and its audit entry.

    A creation (``entry.from_status`` is ``None``) writes the whole request and the user's rate
    admission at its creation time; any later change writes its changing part. ``charge``, the
    GPU-seconds of an execution, is written with it.
    """

    request: Request
    entry: Transition
    charge: Charge | None = None

    @property
    def created(self) -> bool:
        """Whether this change creates the request."""
        return self.entry.from_status is None


@dataclass(frozen=True, slots=True)
class OverrideChange:
    """A user's run-time quota override to persist (``{}``: none)."""

    user: str
    values: dict[str, Any]


Change = StateChange | OverrideChange
"""Anything the core hands to the store."""


@dataclass(frozen=True, slots=True)
class QuotaHistory:
    """The quota windows as stored: each admission as (user, at, request id), and the charges."""

    admissions: list[tuple[str, float, str]]
    charges: list[Charge]


class StateStore(ABC):
    """Where requests, their audit trails, quota counters and overrides are persisted.

    Implementations return copies: changing a returned request does not change the store.
    """

    @abstractmethod
    def write(self, changes: Sequence[Change]) -> None:
        """Persist ``changes``, in order, in one atomic step: all of them or none.

        Several changes of one request may come together (its creation and first status
        changes): each audit entry is kept, the request row ends as the last one left it.

        Raises:
            StoreUnavailable: nothing was written.
            ValueError: a charge is negative or not finite (nothing was written).
        """

    # Reads -------------------------------------------------------------------------------------

    @abstractmethod
    def get_request(self, request_id: str) -> Request | None:
        """The stored request, or ``None``."""

    @abstractmethod
    def find_idempotent(self, user: str, key: str) -> Request | None:
        """The request ``user`` submitted with idempotency key ``key``, or ``None``."""

    @abstractmethod
    def transitions(self, request_id: str, after: int = -1) -> list[Transition]:
        """The request's audit trail, oldest first, from the entry after ``seq`` ``after``."""

    @abstractmethod
    def list_requests(self, query: RequestQuery) -> Page:
        """Requests matching ``query``, newest first, one page at a time."""

    @abstractmethod
    def unfinished_requests(self) -> list[Request]:
        """Every request not yet in a terminal status, for recovery.

        Oldest first; requests created at the same instant come in the order they were created,
        so that a recovered queue keeps its first-come order (I6).
        """

    @abstractmethod
    def quota_overrides(self) -> dict[str, dict[str, Any]]:
        """Per-user quota overrides set through the API (they win over the configuration)."""

    @abstractmethod
    def quota_history(
        self, now: float, rate_window_s: float, charge_window_s: float
    ) -> QuotaHistory:
        """The quota windows that end at ``now``, for recovery (older entries may be dropped).

        The admissions of the last ``rate_window_s`` and the charges of the last
        ``charge_window_s``.
        """

    # Health and lifetime ------------------------------------------------------------------------

    @abstractmethod
    def ping(self) -> None:
        """Return if the store can be used, else raise ``StoreUnavailable``."""

    @abstractmethod
    def check_writable(self, now: float) -> None:
        """Return if the store takes writes, else raise ``StoreUnavailable``; cheap to poll.

        ``now`` (seconds, any monotonic clock) lets a store rate-limit whatever write it makes
        to find out.
        """

    def failure(self) -> str | None:
        """Why the store cannot be used now, as already known (no I/O), or ``None``.

        A store that watches its server in the background (Redis) knows of an outage before
        any write fails; the router then refuses new work at once.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing to close
        """Release connections and files."""


RETENTION_BATCH = 2_000
"""The most finished requests one prune deletes; a prune that reaches it runs again with the next
write, so deleting keeps pace with any rate of traffic without making one commit long."""

PRUNE_INTERVAL_S = 30.0
"""The most often a store's write deletes what has left its window or its retention."""

WRITE_PROBE_INTERVAL_S = 1.0
"""The most often a store's ``check_writable`` writes to learn whether writes work."""


def check_retention(retention_s: float | None) -> None:
    """Refuse a retention that is neither positive nor ``None`` (keep for ever)."""
    if retention_s is not None and not retention_s > 0:
        raise ValueError(f"retention_s is positive or None, not {retention_s!r}")


def batch_time(changes: Sequence[Change]) -> float | None:
    """The time of a batch: its newest audit entry's (``None`` for overrides alone)."""
    return max((c.entry.at for c in changes if isinstance(c, StateChange)), default=None)


def retry_after(now: float, oldest: float, window_s: float) -> float:
    """Seconds until ``oldest`` has left a ``window_s`` window: positive and sufficient.

    Stepping past float rounding keeps the answer positive and true (never "retry now" to a
    refusal).
    """
    free_at = now + (oldest + window_s - now)
    while free_at - window_s < oldest:
        free_at = math.nextafter(free_at, math.inf)
    return free_at - now


def check_charge(gpu_seconds: float) -> None:
    """Refuse a charge that no window could hold: negative, infinite or not a number."""
    if not (math.isfinite(gpu_seconds) and gpu_seconds >= 0):
        raise ValueError(f"a charge is a finite number of GPU-seconds ≥ 0, not {gpu_seconds!r}")

"""The state-store interface: requests and their audit trail, reservations, quota counters.

Every operation that decides something is atomic in the store, so several router processes can
share one store (SQLite, Redis) without double-claiming a request or over-committing a GPU:

- a status change is a guarded write: it succeeds only if the stored request still has the
  status and attempt the writer saw (claiming a queued request is ``queued -> dispatching``);
- a reservation is a check-and-add against a limit, per GPU;
- a rate-limit admission is a check-and-record in a sliding window, made with the request it admits.

Each status change is written together with its audit-trail entry (:class:`Transition`), so
the trail never misses or invents a change. Implementations raise
:class:`~gpu_request_router.exceptions.StoreUnavailable` when they cannot be used (disk full,
locked database, lost connection); nothing is half-written then.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from gpu_request_router.exceptions import InvalidRequest
from gpu_request_router.models.request import Request, RequestStatus, Transition

__all__ = [
    "Charge",
    "Page",
    "RateAdmission",
    "RateRefused",
    "RequestQuery",
    "StateStore",
    "check_charge",
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
class RateAdmission:
    """An admission of a new request's user at ``at`` in a sliding window of ``window_s``.

    Refused when ``limit`` admissions already fall within the window; ``limit=None`` records it
    without limiting (usage is counted for every user).
    """

    at: float
    window_s: float
    limit: int | None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError("a rate limit admits at least one request per window")


class RateRefused(Exception):
    """The rate admission would pass its limit; neither the request nor the admission was written.

    ``retry_after_s``: seconds until the oldest admission leaves the window (positive, and
    enough: an admission at ``at + retry_after_s`` is accepted).
    """

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate limit reached; retry after {retry_after_s:.3f} s")
        self.retry_after_s = retry_after_s


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


class StateStore(ABC):
    """Where requests, reservations and quota counters live.

    Implementations return copies: changing a returned request does not change the store.
    """

    # Requests ------------------------------------------------------------------------------

    @abstractmethod
    def add_request(
        self, request: Request, created: Transition, admission: RateAdmission | None = None
    ) -> Request:
        """Store a new request and its creation entry, atomically.

        Returns the stored one instead (writing nothing) when the user already has a request
        with the same idempotency key. With ``admission``, the user's rate admission is part of
        the same step: recorded exactly when the request is added.

        Raises:
            RateRefused: the admission would pass its limit; neither the request nor the
                admission is written (admissions that have left the window are dropped).
        """

    @abstractmethod
    def get_request(self, request_id: str) -> Request | None:
        """The stored request, or ``None``."""

    @abstractmethod
    def find_idempotent(self, user: str, key: str) -> Request | None:
        """The request ``user`` submitted with idempotency key ``key``, or ``None``."""

    @abstractmethod
    def transition(
        self,
        request: Request,
        from_status: RequestStatus,
        attempt: int,
        change: Transition,
        charge: Charge | None = None,
    ) -> bool:
        """Write ``request`` and its audit entry if the stored one has ``from_status``, ``attempt``.

        Returns whether the write happened. Claiming a queued request is this with
        ``from_status=queued``. With ``charge``, the GPU-seconds :class:`Charge` is part of the same
        atomic step: written exactly when the status change is.

        Raises:
            ValueError: the charge's ``gpu_seconds`` is negative or not finite (nothing is
                written).
        """

    @abstractmethod
    def transitions(self, request_id: str, after: int = -1) -> list[Transition]:
        """The request's audit trail, oldest first, from the entry after ``seq`` ``after``."""

    @abstractmethod
    def list_requests(self, query: RequestQuery) -> Page:
        """Requests matching ``query``, newest first, one page at a time."""

    @abstractmethod
    def unfinished_requests(self) -> list[Request]:
        """Every request not yet in a terminal status, oldest first (for recovery)."""

    # Quota overrides set at run time ----------------------------------------------------------

    @abstractmethod
    def quota_overrides(self) -> dict[str, dict[str, Any]]:
        """Per-user quota overrides set through the API (they win over the configuration)."""

    @abstractmethod
    def set_quota_override(self, user: str, values: dict[str, Any]) -> None:
        """Replace ``user``'s run-time quota override (``None`` values mean unlimited)."""

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

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing to close
        """Release connections and files."""

    # GPU memory reservations -----------------------------------------------------------------

    @abstractmethod
    def reserve(self, gpu_id: str, holder: str, memory_mb: int, limit_mb: int) -> int | None:
        """Reserve ``memory_mb`` on a GPU for ``holder`` unless the total would pass ``limit_mb``.

        Returns the GPU's new reserved total, or ``None`` when refused (nothing changes).
        """

    @abstractmethod
    def release(self, holder: str) -> dict[str, int]:
        """Drop every reservation of ``holder``; return each touched GPU's new reserved total."""

    @abstractmethod
    def reserved_mb(self, gpu_id: str) -> int:
        """The memory reserved on a GPU right now."""

    # Quota counters ----------------------------------------------------------------------------

    @abstractmethod
    def admissions_in_window(self, user: str, now: float, window_s: float) -> int:
        """How many admissions of ``user`` fall within the last ``window_s``."""

    @abstractmethod
    def gpu_seconds_in_window(self, user: str, now: float, window_s: float) -> float:
        """GPU-seconds charged to ``user`` at times within the last ``window_s``."""

    @abstractmethod
    def oldest_charge_in_window(self, user: str, now: float, window_s: float) -> float | None:
        """The time of the oldest charge still in the window (when usage next drops)."""


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

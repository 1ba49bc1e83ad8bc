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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpu_request_router.core.load_balancer import Need
from gpu_request_router.exceptions import InvalidRequest
from gpu_request_router.models.request import Request, RequestStatus, Transition

__all__ = [
    "PRUNE_INTERVAL_S",
    "RETENTION_BATCH",
    "WRITE_PROBE_INTERVAL_S",
    "Change",
    "Charge",
    "Claim",
    "Limits",
    "OverrideChange",
    "Page",
    "PollTurns",
    "QueueHead",
    "QuotaHistory",
    "Refusal",
    "RequestQuery",
    "SharedReading",
    "SharedStore",
    "SharedView",
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
class Limits:
    """The admission limits a creation was checked against (``None``: unlimited).

    A store shared by several routers checks them again across all of them, atomically with
    the creation (:class:`Refusal`); a store of one router has nothing to add.
    """

    requests_per_minute: int | None = None
    max_queued: int | None = None
    max_queued_total: int | None = None
    gpu_seconds_per_hour: float | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """What a dispatch reserves: memory and slots on GPUs, a user's slot, GPU-seconds.

    ``gpus`` holds ``(gpu id, MiB reserved, limit, slots)`` where the limit is the most all
    routers together may reserve on that GPU (total − safety margin − memory used by others, as
    this router sees it) and ``slots`` the executions it runs at once. The dispatch's charge
    (its change's ``charge``) is checked against ``gpu_seconds_per_hour`` with every router's
    charges of the user in the hour. A store shared by several routers confirms
    the claim against every router's reservations and charges, atomically with the dispatch,
    or refuses it (:class:`Refusal`).
    """

    gpus: tuple[tuple[str, int, int, int], ...]
    max_concurrent: int | None = None
    gpu_seconds_per_hour: float | None = None


@dataclass(frozen=True, slots=True)
class StateChange:
    """A status change to persist: the request as the change left it, and its audit entry.

    A creation (``entry.from_status`` is ``None``) writes the whole request and the user's rate
    admission at its creation time; any later change writes its changing part. ``charge``, the
    GPU-seconds of an execution, is written with it. ``limits`` (a creation's) and ``claim`` (a
    dispatch's) are what a store shared by several routers checks across them; ``queue_key`` (a
    creation's) is the request's static sort key in the queue (class rank × aging period +
    creation time), by which such a store orders every router's queued requests.
    """

    request: Request
    entry: Transition
    charge: Charge | None = None
    limits: Limits | None = None
    claim: Claim | None = None
    queue_key: float | None = None

    @property
    def created(self) -> bool:
        """Whether this change creates the request."""
        return self.entry.from_status is None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A change a store shared by several routers did not take as asked (see ``write``).

    ``kind`` says which check refused it:

    - a creation (``creation``; nothing of the request was written): ``requests_per_minute``,
      ``max_queued``, ``max_queued_total`` or ``gpu_seconds_per_hour`` (the user's hour is
      spent) (retry after ``retry_after_s``, or when the router judges if 0; ``limit``, and
      ``waiting`` the requests waiting), or ``idempotency_key``: another router created
      ``existing`` under the key first;
    - a dispatch (written, without its reservation: the request must go back to its queue):
      ``gpu_memory``, ``gpu_held`` (another router holds a GPU of it for a starving request:
      ``held`` names them), ``max_concurrent`` or ``gpu_seconds_per_hour``. ``ledger`` is every
      router's reservations, as request id → MiB, on each GPU of the claim; ``active`` the ids
      of the user's requests holding a concurrent slot; ``charges`` the store's account of the
      user's hour (every router's GPU-seconds in it, as charges dated by the store's clock).
    """

    request_id: str
    kind: str
    message: str
    creation: bool = False
    retry_after_s: float = 1.0
    existing: str | None = None
    limit: int | None = None
    waiting: int | None = None
    ledger: dict[str, dict[str, int]] | None = None
    active: frozenset[str] | None = None
    held: frozenset[str] | None = None
    charges: tuple[Charge, ...] | None = None


@dataclass(frozen=True, slots=True)
class OverrideChange:
    """A user's run-time quota override to persist (``{}``: none)."""

    user: str
    values: dict[str, Any]


Change = StateChange | OverrideChange
"""Anything the core hands to the store."""


@dataclass(frozen=True, slots=True)
class QueueHead:
    """A request that a router's last pass found waiting for room (shared with the others).

    ``key``: its static sort key (class rank × aging period + creation time, as
    :meth:`~gpu_request_router.core.priority_manager.PriorityManager.key` gives it): with the
    time, its effective priority level; ``need``: what it needs from the fleet.
    """

    request_id: str
    key: float
    need: Need


@dataclass(frozen=True, slots=True)
class SharedView:
    """What one router of a shared store learns of the others (:meth:`StateStore.shared_view`).

    ``ledger``: every router's reservations on each GPU asked about (request id → MiB);
    ``active``: the ids of each user's requests holding a concurrent slot; ``cancels``: the
    cancellations other routers passed to this one, as (request id, actor); ``lapsed``: the
    routers whose lease has lapsed (their work is to adopt); ``held``: the GPUs asked about that
    other routers hold for a starving request, with that request's creation time; ``charges``:
    the store's account of the hour of each user asked about (every router's GPU-seconds in
    it, as charges dated by the store's clock); ``workers``: every worker registered with any
    router (name → URL), when that list changed since this router's last view (else ``None``);
    ``heads``: the requests the other routers' last passes found waiting for room.
    """

    ledger: dict[str, dict[str, int]]
    active: dict[str, frozenset[str]]
    cancels: list[tuple[str, str]]
    lapsed: list[str]
    held: dict[str, float] = field(default_factory=dict)
    charges: list[Charge] = field(default_factory=list)
    workers: dict[str, str] | None = None
    heads: list[QueueHead] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SharedReading:
    """A worker's report as the router whose turn it was published it (:class:`PollTurns`).

    ``stamp``: the store's time (ms) when that router took its turn, before it asked the worker
    (the report is no older); ``age_s``: how long before this router's call the stamp was, by
    the store's clock. ``items``: the worker's ``GET /v1/gpus`` items, or ``None`` with
    ``error``: why reading it failed.
    """

    worker: str
    stamp: int
    age_s: float
    items: list[dict[str, Any]] | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class PollTurns:
    """Which workers a router of a shared store reads now (:meth:`SharedStore.poll_turns`).

    ``mine``: the workers whose turn it took, at the store's time ``stamp`` (ms; it publishes
    its readings of them with it); ``readings``: the others' newer readings of the rest.
    """

    stamp: int
    mine: list[str]
    readings: list[SharedReading]


@dataclass(frozen=True, slots=True)
class QuotaHistory:
    """The quota windows as stored: each admission as (user, at, request id), and the charges."""

    admissions: list[tuple[str, float, str]]
    charges: list[Charge]


class StateStore(ABC):
    """Where requests, their audit trails, quota counters and overrides are persisted.

    Implementations return copies: changing a returned request does not change the store.

    A store is *shared* (``shared``, a :class:`SharedStore` opened so) when several routers
    serve on it at once: each owns the requests it created, checks its admissions and claims
    against the others in ``write``, learns what they hold through
    :meth:`SharedStore.shared_view`, and adopts the work of one that died
    (:meth:`SharedStore.adopt`). ``unfinished_requests`` of a shared store are the router's
    own, after it adopted those of every router whose lease had lapsed.
    """

    shared: bool = False

    @abstractmethod
    def write(self, changes: Sequence[Change]) -> list[Refusal]:
        """Persist ``changes``, in order, in one atomic step: all of them or none.

        Several changes of one request may come together (its creation and first status
        changes): each audit entry is kept, the request row ends as the last one left it.

        A store shared by several routers also checks, in that step, each creation's
        ``limits`` and each dispatch's ``claim`` against all the routers; it returns what it
        refused (a refused creation is not written, with none of the request's other changes
        of the batch). A store of one router refuses nothing: the core's checks are exact.

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

    def fenced(self) -> str | None:
        """Why this store will never take this router's writes again, or ``None``.

        A store another router took over (its lease lapsed and was taken) is fenced for good:
        the process must be restarted to serve again (as a new router, or a standby).
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing to close
        """Release connections and files."""


class SharedStore(StateStore):
    """A store several routers may serve on at once, when opened so (``shared``).

    Its operations below are for a store opened shared; the runtime uses them only then.
    """

    @abstractmethod
    def shared_view(
        self,
        gpu_ids: Sequence[str],
        users: Sequence[str],
        holds: Mapping[str, tuple[str, float]] | None = None,
        charged: Sequence[str] = (),
        heard: Mapping[str, str] | None = None,
        heads: Sequence[QueueHead] | None = None,
    ) -> SharedView:
        """What the other routers hold on ``gpu_ids`` and of ``users``' slots.

        Also takes the cancellations sent to this router, lists the lapsed routers, reads the
        charges in the hour of the ``charged`` users, publishes ``heard`` (the workers that
        registered or heartbeat with this router since its last view: name → URL), and
        publishes ``holds``, this router's starvation holds (GPU id → (request id, its creation
        time); ``None``: leave them): a GPU held by two routers goes to the request waiting
        longest, and a claim of another router on a held GPU is refused. ``heads``: this
        router's requests waiting for room (``None``: leave them), published for the others,
        whose heads come back (:class:`QueueHead`).
        """

    @abstractmethod
    def queue_positions(self, request_ids: Collection[str]) -> dict[str, int]:
        """Where each of these queued requests stands among every router's queued requests.

        The number queued before it by sort key (``StateChange.queue_key``: priority class with
        aging, then submission time); requests not queued are left out.
        """

    @abstractmethod
    def poll_turns(self, workers: Mapping[str, int], interval_s: float) -> PollTurns:
        """Take the turn to read each of ``workers`` for ``interval_s`` where nobody holds it.

        ``workers``: name → the stamp of the last shared reading of it this router took in (0:
        none); the readings other routers published since come back for the workers whose turn
        another router holds. So each worker is read once per interval, whatever the number
        of routers.
        """

    @abstractmethod
    def publish_readings(
        self, stamp: int, reports: Mapping[str, list[dict[str, Any]] | str], keep_s: float
    ) -> None:
        """Publish what this router read of the workers whose turn it took at ``stamp``.

        ``reports``: name → the worker's items, or why reading it failed; each is kept
        ``keep_s``, unless a newer one of the worker was published first (it stays).
        """

    @abstractmethod
    def adopt(self, router: str) -> list[Request]:
        """Take over the unfinished requests of a router whose lease lapsed.

        Returns them, oldest first (nothing if its lease lives, or another router took them).
        """

    @abstractmethod
    def owned(self) -> list[Request]:
        """The unfinished requests the store says this router owns, oldest first."""

    @abstractmethod
    def send_cancel(self, request_id: str, actor: str) -> bool:
        """Pass a cancellation to the router owning an unfinished request.

        Returns False if the request is finished or unknown.
        """


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

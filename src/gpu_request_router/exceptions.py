"""The one exception tree of gpu-request-router.

Every error the package raises on purpose derives from :class:`GpuRouterError` and carries
its context as attributes, never only inside the message::

    GpuRouterError
    ├── ConfigError                  invalid configuration (``key`` names the setting)
    ├── RequestRejected              a submission is refused; nothing was stored
    │   ├── InvalidRequest           a field is malformed or out of range (``field``)
    │   │   ├── UnknownModel         the model is not in the catalog (``model``)
    │   │   ├── ContextLengthExceeded  more tokens than the model's context
    │   │   └── Unschedulable        no GPU of the fleet could ever hold it
    │   ├── IdempotencyConflict      the key was used before with another body
    │   ├── QuotaExceeded            over a quota that frees up with time (``retry_after_s``)
    │   ├── QuotaForbidden           over a quota that waiting never helps
    │   └── QueueFull                the router holds as many waiting requests as it may
    │                                (``retry_after_s``)
    ├── AuthError                    the caller may not do this
    │   ├── Unauthenticated          no valid API key
    │   ├── Forbidden                the key's role does not allow it
    │   └── TooManyAuthFailures      too many bad keys from one client (``retry_after_s``)
    ├── NotFound                     no such request or GPU (``resource_id``)
    ├── InvalidTransition            the status machine forbids the move
    │   └── AlreadyTerminal          the request has already finished (``status``)
    ├── StateConflict                a guarded store write lost a race
    └── StoreUnavailable             the state store cannot be written or read now
        └── StoreInUse               another live process owns the SQLite file (``pid``)

``core/`` never speaks HTTP: the API layer maps these base classes to status codes in one place.
"""

from __future__ import annotations

__all__ = [
    "AlreadyTerminal",
    "AuthError",
    "ConfigError",
    "ContextLengthExceeded",
    "Forbidden",
    "GpuRouterError",
    "IdempotencyConflict",
    "InvalidRequest",
    "InvalidTransition",
    "NotFound",
    "QueueFull",
    "QuotaExceeded",
    "QuotaForbidden",
    "RequestRejected",
    "StateConflict",
    "StoreInUse",
    "StoreUnavailable",
    "TooManyAuthFailures",
    "Unauthenticated",
    "UnknownModel",
    "Unschedulable",
]


class GpuRouterError(Exception):
    """Base class of every error raised on purpose by gpu-request-router."""


class ConfigError(GpuRouterError):
    """The configuration is invalid; ``key`` is the dotted path of the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class RequestRejected(GpuRouterError):
    """A submission was refused at admission; nothing was stored or queued.

    ``reason`` is a short machine-readable slug (also the metric label of
    ``gpurouter_requests_rejected_total``).
    """

    reason = "rejected"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(RequestRejected):
    """A field of the request is malformed or out of range; ``location`` is body or query."""

    reason = "invalid"

    def __init__(self, field: str, message: str, *, location: str = "body") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.location = location


class UnknownModel(InvalidRequest):
    """The requested model is not in the model catalog."""

    reason = "unknown_model"

    def __init__(self, model: str, known: list[str]) -> None:
        shown = ", ".join(sorted(known)) or "none configured"
        super().__init__("model", f"unknown model {model!r} (known: {shown})")
        self.model = model


class ContextLengthExceeded(InvalidRequest):
    """The request's tokens (input and output) exceed its model's context."""

    reason = "context_length_exceeded"


class Unschedulable(InvalidRequest):
    """No GPU of the configured fleet could ever hold the request, even when idle."""

    reason = "unschedulable"


class IdempotencyConflict(RequestRejected):
    """The idempotency key was already used by this user with a different request body."""

    reason = "idempotency_conflict"

    def __init__(self, key: str, request_id: str) -> None:
        super().__init__(f"idempotency key {key!r} was used for a different request ({request_id})")
        self.key = key
        self.request_id = request_id


class QuotaExceeded(RequestRejected):
    """The user is over a quota that frees up with time; retry after ``retry_after_s``."""

    def __init__(self, quota: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.quota = quota
        self.reason = f"quota_{quota}"
        self.retry_after_s = retry_after_s


class QuotaForbidden(RequestRejected):
    """The request exceeds a limit of the user's quota that waiting never lifts."""

    def __init__(self, quota: str, message: str) -> None:
        super().__init__(message)
        self.quota = quota
        self.reason = f"quota_{quota}"


class QueueFull(RequestRejected):
    """The router holds as many waiting requests as it may; retry after ``retry_after_s``.

    Not the caller's fault and not their quota: the router as a whole is at its bound
    (``quotas.max_queued_total``), so the answer is "unavailable for now".
    """

    reason = "queue_full"

    def __init__(self, waiting: int, limit: int, retry_after_s: float) -> None:
        super().__init__(
            f"the router has {waiting} requests waiting, as many as it holds ({limit}); retry later"
        )
        self.waiting = waiting
        self.limit = limit
        self.retry_after_s = retry_after_s


class AuthError(GpuRouterError):
    """The caller may not do what they asked."""


class Unauthenticated(AuthError):
    """No API key, or one the router does not know (the same answer for every kind of bad key)."""

    def __init__(self) -> None:
        super().__init__("a valid API key is required: Authorization: Bearer <key>")


class Forbidden(AuthError):
    """The caller is known but their role does not allow this."""


class TooManyAuthFailures(AuthError):
    """Too many requests with bad keys from one client; retry after ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("too many requests with an invalid API key")
        self.retry_after_s = retry_after_s


class NotFound(GpuRouterError):
    """No such request or GPU (or it belongs to someone else)."""

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"{kind} {resource_id!r} not found")
        self.kind = kind
        self.resource_id = resource_id


class InvalidTransition(GpuRouterError):
    """The request status machine forbids moving from ``from_status`` to ``to_status``."""

    def __init__(
        self, request_id: str, from_status: str, to_status: str, message: str | None = None
    ) -> None:
        super().__init__(
            message or f"request {request_id}: illegal transition {from_status} -> {to_status}"
        )
        self.request_id = request_id
        self.from_status = from_status
        self.to_status = to_status


class AlreadyTerminal(InvalidTransition):
    """The request has already reached a terminal status and cannot change any more."""

    def __init__(self, request_id: str, status: str, to_status: str) -> None:
        if to_status == "cancelled":
            rule = "only queued or running requests can be cancelled"
        else:
            rule = f"a finished request cannot become {to_status}"
        super().__init__(
            request_id, status, to_status, f"request {request_id} already {status}; {rule}"
        )
        self.status = status


class StateConflict(GpuRouterError):
    """A guarded write to the state store found the record changed by someone else."""

    def __init__(self, request_id: str, expected: str) -> None:
        super().__init__(f"request {request_id}: expected {expected} in the store, found otherwise")
        self.request_id = request_id
        self.expected = expected


class StoreUnavailable(GpuRouterError):
    """The state store cannot be used right now (disk full, locked, unreachable)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class StoreInUse(StoreUnavailable):
    """Another live router owns the store (an SQLite file, a Redis prefix): this one may not.

    ``path`` names the store (the database file; a Redis URL and prefix), ``holder`` says who
    holds it, ``pid`` is the holder's process id where known, and ``lock_path`` the SQLite lock
    file beside the database.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        holder: str,
        pid: int | None = None,
        lock_path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder
        self.lock_path = lock_path
        self.pid = pid

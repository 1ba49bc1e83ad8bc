"""The request: what a user asked for, what the router estimated, and where it is in its life.

The status machine (SPEC §2) is enforced here and nowhere else::

    queued ──> dispatching ──> running ──> succeeded | failed
      │             │            │
      │             └────────────┴──> queued    (retryable failure, attempts < max)
      ├──> cancelled   (also from dispatching and running)
      └──> expired     (deadline passed before completion; also from dispatching and running)

A dispatch that fails for good before the backend started it (a client error, or the last
attempt) goes ``dispatching -> failed``. Terminal states are absorbing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gpu_request_router.exceptions import AlreadyTerminal, InvalidTransition

__all__ = [
    "TERMINAL_STATUSES",
    "ErrorInfo",
    "Estimate",
    "Placement",
    "Request",
    "RequestStatus",
    "ResourceHints",
    "Shape",
    "Task",
    "Transition",
]


class RequestStatus(StrEnum):
    """Where a request is in its life."""

    QUEUED = "queued"
    DISPATCHING = "dispatching"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        """Whether no further transition is possible."""
        return self in TERMINAL_STATUSES

    @property
    def active(self) -> bool:
        """Whether the request holds a placement (dispatching or running)."""
        return self in (RequestStatus.DISPATCHING, RequestStatus.RUNNING)


TERMINAL_STATUSES = frozenset(
    {RequestStatus.SUCCEEDED, RequestStatus.FAILED, RequestStatus.CANCELLED, RequestStatus.EXPIRED}
)

_S = RequestStatus
_ALLOWED: dict[RequestStatus, frozenset[RequestStatus]] = {
    _S.QUEUED: frozenset({_S.DISPATCHING, _S.CANCELLED, _S.EXPIRED}),
    _S.DISPATCHING: frozenset({_S.RUNNING, _S.QUEUED, _S.FAILED, _S.CANCELLED, _S.EXPIRED}),
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.QUEUED, _S.CANCELLED, _S.EXPIRED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.EXPIRED: frozenset(),
}


class Task(StrEnum):
    """The kind of work; decides how the size of a request is counted."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    GENERIC = "generic"

    def served(self) -> frozenset[Task]:
        """The tasks a model of this task may be asked for.

        Any model runs ``generic`` work; chat and completion models serve both text tasks.
        """
        if self in _TEXT_TASKS:
            return _TEXT_TASKS | {Task.GENERIC}
        return frozenset({self, Task.GENERIC})


_TEXT_TASKS = frozenset({Task.CHAT, Task.COMPLETION})


@dataclass(frozen=True, slots=True)
class Shape:
    """The size of a request: sequences in the batch, prompt tokens and new tokens per sequence."""

    batch_size: int = 1
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Tokens held in the KV cache at the end: batch × (prompt + new tokens)."""
        return self.batch_size * (self.input_tokens + self.output_tokens)


@dataclass(frozen=True, slots=True)
class ResourceHints:
    """What the client says about resources: memory per GPU, how many GPUs, which GPU type."""

    gpu_memory_mb: int | None = None
    gpu_count: int = 1
    gpu_type: str | None = None


def duration_on(durations: Mapping[str, float], gpu_type: str) -> float:
    """The duration on ``gpu_type`` among ``durations`` by type: the slowest when not listed."""
    known = durations.get(gpu_type)
    if known is not None:
        return known
    return max(durations.values(), default=1.0)


@dataclass(frozen=True, slots=True)
class Estimate:
    """Peak GPU memory per GPU (with its breakdown) and duration per GPU type.

    ``weights_mb`` is the per-GPU share of the weights, which a GPU that already has the model
    loaded does not need again.
    """

    gpu_memory_mb: int
    weights_mb: int
    kv_cache_mb: int
    activations_mb: int
    duration_s: Mapping[str, float]
    gpu_count: int = 1

    def memory_on(self, *, model_loaded: bool) -> int:
        """Memory to reserve on one GPU, without the weights where the model is already loaded."""
        return self.gpu_memory_mb - self.weights_mb if model_loaded else self.gpu_memory_mb

    def duration_on(self, gpu_type: str) -> float:
        """Expected duration on ``gpu_type`` (the slowest known type when it is not listed)."""
        return duration_on(self.duration_s, gpu_type)

    @property
    def typical_duration_s(self) -> float:
        """The duration on the fastest GPU type it was estimated for."""
        return min(self.duration_s.values(), default=1.0)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request was placed: a worker and one or more of its GPUs, and why."""

    worker: str
    gpu_ids: tuple[str, ...]
    reason: str = ""

    @property
    def gpu_id(self) -> str:
        """The first (for single-GPU requests, the only) GPU."""
        return self.gpu_ids[0]


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a request failed: a machine-readable ``type`` and a human message."""

    type: str
    message: str


@dataclass(frozen=True, slots=True)
class Transition:
    """One entry of a request's audit trail: who moved it from which status to which, when.

    ``seq`` is the request's ``version`` after the move (0 for its creation), so a request's
    transitions are numbered 0, 1, 2 ... in order. ``from_status`` is ``None`` at creation.
    ``actor`` is the user, ``router`` or ``backend:<name>``; ``detail`` says where it was placed
    or why it failed.
    """

    request_id: str
    seq: int
    from_status: RequestStatus | None
    to_status: RequestStatus
    at: float
    attempt: int
    actor: str
    detail: str = ""


@dataclass(slots=True, eq=False)
class Request:
    """One unit of work submitted to the router, with its status and history.

    Mutate status only through :meth:`transition`, which enforces the status machine and keeps
    the timestamps, attempt count and ``version`` (bumped on every change) consistent.
    """

    id: str
    user: str
    model: str
    task: Task
    priority: str
    estimate: Estimate
    created_at: float
    input: Mapping[str, Any] = field(default_factory=dict)
    shape: Shape = Shape()
    resources: ResourceHints = ResourceHints()
    timeout_s: float = 3600.0
    metadata: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    fingerprint: str = ""  # digest of the body, to tell a replay of its idempotency key; or ""
    synchronous: bool = False  # its caller waits on an open connection (the OpenAI door)
    status: RequestStatus = RequestStatus.QUEUED
    queued_at: float = 0.0
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    queue_wait_s: float = 0.0
    attempts: int = 0
    placement: Placement | None = None
    result: Any = None
    error: ErrorInfo | None = None
    version: int = 0

    def __post_init__(self) -> None:
        if not self.queued_at:
            self.queued_at = self.created_at

    @property
    def deadline(self) -> float:
        """The time by which the request must have finished, or it expires."""
        return self.created_at + self.timeout_s

    @property
    def gpu_count(self) -> int:
        """How many GPUs (of one worker) the request takes at once."""
        return self.resources.gpu_count

    @property
    def execution_id(self) -> str:
        """The id of the current attempt's execution (unique per attempt)."""
        return f"exe_{self.id}_{self.attempts}"

    def can_transition(self, to: RequestStatus) -> bool:
        """Whether the status machine allows moving to ``to`` now."""
        return to in _ALLOWED[self.status]

    def transition(
        self,
        to: RequestStatus,
        now: float,
        *,
        placement: Placement | None = None,
        result: Any = None,
        error: ErrorInfo | None = None,
    ) -> RequestStatus:
        """Move to status ``to`` at time ``now``; return the status it left.

        Raises:
            AlreadyTerminal: the request has finished already.
            InvalidTransition: the status machine has no such edge.
        """
        old = self.status
        if to not in _ALLOWED[old]:
            if old.terminal:
                raise AlreadyTerminal(self.id, old.value, to.value)
            raise InvalidTransition(self.id, old.value, to.value)
        if to is RequestStatus.DISPATCHING:
            if placement is None:
                raise ValueError("a dispatch needs a placement")
            self.attempts += 1
            self.dispatched_at = now
            self.queue_wait_s += max(0.0, now - self.queued_at)
            self.placement = placement
        elif to is RequestStatus.RUNNING:
            self.started_at = now
        elif to is RequestStatus.QUEUED:
            self.queued_at = now
            self.placement = None
            self.started_at = None
            self.error = error
        else:
            if old is RequestStatus.QUEUED:
                self.queue_wait_s += max(0.0, now - self.queued_at)
            self.finished_at = now
            self.result = result
            self.error = error
        self.status = to
        self.version += 1
        return old

    def adopt(self, other: Request) -> None:
        """Take every field of ``other`` (a changed copy of this request that was stored).

        The fields are spelled out: this runs on every status change and every snapshot, and a
        loop over ``dataclasses.fields`` costs ten times as much.
        """
        self.id = other.id
        self.user = other.user
        self.model = other.model
        self.task = other.task
        self.priority = other.priority
        self.estimate = other.estimate
        self.created_at = other.created_at
        self.input = other.input
        self.shape = other.shape
        self.resources = other.resources
        self.timeout_s = other.timeout_s
        self.metadata = other.metadata
        self.idempotency_key = other.idempotency_key
        self.fingerprint = other.fingerprint
        self.synchronous = other.synchronous
        self.status = other.status
        self.queued_at = other.queued_at
        self.dispatched_at = other.dispatched_at
        self.started_at = other.started_at
        self.finished_at = other.finished_at
        self.queue_wait_s = other.queue_wait_s
        self.attempts = other.attempts
        self.placement = other.placement
        self.result = other.result
        self.error = other.error
        self.version = other.version

    def snapshot(self) -> Request:
        """A copy that later transitions of this object do not change."""
        copy: Request = object.__new__(Request)
        copy.adopt(self)
        return copy

"""What goes into the sans-I/O core and what comes out of it.

Drivers (the asyncio runtime, the discrete-event simulator, tests) call the core's methods with
the current time and what happened (an execution finished, a GPU reading arrived ...) and get
back a list of :data:`Decision` objects to carry out: persist a status change
(:class:`~gpu_request_router.core.state_store.StateChange`), start an execution, cancel one. The
status changes an event made come first; a dispatch must not start before they are persisted.

After a restart the driver asks each backend about the executions the store shows in flight
(:class:`InFlight`), and hands what it learned (a :data:`Lookup` per execution id) to the core's
recovery, which answers with a :class:`Recovery`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gpu_request_router.core.state_store import StateChange
from gpu_request_router.models.request import Placement, Request

__all__ = [
    "CancelExecution",
    "Decision",
    "Dispatch",
    "ExecutionResult",
    "Failure",
    "FailureKind",
    "InFlight",
    "Lookup",
    "NotKnown",
    "Recovery",
    "StateChange",
    "StillRunning",
]


class FailureKind(StrEnum):
    """Why an execution failed, as far as the router can tell."""

    CLIENT_ERROR = "client_error"  # the backend rejected the input: retrying cannot help
    BACKEND_ERROR = "backend_error"  # the backend failed (5xx, crash): retry elsewhere
    UNREACHABLE = "unreachable"  # the backend could not be reached: retry elsewhere
    OUT_OF_MEMORY = "gpu_out_of_memory"  # the GPU ran out of memory: grow the estimate, retry
    WORKER_LOST = "worker_lost"  # the worker died or stopped heartbeating: retry elsewhere
    STREAM_BROKEN = "stream_interrupted"  # failed after bytes reached the client: cannot retry

    @property
    def retryable(self) -> bool:
        """Whether another attempt could succeed (the error handler may retry it)."""
        return self in (
            FailureKind.BACKEND_ERROR,
            FailureKind.UNREACHABLE,
            FailureKind.OUT_OF_MEMORY,
            FailureKind.WORKER_LOST,
        )

    TIMEOUT = "timeout"  # the deadline passed: the request expires


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """A finished execution: the backend's output and what it used, where it reports that.

    ``load_s``: the part of its run spent loading its model's weights (a cold start), which
    says nothing about how long the work itself takes.
    """

    output: Any = None
    gpu_seconds: float | None = None
    peak_memory_mb: int | None = None
    load_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed execution: its kind, a message, and the peak memory where the backend reports it."""

    kind: FailureKind
    message: str = ""
    peak_memory_mb: int | None = None


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Decision: start attempt ``attempt`` of a request on ``placement``.

    ``request`` is a snapshot taken at dispatch; ``reservations`` is the memory reserved on each
    GPU of the placement; the execution must not outlive ``deadline``.
    """

    request: Request
    execution_id: str
    attempt: int
    backend: str
    placement: Placement
    reservations: Mapping[str, int]
    deadline: float


@dataclass(frozen=True, slots=True)
class CancelExecution:
    """Decision: tell the backend to stop an execution (cancelled, expired or superseded)."""

    request_id: str
    execution_id: str
    backend: str
    worker: str
    reason: str


Decision = Dispatch | CancelExecution | StateChange


@dataclass(frozen=True, slots=True)
class InFlight:
    """An execution the store shows in flight at a restart, and the backend to ask about it."""

    request_id: str
    execution_id: str
    backend: str
    worker: str


@dataclass(frozen=True, slots=True)
class StillRunning:
    """A backend's answer about an execution: it still runs it."""


@dataclass(frozen=True, slots=True)
class NotKnown:
    """A backend's answer about an execution: it does not know it (never started, or forgotten)."""


Lookup = ExecutionResult | Failure | StillRunning | NotKnown
"""What a backend said of an execution when asked after a restart: its outcome if it ended."""


@dataclass(frozen=True, slots=True)
class Recovery:
    """What recovery after a restart decided.

    ``decisions`` are carried out as usual; ``reattached`` are the executions a backend still
    runs, each as the dispatch that started it: the driver waits for their outcomes and reports
    them like those of executions it dispatched itself.
    """

    decisions: list[Decision]
    reattached: list[Dispatch]

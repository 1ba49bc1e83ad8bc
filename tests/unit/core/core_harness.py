"""A harness that drives the real core by hand: events in, decisions carried out, time moved."""

from __future__ import annotations

import math
from typing import Any

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.engine import Engine
from gpu_request_router.core.events import (
    CancelExecution,
    Decision,
    Dispatch,
    ExecutionResult,
    Failure,
    FailureKind,
    Lookup,
    Recovery,
    StateChange,
)
from gpu_request_router.core.quota import HOUR_S, MINUTE_S
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.models.request import Request
from gpu_request_router.models.user_quota import QuotaUsage
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.testing import readings_for


class Harness:
    """The core plus a hand-driven fleet: every dispatch is recorded and can be finished.

    Each event's status changes are written to ``store`` as one batch, as the runtime's writer
    would; a harness made on the store of another one is that router restarted (its quota
    windows and overrides are loaded back; :meth:`recover` takes back its requests).
    """

    def __init__(
        self, settings: Settings, *, store: MemoryStore | None = None, now: float = 1_000.0
    ) -> None:
        self.settings = settings
        self.store = store if store is not None else MemoryStore()
        self.engine = Engine.build(settings, seed=1)
        self.router = self.engine.router
        self.now = now
        self.router.quotas.load(
            self.store.quota_history(now, MINUTE_S, HOUR_S), self.store.quota_overrides()
        )
        self.dispatches: list[Dispatch] = []
        self.cancelled: list[CancelExecution] = []
        self.apply(self.router.readings(readings_for(settings), self.now))

    def apply(self, decisions: list[Decision]) -> list[Decision]:
        self.store.write([d for d in decisions if isinstance(d, StateChange)])
        for decision in decisions:
            if isinstance(decision, Dispatch):
                self.dispatches.append(decision)
            elif isinstance(decision, CancelExecution):
                self.cancelled.append(decision)
        return decisions

    def recover(self, lookups: dict[str, Lookup] | None = None) -> Recovery:
        """Recover from the store (a restart) with what the backends said; carry it out."""
        recovery = self.router.recover(self.now, self.store.unfinished_requests(), lookups)
        self.apply(recovery.decisions)
        return recovery

    def submit(self, submission: Submission, user: str = "alice") -> Request:
        admission = self.engine.receiver.submit(submission, Caller(user), self.now)
        self.apply(admission.decisions)
        return admission.request

    def dispatch_of(self, request: Request) -> Dispatch:
        """The latest dispatch of ``request``."""
        return [d for d in self.dispatches if d.request.id == request.id][-1]

    def dispatched_ids(self) -> list[str]:
        return [d.request.id for d in self.dispatches]

    def finish(self, request: Request, **result: Any) -> None:
        dispatch = self.dispatch_of(request)
        self.apply(self.router.started(dispatch.execution_id, self.now))
        self.apply(self.router.finished(dispatch.execution_id, ExecutionResult(**result), self.now))

    def fail(self, request: Request, kind: FailureKind, **fields: Any) -> None:
        dispatch = self.dispatch_of(request)
        self.apply(self.router.failed(dispatch.execution_id, Failure(kind, **fields), self.now))

    def advance(self, seconds: float) -> None:
        """Move time, ticking at every wakeup on the way, with fresh readings every second."""
        end = self.now + seconds
        while True:
            wakeup = self.router.next_wakeup()
            step = min(end, self.now + 1.0)
            if wakeup is not None and self.now < wakeup < step:
                step = wakeup
            self.now = step
            self.apply(self.router.readings(self._readings(), self.now))
            self.apply(self.router.tick(self.now))
            if self.now >= end:
                return

    def _readings(self) -> list[Any]:
        return readings_for(self.settings)

    def charged(self, user: str) -> float:
        """GPU-seconds charged to ``user`` in the last hour, as the core counts them.

        The charges persisted with the status changes must add up to the same figure.
        """
        counted = self._usage(user).gpu_seconds_last_hour
        history = self.store.quota_history(self.now, MINUTE_S, HOUR_S)
        stored = sum(c.gpu_seconds for c in history.charges if c.user == user)
        assert math.isclose(counted, stored, abs_tol=1e-9), (counted, stored)
        return counted

    def admitted(self, user: str) -> int:
        """``user``'s rate admissions in the last minute, as the core counts them.

        The admissions persisted with the requests' creations must be as many.
        """
        counted = self._usage(user).requests_last_minute
        history = self.store.quota_history(self.now, MINUTE_S, HOUR_S)
        assert counted == sum(1 for a in history.admissions if a[0] == user), counted
        return counted

    def _usage(self, user: str) -> QuotaUsage:
        return self.router.quotas.usage(user, queued=0, concurrent=0, now=self.now)

    def status(self, request: Request) -> str:
        stored = self.store.get_request(request.id)
        assert stored is not None
        return stored.status.value

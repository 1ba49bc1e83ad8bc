"""The discrete-event driver: the real core and a simulated fleet, in virtual time.

Events (arrivals, executions starting and ending, monitor polls, timer ticks, GPU losses) sit
in a heap ordered by virtual time; each is fed to the same :class:`RequestRouter` the asyncio
runtime drives, and the decisions it returns are carried out on a :class:`SimulatedFleet`. An
hour of traffic runs in seconds, and a run is a pure function of its settings, arrivals and
seed.

Example::

    sim = Simulation(load_settings("examples/config.yaml"), seed=1)
    sim.submit(0.0, Submission(model="llama-3-8b"), Caller("alice"))
    report = sim.run()
    report.records[0].status  # "succeeded"
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.engine import Engine
from gpu_request_router.core.events import CancelExecution, Decision, Dispatch, StateChange
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.exceptions import GpuRouterError, RequestRejected
from gpu_request_router.models.request import Request, RequestStatus, Transition
from gpu_request_router.services.simulator import FAILS_AFTER, Plan, SimulatedFleet
from gpu_request_router.utils.clock import VirtualClock

__all__ = ["Rejection", "RequestRecord", "Simulation", "SimulationReport"]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What happened to one request, as the simulation saw it end."""

    id: str
    user: str
    model: str
    priority: str
    status: str
    attempts: int
    worker: str | None
    gpu_ids: tuple[str, ...]
    reason: str
    created_at: float
    dispatched_at: float | None
    started_at: float | None
    finished_at: float | None
    queue_wait_s: float
    error: str | None
    gpu_memory_mb: int
    retried_after: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    # The duration estimated at admission on every GPU type of the fleet (s).
    duration_estimates: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, request: Request, retried_after: tuple[str, ...] = ()) -> RequestRecord:
        """The record of a request in its current state (and the failures it was retried after)."""
        placement = request.placement
        return cls(
            id=request.id,
            user=request.user,
            model=request.model,
            priority=request.priority,
            status=request.status.value,
            attempts=request.attempts,
            worker=placement.worker if placement else None,
            gpu_ids=placement.gpu_ids if placement else (),
            reason=placement.reason if placement else "",
            created_at=request.created_at,
            dispatched_at=request.dispatched_at,
            started_at=request.started_at,
            finished_at=request.finished_at,
            queue_wait_s=request.queue_wait_s,
            error=request.error.type if request.error else None,
            gpu_memory_mb=request.estimate.gpu_memory_mb,
            retried_after=retried_after,
            metadata=dict(request.metadata),
            duration_estimates=dict(request.estimate.duration_s),
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    """A submission the receiver refused."""

    at: float
    user: str
    reason: str
    message: str


@dataclass(slots=True)
class SimulationReport:
    """The outcome of a run: a record per accepted request and the rejections."""

    records: list[RequestRecord]
    rejections: list[Rejection]
    end_time: float
    events: int

    def by_status(self) -> dict[str, int]:
        """How many requests ended in each status."""
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.status] = counts.get(record.status, 0) + 1
        return counts


@dataclass(order=True, slots=True)
class _Event:
    at: float
    seq: int
    kind: str = field(compare=False)
    payload: Any = field(compare=False)


class Simulation:
    """Runs the core against a simulated fleet in virtual time."""

    def __init__(self, settings: Settings, *, seed: int = 0, start_time: float = 0.0) -> None:
        self.clock = VirtualClock(start_time)
        self.engine = Engine.build(settings, seed=seed)
        self.router = self.engine.router
        self.fleet = SimulatedFleet.for_engine(settings, self.router.estimator)
        self._poll_s = settings.monitor.poll_interval_s
        self._heap: list[_Event] = []
        self._seq = itertools.count()
        self._plans: dict[str, tuple[Plan, float]] = {}
        self._ended: dict[str, RequestRecord] = {}
        self._retries: dict[str, list[str]] = {}
        self._rejections: list[Rejection] = []
        self._arrivals = 0
        self._actions = 0
        self._tick_at: float | None = None
        self._polling = False
        self._events = 0
        # Called with every status change after a request's creation, as the core makes it.
        self.listeners: list[Callable[[Request, Transition], None]] = []
        # Called with every request admitted, once its admission's decisions are carried out.
        self.admission_listeners: list[Callable[[Request], None]] = []
        self._admitted: Request | None = None
        self._poll()

    # Scheduling inputs ------------------------------------------------------------------------

    def submit(self, at: float, submission: Submission, caller: Caller) -> None:
        """Schedule a submission ``at`` virtual seconds from now (before a run: from the start)."""
        self._arrivals += 1
        self._push(self.clock.now() + at, "submit", (submission, caller))
        if not self._polling:
            self._polling = True
            self._push(self.clock.now() + self._poll_s, "poll", None)

    def lose_gpu(self, at: float, gpu_id: str) -> None:
        """Schedule a GPU to fall off the bus ``at`` seconds from now (its executions die)."""
        self._actions += 1
        self._push(self.clock.now() + at, "lose", gpu_id)

    def restore_gpu(self, at: float, gpu_id: str) -> None:
        """Schedule a lost GPU to come back ``at`` seconds from now."""
        self._actions += 1
        self._push(self.clock.now() + at, "restore", gpu_id)

    def at(self, at: float, action: Callable[[Simulation], list[Decision]]) -> None:
        """Schedule an action (cancel, cordon ...) ``at`` seconds from now; it returns decisions."""
        self._actions += 1
        self._push(self.clock.now() + at, "call", action)

    def _push(self, at: float, kind: str, payload: Any) -> None:
        heapq.heappush(self._heap, _Event(at, next(self._seq), kind, payload))

    # Running ------------------------------------------------------------------------------------

    def run(self, until: float | None = None) -> SimulationReport:
        """Process events in time order until none is left (or virtual time passes ``until``).

        The run ends with the last event that could matter: once no request is live and no
        arrival or action is scheduled, what is left (polls, timer ticks, the ends of executions
        that were cancelled) is dropped, so ``end_time`` is when the work ended.
        """
        heap = self._heap
        while heap:
            if until is not None and heap[0].at > until:
                break
            event = heapq.heappop(heap)
            self.clock.set(max(event.at, self.clock.now()))
            self._events += 1
            self._apply(self._handle(event))
            if self._admitted is not None:
                admitted, self._admitted = self._admitted, None
                for admission_listener in self.admission_listeners:
                    admission_listener(admitted)
            self._schedule_tick()
            if not (self.router.live or self._arrivals or self._actions):
                self._settle()
        records = list(self._ended.values()) + [
            RequestRecord.of(request, tuple(self._retries.get(request.id, ())))
            for request in self.router.live.values()
        ]
        records.sort(key=lambda record: (record.created_at, record.id))
        return SimulationReport(records, list(self._rejections), self.clock.now(), self._events)

    def _settle(self) -> None:
        """Nothing is live or scheduled: drop the leftover events; the next submission restarts."""
        self._heap.clear()
        self._plans.clear()
        self._polling = False
        self._tick_at = None

    def _handle(self, event: _Event) -> list[Decision]:
        now = self.clock.now()
        router = self.router
        kind = event.kind
        if kind in ("lose", "restore", "call"):
            self._actions -= 1
        if kind == "finish":
            execution_id = event.payload
            if self.fleet.due(execution_id) != event.at:
                return []  # it ended otherwise, or its end moved
            plan, started = self._plans.pop(execution_id)
            result = self.fleet.finish(execution_id, plan, now - started, now)
            return router.finished(execution_id, result, now)
        if kind == "fail":
            execution_id, failure = event.payload
            self.fleet.stop(execution_id, now)
            self._plans.pop(execution_id, None)
            return router.failed(execution_id, failure, now)
        if kind == "start":
            return router.started(event.payload, now)
        if kind == "tick":
            self._tick_at = None
            return router.tick(now)
        if kind == "poll":
            return self._poll()
        if kind == "submit":
            return self._admit(*event.payload)
        if kind == "lose":
            self.fleet.lose_gpu(event.payload, now)
            return []
        if kind == "restore":
            self.fleet.restore_gpu(event.payload)
            return []
        action: Callable[[Simulation], list[Decision]] = event.payload
        try:
            return action(self)
        except GpuRouterError:
            return []

    def _admit(self, submission: Submission, caller: Caller) -> list[Decision]:
        self._arrivals -= 1
        now = self.clock.now()
        try:
            admission = self.engine.receiver.submit(submission, caller, now)
        except RequestRejected as exc:
            self._rejections.append(Rejection(now, caller.user, exc.reason, exc.message))
            return []
        if admission.created:
            self._admitted = admission.request
        return admission.decisions

    def _poll(self) -> list[Decision]:
        now = self.clock.now()
        decisions: list[Decision] = []
        for worker in self.fleet.workers:
            decisions += self.router.readings(self.fleet.readings(worker), now, worker=worker)
        self._polling = bool(self._arrivals or self.router.live)
        if self._polling:
            self._push(now + self._poll_s, "poll", None)
        return decisions

    def _apply(self, decisions: list[Decision]) -> None:
        now = self.clock.now()
        for decision in decisions:
            if isinstance(decision, StateChange):
                self._on_transition(decision.request)
                if not decision.created:
                    for listener in self.listeners:
                        listener(decision.request, decision.entry)
            elif isinstance(decision, CancelExecution):
                self.fleet.stop(decision.execution_id, now)
                self._plans.pop(decision.execution_id, None)
            else:
                self._start(decision, now)
        for execution_id, due in self.fleet.changed().items():
            self._push(due, "finish", execution_id)

    def _start(self, dispatch: Dispatch, now: float) -> None:
        execution_id = dispatch.execution_id
        plan = self.fleet.plan(dispatch)
        refused = self.fleet.start(dispatch, plan, now)
        if refused is not None:
            self._push(now, "fail", (execution_id, refused))
            return
        self._plans[execution_id] = (plan, now)
        self._push(now, "start", execution_id)
        if plan.duration_s is not None and plan.failure is not None:
            self._push(now + plan.duration_s * FAILS_AFTER, "fail", (execution_id, plan.failure))

    def _schedule_tick(self) -> None:
        wakeup = self.router.next_wakeup()
        if wakeup is None or (self._tick_at is not None and self._tick_at <= wakeup):
            return
        if not self._heap and not self.router.live:
            return
        self._tick_at = max(wakeup, self.clock.now())
        self._push(self._tick_at, "tick", None)

    def _on_transition(self, request: Request) -> None:
        if request.status is RequestStatus.QUEUED and request.error is not None:
            self._retries.setdefault(request.id, []).append(request.error.type)
        elif request.status.terminal:
            retried = tuple(self._retries.pop(request.id, ()))
            self._ended[request.id] = RequestRecord.of(request, retried)

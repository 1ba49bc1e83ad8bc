"""The dispatch loop as a sans-I/O state machine: events in, decisions out.

Drivers call one method per event, always with the current time, and carry out the
:data:`~gpu_request_router.core.events.Decision` list that comes back:

- :meth:`RequestRouter.enqueue` — a request was admitted (by the request receiver);
- :meth:`~RequestRouter.recover` — the process (re)started: take back the store's unfinished work,
  with what the backends said of the executions in flight (:meth:`~RequestRouter.in_flight`);
- :meth:`~RequestRouter.started`, :meth:`~RequestRouter.finished`, :meth:`~RequestRouter.failed`
  — what a backend said about an execution;
- :meth:`~RequestRouter.readings`, :meth:`~RequestRouter.source_failed` — GPU monitoring;
- :meth:`~RequestRouter.cancel`, :meth:`~RequestRouter.cordon`, :meth:`~RequestRouter.uncordon`,
  :meth:`~RequestRouter.drain` — users and operators;
- :meth:`~RequestRouter.tick` — time passed (call it at :meth:`~RequestRouter.next_wakeup`).

The core decides in memory and never waits on I/O. Every status change comes out among the
decisions as a :class:`~gpu_request_router.core.state_store.StateChange` (the request as it now
is, its audit entry — a :class:`~gpu_request_router.models.request.Transition`: who, from which
status, when — and the GPU-seconds charge that goes with it), ahead of the decisions that depend
on it: the driver persists the changes, and starts an execution only once the change that
dispatched it is stored. A request whose creation the store could not take is taken back
(:meth:`RequestRouter.forget`).

After every event a *dispatch pass* walks the queue in priority order and places what fits,
backfilling past what does not and keeping GPUs for requests that have starved: see
:mod:`~gpu_request_router.core.holds`. What a request needs and whether the fleet could ever hold
it is :mod:`~gpu_request_router.core.fit`'s; executions' outcomes reach the circuit breakers
through :mod:`~gpu_request_router.core.circuits`.

Every status change is checked against the lifecycle, every reservation against its GPU's room,
so the invariants hold by construction: I1 (one terminal state), I2 (reservations within each
GPU's room), I3 (one live execution per request: results of superseded executions are ignored),
I4 (quotas at admission and dispatch), I6 (dispatch in effective-priority order among requests
that fit).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

import structlog

from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.circuits import Circuits
from gpu_request_router.core.error_handler import Action, ErrorHandler
from gpu_request_router.core.events import (
    CancelExecution,
    Decision,
    Dispatch,
    ExecutionResult,
    Failure,
    FailureKind,
    InFlight,
    Lookup,
    NotKnown,
    Recovery,
    StillRunning,
)
from gpu_request_router.core.explain import Decided, DecisionLog, Explainer, Explanation
from gpu_request_router.core.fit import FleetFit, need_of
from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.core.holds import Holds
from gpu_request_router.core.load_balancer import Chosen, LoadBalancer, Need, NoFit
from gpu_request_router.core.metric_collector import MetricCollector
from gpu_request_router.core.priority_manager import PriorityManager
from gpu_request_router.core.quota import QuotaEnforcer
from gpu_request_router.core.resource_estimator import ResourceEstimator
from gpu_request_router.core.state_store import Charge, Claim, Limits, QueueHead, StateChange
from gpu_request_router.exceptions import NotFound, StateConflict
from gpu_request_router.models.gpu_state import GPUReading
from gpu_request_router.models.request import (
    ErrorInfo,
    Estimate,
    Placement,
    Request,
    RequestStatus,
    Transition,
)

__all__ = ["RequestRouter", "fair_share_cost", "gpu_seconds", "transition_of"]

_log = structlog.get_logger(__name__)
_S = RequestStatus

SHARED_HEADS = 8
"""The most requests waiting for room a pass notes for the other routers (one per shape)."""


def gpu_seconds(request: Request) -> float:
    """The GPU-seconds a request is estimated to take (typical duration × GPUs)."""
    return request.estimate.typical_duration_s * request.gpu_count


def fair_share_cost(request: Request) -> float:
    """What a dispatch charges to its user's fair-share counter: estimated GiB × seconds × GPUs."""
    return gpu_seconds(request) * max(request.estimate.gpu_memory_mb, 1) / 1024


@dataclass(slots=True)
class _Execution:
    """A live execution: which attempt of which request, where."""

    request_id: str
    attempt: int
    backend: str
    worker: str
    gpu_ids: tuple[str, ...]
    dispatched_at: float


def _cancel(execution_id: str, execution: _Execution, reason: str) -> CancelExecution:
    return CancelExecution(
        request_id=execution.request_id,
        execution_id=execution_id,
        backend=execution.backend,
        worker=execution.worker,
        reason=reason,
    )


class RequestRouter:
    """Queues, places, tracks and finishes requests; see the module docstring for the events.

    ``fit`` answers what the fleet could hold (:class:`~gpu_request_router.core.fit.FleetFit`);
    ``holds`` are the GPUs kept for starving requests
    (:class:`~gpu_request_router.core.holds.Holds`).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        monitor: GPUStateMonitor,
        estimator: ResourceEstimator,
        balancer: LoadBalancer,
        errors: ErrorHandler,
        quotas: QuotaEnforcer,
        metrics: MetricCollector,
        perf_counter: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._settings = settings
        self.monitor = monitor
        self.estimator = estimator
        self.balancer = balancer
        self.errors = errors
        self.quotas = quotas
        self.metrics = metrics
        self.queue = PriorityManager(settings.priorities.classes, settings.priorities.aging_seconds)
        self._perf = perf_counter
        self._requests: dict[str, Request] = {}
        self._executions: dict[str, _Execution] = {}
        self._current: dict[str, str] = {}
        self._active: Counter[str] = Counter()
        # Requests of each user holding a concurrent slot through other routers (shared store),
        # and the GPUs other routers hold for their starving requests.
        self._active_elsewhere: Counter[str] = Counter()
        self._held_elsewhere: dict[str, float] = {}  # GPU id -> since when its request waits
        # Other routers' requests waiting for room (best ranked first), and this router's, as
        # its last pass found them.
        self._heads_elsewhere: list[QueueHead] = []
        self._heads: list[QueueHead] = []
        self._queued: Counter[str] = Counter()
        self._queued_total = 0
        self._deadlines: list[tuple[float, str]] = []
        self._backoff: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._avoid: dict[str, set[str]] = {}
        self.fit = FleetFit(monitor, settings.placement.memory_safety_margin_mb)
        self.holds = Holds(
            balancer,
            self.queue,
            requests=self._requests,
            executions=self._executions,
            avoid=self._avoid,
        )
        self._circuits = Circuits(errors.circuits, monitor, metrics)
        self._decisions = DecisionLog()
        self._explainer = Explainer(
            monitor=monitor,
            queue=self.queue,
            holds=self.holds,
            quotas=quotas,
            policy=balancer.policy,
            decisions=self._decisions,
            requests=self._requests,
            executions=self._executions,
            active=self._active,
            avoid=self._avoid,
            backoff=self._backoff,
            cost=gpu_seconds,
            depth=settings.placement.backfill_depth,
            bound_s=settings.placement.starvation_bound_s,
            held_elsewhere=self._held_elsewhere,
            heads_elsewhere=self._heads_elsewhere,
        )
        self._quota_wakeup: float | None = None
        self._gpu_seconds_waits: set[str] = set()  # users the last pass held back for them
        self._keys: dict[tuple[str, str], str] = {}
        # Status changes made since the last event returned, to go out with its decisions.
        self._changes: list[Decision] = []

    # Views ---------------------------------------------------------------------------------------

    def get(self, request_id: str) -> Request | None:
        """The live (not yet finished) request with this id, or ``None``."""
        return self._requests.get(request_id)

    @property
    def live(self) -> Mapping[str, Request]:
        """Every request not yet in a terminal status, by id."""
        return self._requests

    def find_live(self, user: str, key: str) -> Request | None:
        """The live request ``user`` submitted with idempotency key ``key``, or ``None``."""
        request_id = self._keys.get((user, key))
        return None if request_id is None else self._requests[request_id]

    def execution_of(self, request_id: str) -> str | None:
        """The id of the request's live execution, or ``None``."""
        return self._current.get(request_id)

    def requests_on(self, gpu_id: str) -> list[str]:
        """The ids of the requests with live executions on a GPU."""
        executions = self._executions
        running = self.monitor.gpus[gpu_id].running if gpu_id in self.monitor.gpus else {}
        return [executions[e].request_id for e in running if e in executions]

    def active_count(self, user: str) -> int:
        """How many requests of ``user`` are dispatching or running."""
        return self._active[user]

    def queued_count(self, user: str) -> int:
        """How many requests of ``user`` are waiting (including those backing off to retry)."""
        return self._queued[user]

    @property
    def held_elsewhere(self) -> Mapping[str, float]:
        """The GPUs other routers hold for starving requests, with their creation times.

        See :meth:`shared_view`.
        """
        return self._held_elsewhere

    @property
    def waiting_for_gpu_seconds(self) -> frozenset[str]:
        """The users whose requests the last pass held back for their GPU-seconds quota."""
        return frozenset(self._gpu_seconds_waits)

    def holds_to_share(self) -> dict[str, tuple[str, float]]:
        """The GPUs this router holds for its starving requests: GPU id → (request id, since).

        ``since`` is the request's creation time: across routers the longest waiting wins.
        """
        return {
            gpu_id: (request_id, self._requests[request_id].created_at)
            for request_id, gpus in self.holds.items()
            for gpu_id in gpus
        }

    def heads_to_share(self) -> list[QueueHead]:
        """The requests the last pass found waiting for room, best ranked first (shared store).

        At most :data:`SHARED_HEADS`, one per shape of need, still queued; those waiting for a
        quota are not among them. The other routers keep room for them from their own
        requests of a lower priority level (:meth:`shared_view`).
        """
        return [head for head in self._heads if head.request_id in self.queue]

    def shared_users(self) -> list[str]:
        """The users whose slots across routers matter here (shared store).

        Those with requests waiting, and those holding slots through other routers
        (:meth:`shared_view`).
        """
        waiting = {user for user, count in self._queued.items() if count > 0}
        return sorted(waiting.union(self._active_elsewhere))

    def queued_total(self) -> int:
        """How many requests of all users are waiting (including those backing off to retry)."""
        return self._queued_total

    def explain(self, request: Request, now: float, *, project: bool = True) -> Explanation:
        """Where ``request`` (live or ended) was placed and why, or why it waits, at ``now``.

        See :mod:`~gpu_request_router.core.explain`; without ``project``, a wait has no ETA.
        """
        return self._explainer.explain(request, now, project=project)

    def queue_retry_after(self, now: float) -> float:
        """Seconds until the running request expected to finish first does so (at least 1 s)."""
        soonest: float | None = None
        for execution in self._executions.values():
            request = self._requests[execution.request_id]
            gpu_type = self.monitor.gpus[execution.gpu_ids[0]].type
            end = execution.dispatched_at + request.estimate.duration_on(gpu_type)
            if soonest is None or end < soonest:
                soonest = end
        return max(1.0, (soonest - now) if soonest is not None else 1.0)

    # Events: admission and recovery ------------------------------------------------------------

    def enqueue(self, request: Request, now: float) -> list[Decision]:
        """Queue an admitted request and dispatch what fits; its creation goes out first."""
        if request.status is not _S.QUEUED:
            raise ValueError(f"request {request.id} is {request.status}, not queued")
        quota = self.quotas.quota_for(request.user)
        limits = Limits(
            quota.requests_per_minute,
            quota.max_queued,
            self._settings.quotas.max_queued_total,
            quota.gpu_seconds_per_hour,
        )
        self._changes.append(
            StateChange(
                request.snapshot(),
                transition_of(request, None, request.user, now),
                limits=limits,
                queue_key=self.queue.key(request),
            )
        )
        self._track(request)
        self.queue.push(request, fair_share_cost(request))
        return self._emit(self._pass(now))

    def forget(self, request_id: str, now: float) -> list[Decision]:
        """Take back a request whose creation the store could not take: as if never admitted.

        Whatever the core decided for it since (a dispatch not yet carried out, a charge, its
        rate admission) is undone; its changes are not to be written. Unknown ids are ignored.
        """
        request = self._requests.get(request_id)
        if request is None:
            return []
        execution_id = self._current.pop(request.id, None)
        if execution_id is not None:
            self._executions.pop(execution_id, None)
            self.quotas.undo_charge(request.user, execution_id)
            for gpu_id in self.monitor.release(execution_id):
                self.metrics.gpu(self.monitor.gpus[gpu_id])
        if request.status is _S.QUEUED:
            self._queued[request.user] -= 1
            self._queued_total -= 1
        elif request.status.active:
            self._active[request.user] -= 1
        self.queue.remove(request.id)
        self.holds.drop(request.id)
        self._avoid.pop(request.id, None)
        self._untrack(request)
        self.quotas.undo_admission(request.user, request.id)
        return self._emit(self._pass(now))

    def _emit(self, decisions: list[Decision]) -> list[Decision]:
        """An event's decisions, after the status changes it made (which they depend on)."""
        if not self._changes:
            return decisions
        out = self._changes + decisions
        self._changes = []
        return out

    def in_flight(self, unfinished: Iterable[Request]) -> list[InFlight]:
        """The executions ``unfinished`` (the store's) shows in flight: whom to ask about each.

        Call it after the first GPU readings and before :meth:`recover`. The backend is the one
        of the placement's first GPU where that GPU is known, else the placement's worker (a
        worker that registers itself is its own backend).
        """
        asks: list[InFlight] = []
        for stored in unfinished:
            placement = stored.placement
            if stored.id in self._requests or not stored.status.active or placement is None:
                continue
            asks.append(
                InFlight(
                    stored.id, stored.execution_id, self._backend_of(placement), placement.worker
                )
            )
        return asks

    def recover(
        self,
        now: float,
        unfinished: Iterable[Request],
        lookups: Mapping[str, Lookup] | None = None,
    ) -> Recovery:
        """Rebuild the live state after a restart from the store's ``unfinished`` requests.

        Queued requests are queued again; terminal ones stay as they are. A dispatching or
        running request's execution is judged by what its backend said of it (``lookups``, by
        execution id; see :meth:`in_flight`), so that no request runs twice (I3):

        - still running: re-attached — same attempt and execution, its memory reserved again
          on its placement's GPUs, status running; the driver waits for its outcome;
        - ended: its outcome is taken as if just reported (:meth:`finished`, :meth:`failed`);
        - not known to the backend: retried (its next dispatch is attempt + 1);
        - not asked, or no answer: retried, and the backend is told to stop it (best effort).

        An answer about an execution on GPUs the monitor does not know counts as no answer.
        """
        lookups = lookups if lookups is not None else {}
        decisions: list[Decision] = []
        reattached: list[Dispatch] = []
        ended: list[tuple[str, ExecutionResult | Failure]] = []
        for stored in [r.snapshot() for r in unfinished if r.id not in self._requests]:
            if stored.synchronous:
                decisions += self._end_orphan(stored, now)
                continue
            if stored.status.active:
                placement = stored.placement
                answer = lookups.get(stored.execution_id)
                known = placement is not None and all(
                    gpu_id in self.monitor.gpus for gpu_id in placement.gpu_ids
                )
                if known and isinstance(answer, StillRunning):
                    reattached.append(self._reattach(stored, now, running=True))
                    continue
                if known and isinstance(answer, ExecutionResult | Failure):
                    self._reattach(stored, now, running=False)
                    ended.append((stored.execution_id, answer))
                    continue
                decisions += self._requeue_in_flight(
                    stored, now, tell=not isinstance(answer, NotKnown)
                )
            self._track(stored)
            self.queue.push(stored, fair_share_cost(stored))
        # Every outcome is taken before the one pass: a pass between them would see the
        # executions not yet taken as still running (their users' concurrency, their slots).
        for execution_id, outcome in ended:
            execution = self._executions[execution_id]
            if isinstance(outcome, Failure):
                decisions += self._fail(execution_id, execution, outcome, now)
            else:
                self._succeed(execution_id, execution, outcome, now)
        decisions += self._pass(now)
        # All the changes go first, in the order they were made (a request's last one last).
        ordered: list[Decision] = [d for d in decisions if isinstance(d, StateChange)]
        ordered += self._changes
        self._changes = []
        ordered += [d for d in decisions if not isinstance(d, StateChange)]
        return Recovery(ordered, reattached)

    def _backend_of(self, placement: Placement) -> str:
        """The backend of a placement: its first GPU's, else its worker (its own backend)."""
        gpu = self.monitor.gpus.get(placement.gpu_ids[0])
        return gpu.reading.backend if gpu is not None else placement.worker

    def _reattach(self, stored: Request, now: float, *, running: bool) -> Dispatch:
        """Track an in-flight request whose execution its backend knows; return its dispatch.

        With ``running`` (the backend still runs it) its memory is reserved again on its GPUs
        and a dispatching request is marked running.
        """
        placement = stored.placement
        assert placement is not None
        execution_id = stored.execution_id
        backend = self._backend_of(placement)
        dispatched_at = stored.dispatched_at if stored.dispatched_at is not None else now
        need = need_of(stored)
        reservations = {
            gpu_id: need.memory_on(self.monitor.gpus[gpu_id]) for gpu_id in placement.gpu_ids
        }
        self._track(stored)
        self._executions[execution_id] = _Execution(
            stored.id, stored.attempts, backend, placement.worker, placement.gpu_ids, dispatched_at
        )
        self._current[stored.id] = execution_id
        if running:
            for gpu_id, memory_mb in reservations.items():
                self.monitor.adopt(gpu_id, execution_id, memory_mb)
                self.metrics.gpu(self.monitor.gpus[gpu_id])
            if stored.status is _S.DISPATCHING:
                self._set(stored, _S.RUNNING, now, actor=f"backend:{backend}")
            _log.info("execution_reattached", request_id=stored.id, execution_id=execution_id)
        return Dispatch(
            request=stored.snapshot(),
            execution_id=execution_id,
            attempt=stored.attempts,
            backend=backend,
            placement=placement,
            reservations=reservations,
            deadline=stored.deadline,
        )

    def _requeue_in_flight(self, stored: Request, now: float, *, tell: bool) -> list[Decision]:
        """Queue again an in-flight request whose execution no backend vouches for.

        With ``tell`` (its backend did not say it does not know it) the backend is told to stop
        the execution, in case it still runs it.
        """
        stop = self._stop_stored(stored, "router_restarted") if tell else []
        before = stored.status
        stored.transition(_S.QUEUED, now, error=ErrorInfo("router_restarted", "outcome unknown"))
        self._record(stored, before, "router", now)
        return stop

    def _end_orphan(self, stored: Request, now: float) -> list[Decision]:
        """End a synchronous request whose router died: its caller's connection went with it.

        Nobody is left to read its answer, so it is not run (again): a running one fails (its
        execution is told to stop), a queued one is cancelled.
        """
        before = stored.status
        stop = self._stop_stored(stored, "router_lost") if before.active else []
        to = _S.FAILED if before.active else _S.CANCELLED
        error = ErrorInfo("router_lost", "the router holding its caller's connection stopped")
        stored.transition(to, now, error=error)
        self._record(stored, before, "router", now)
        self.metrics.request_finished(stored, now)
        return stop

    def _stop_stored(self, stored: Request, reason: str) -> list[Decision]:
        """Tell the backend of a stored in-flight request to stop its execution (best effort)."""
        placement = stored.placement
        if placement is None:
            return []
        return [
            CancelExecution(
                request_id=stored.id,
                execution_id=stored.execution_id,
                backend=self._backend_of(placement),
                worker=placement.worker,
                reason=reason,
            )
        ]

    def _track(self, request: Request) -> None:
        self._requests[request.id] = request
        if request.idempotency_key is not None:
            self._keys[request.user, request.idempotency_key] = request.id
        if request.status.active:
            self._active[request.user] += 1
        else:
            self._queued[request.user] += 1
            self._queued_total += 1
        heapq.heappush(self._deadlines, (request.deadline, request.id))

    # Events: executions ---------------------------------------------------------------------------

    def started(self, execution_id: str, now: float) -> list[Decision]:
        """The backend accepted an execution and is running it."""
        execution = self._executions.get(execution_id)
        if execution is None:
            return []
        request = self._requests[execution.request_id]
        if request.status is _S.DISPATCHING:
            self._set(request, _S.RUNNING, now, actor=f"backend:{execution.backend}")
        return self._emit([])

    def finished(self, execution_id: str, result: ExecutionResult, now: float) -> list[Decision]:
        """An execution succeeded; results of superseded or unknown executions are ignored."""
        execution = self._executions.get(execution_id)
        if execution is None:
            _log.debug("stale_result_ignored", execution_id=execution_id)
            return []
        self._succeed(execution_id, execution, result, now)
        return self._emit(self._pass(now))

    def _succeed(
        self, execution_id: str, execution: _Execution, result: ExecutionResult, now: float
    ) -> None:
        request = self._requests[execution.request_id]
        reported = result.gpu_seconds
        if reported is not None and not (math.isfinite(reported) and reported >= 0):
            reported = None  # no window could hold it: measure instead
        duration: float | None = None
        if reported is not None:
            duration = reported / len(execution.gpu_ids)
        elif request.started_at is not None:
            duration = now - request.started_at
        if duration is not None:
            duration = max(0.0, duration - result.load_s)  # the work, without the cold start
        actor = f"backend:{execution.backend}"
        if request.status is _S.DISPATCHING:
            self._set(request, _S.RUNNING, now, actor=actor)
        used = self._settle(request, execution_id, execution, now, reported)
        self._set(request, _S.SUCCEEDED, now, actor=actor, result=result.output, charge=used)
        self._end_execution(
            execution_id, request, result.peak_memory_mb, request.estimate.gpu_memory_mb
        )
        if duration is not None:
            gpu_type = self.monitor.gpus[execution.gpu_ids[0]].type
            self.estimator.observe(
                request.model,
                gpu_type,
                request.estimate,
                duration,
                result.peak_memory_mb,
                shape=request.shape,
                hints=request.resources,
            )
            for (model, kind), ratio in self.estimator.error_ratios().items():
                if model == request.model:
                    self.metrics.estimate_error(model, kind, ratio)
        self._circuits.succeeded(execution.backend, execution.gpu_ids)

    def failed(self, execution_id: str, failure: Failure, now: float) -> list[Decision]:
        """An execution failed: fail, retry (elsewhere, after a backoff) or expire the request."""
        execution = self._executions.get(execution_id)
        if execution is None:
            _log.debug("stale_failure_ignored", execution_id=execution_id)
            return []
        decisions = self._fail(execution_id, execution, failure, now)
        return self._emit(decisions + self._pass(now))

    def _fail(
        self,
        execution_id: str,
        execution: _Execution,
        failure: Failure,
        now: float,
        actor: str | None = None,
    ) -> list[Decision]:
        """Handle a failed execution; ``actor`` defaults to its backend (the one reporting it)."""
        if actor is None:
            actor = f"backend:{execution.backend}"
        request = self._requests[execution.request_id]
        size_mb = request.estimate.gpu_memory_mb  # of this attempt, before any growth
        used = self._settle(request, execution_id, execution, now, None)
        verdict = self.errors.judge(failure, request.attempts, now)
        error = ErrorInfo(failure.kind.value, failure.message or failure.kind.value)
        estimate = None
        to = _S.QUEUED
        if verdict.action is Action.EXPIRE:
            to = _S.EXPIRED
        elif verdict.action is Action.FAIL:
            to = _S.FAILED
            if verdict.reason in ("max_attempts", "retry_budget_exhausted"):
                gave_up = verdict.reason.replace("_", " ")
                error = ErrorInfo(error.type, f"{error.message} (gave up: {gave_up})")
        elif verdict.action is Action.GROW_AND_RETRY:
            estimate = self.estimator.grow_after_oom(
                request.model,
                request.estimate,
                self._settings.retries.oom_growth,
                failure.peak_memory_mb,
                shape=request.shape,
                hints=request.resources,
            )
            grown = dataclasses.replace(request, estimate=estimate)
            if not self.fit.could_ever_fit(need_of(grown)):
                to = _S.FAILED
                message = (
                    f"out of GPU memory; {estimate.gpu_memory_mb} MiB per GPU "
                    "fits no GPU of the fleet"
                )
                error = ErrorInfo(error.type, message)
        self._set(request, to, now, actor=actor, error=error, estimate=estimate, charge=used)
        out_of_memory = failure.kind is FailureKind.OUT_OF_MEMORY
        self._end_execution(
            execution_id,
            request,
            failure.peak_memory_mb if out_of_memory else None,
            size_mb,
            out_of_memory=out_of_memory,
        )
        if self.errors.counts_against_circuit(failure):
            self._circuits.failed(execution.backend, execution.gpu_ids, now)
        if to is _S.QUEUED:
            self.metrics.retry(verdict.reason, request.user)
            self._avoid.setdefault(request.id, set()).update(execution.gpu_ids)
            if verdict.delay_s > 0:
                heapq.heappush(self._backoff, (now + verdict.delay_s, next(self._seq), request.id))
            else:
                self.queue.push(request, fair_share_cost(request))
        return []

    @staticmethod
    def _settle(
        request: Request,
        execution_id: str,
        execution: _Execution,
        now: float,
        reported: float | None,
    ) -> Charge:
        """The charge that settles an execution: GPU-seconds as reported, else time × GPUs."""
        used = reported
        if used is None:
            started = request.started_at if request.started_at is not None else now
            used = max(0.0, now - started) * len(execution.gpu_ids)
        return Charge(request.user, execution_id, execution.dispatched_at, used)

    def _end_execution(
        self,
        execution_id: str,
        request: Request,
        peak_memory_mb: int | None = None,
        size_mb: int | None = None,
        *,
        out_of_memory: bool = False,
    ) -> None:
        """Forget an execution and free its reservations.

        Its charge was settled by the status change that ended it; ``peak_memory_mb`` and
        ``size_mb`` feed the monitor's correction (``release``).
        """
        self._executions.pop(execution_id)
        self._current.pop(request.id, None)
        touched = self.monitor.release(
            execution_id,
            peak_memory_mb,
            size_mb,
            out_of_memory=out_of_memory,
            model=request.model,
            weights_mb=request.estimate.weights_mb if size_mb is not None else 0,
        )
        for gpu_id in touched:
            self.metrics.gpu(self.monitor.gpus[gpu_id])

    # Events: users and operators ---------------------------------------------------------------

    def cancel(self, request_id: str, now: float, actor: str = "user") -> list[Decision]:
        """Cancel a request on behalf of ``actor``; a running one's execution is told to stop.

        Raises:
            NotFound: no live request has this id (it may have finished: the store knows).
        """
        request = self._requests.get(request_id)
        if request is None:
            raise NotFound("request", request_id)
        decisions = self._stop(request, _S.CANCELLED, now, None, actor)
        return self._emit(decisions + self._pass(now))

    def _stop(
        self,
        request: Request,
        to: RequestStatus,
        now: float,
        error: ErrorInfo | None,
        actor: str = "router",
    ) -> list[Decision]:
        """End a live request as cancelled or expired, stopping its execution if it has one."""
        execution_id = self._current.get(request.id)
        if execution_id is None:
            self._set(request, to, now, actor=actor, error=error)
            self.queue.remove(request.id)
            return []
        execution = self._executions[execution_id]
        charge = self._settle(request, execution_id, execution, now, None)
        self._set(request, to, now, actor=actor, error=error, charge=charge)
        self._end_execution(execution_id, request)
        return [_cancel(execution_id, execution, to.value)]

    def cordon(self, gpu_id: str, now: float) -> list[Decision]:
        """Stop placing work on a GPU."""
        self.metrics.gpu(self.monitor.cordon(gpu_id))
        return self._emit(self._pass(now))

    def uncordon(self, gpu_id: str, now: float) -> list[Decision]:
        """Resume placing work on a GPU."""
        self.metrics.gpu(self.monitor.uncordon(gpu_id))
        return self._emit(self._pass(now))

    def drain(self, gpu_id: str, now: float) -> list[Decision]:
        """Cordon a GPU and let its running work finish."""
        self.metrics.gpu(self.monitor.drain(gpu_id))
        return self._emit(self._pass(now))

    # Events: monitoring and time ---------------------------------------------------------------

    def readings(
        self,
        readings: Iterable[GPUReading],
        now: float,
        *,
        worker: str | None = None,
        mark: int | None = None,
    ) -> list[Decision]:
        """New GPU readings (with ``worker``: that worker's complete report).

        ``mark``: ``monitor.mark()`` when the reading began (see :meth:`GPUStateMonitor.apply`).
        """
        readings = list(readings)
        lost = self.monitor.apply(readings, now, worker=worker, mark=mark)
        for reading in readings:
            self.metrics.gpu(self.monitor.gpus[reading.gpu_id])
        decisions = self._fail_over(lost, now)
        return self._emit(decisions + self._pass(now))

    def source_failed(self, worker: str, now: float) -> list[Decision]:
        """Reading ``worker`` failed (its GPUs go unhealthy if it stays silent)."""
        self.monitor.source_failed(worker, now)
        return []

    # Events: other routers sharing the state store ------------------------------------------------

    def claim_refused(self, execution_id: str, message: str, now: float) -> list[Decision]:
        """The store refused a dispatch's claim: another router holds what it needed.

        The dispatch was stored without its reservation and its execution never started: the
        request goes back to its queue with the attempt not counted (it ran nowhere). Feed
        what the store said others hold (:meth:`shared_view`) first, so that the pass this
        ends with does not choose the same GPU again.
        """
        execution = self._executions.get(execution_id)
        if execution is None or self._current.get(execution.request_id) != execution_id:
            return []
        request = self._requests[execution.request_id]
        charge = Charge(request.user, execution_id, execution.dispatched_at, 0.0)
        error = ErrorInfo("placement_conflict", message)
        self._set(
            request, _S.QUEUED, now, actor="router", error=error, charge=charge, attempt_spent=False
        )
        self._end_execution(execution_id, request)
        self.queue.push(request, fair_share_cost(request))
        self.metrics.retry("placement_conflict", request.user)
        return self._emit(self._pass(now))

    def shared_view(
        self,
        ledger: Mapping[str, Mapping[str, int]],
        active: Mapping[str, Iterable[str]],
        now: float,
        held: Mapping[str, float] | None = None,
        charges: Iterable[Charge] = (),
        heads: Iterable[QueueHead] | None = None,
    ) -> list[Decision]:
        """What every router sharing the state store holds, as the store says.

        ``ledger``: per GPU, the reservations of all routers (request id → MiB); ``active``: per
        user, the ids of their requests holding a concurrent slot. What this router's own live
        executions hold is left out; the rest comes off its room, slots and users' concurrency.
        A GPU or user left out of a map is left as it was. ``held``: the GPUs other routers
        now hold for their starving requests (:mod:`~gpu_request_router.core.holds`), with the
        creation time of each one's request (``None``: as they were): this router places
        nothing there, and holds one only for a request that has waited longer. ``charges``:
        the store's account of the hour of users waiting on their GPU-seconds here (every
        router's, as charges; each replaces the one of its id, time included). ``heads``: the
        requests other routers now find waiting for room (``None``: as they were); a pass
        keeps what each needs, where it would go, from requests of its own of a lower priority
        level (class with aging; within a level each router keeps its own order). One that
        already holds a reservation in ``ledger`` was placed since and is left out.
        """
        own = self._current
        changed = False
        if heads is not None:
            placed = {request_id for held in ledger.values() for request_id in held}
            waiting = sorted(
                (head for head in heads if head.request_id not in placed), key=lambda h: h.key
            )
            if waiting != self._heads_elsewhere:
                self._heads_elsewhere[:] = waiting  # in place: the explainer reads it
                changed = True
        for charge in charges:
            self.quotas.undo_charge(charge.user, charge.charge_id)
            self.quotas.charge(charge)
            changed = True
        if held is not None and dict(held) != self._held_elsewhere:
            self._held_elsewhere.clear()  # in place: the explainer reads it
            self._held_elsewhere.update(held)
            changed = True
        for gpu_id, held in ledger.items():
            others = [memory_mb for request_id, memory_mb in held.items() if request_id not in own]
            if self.monitor.elsewhere(gpu_id, sum(others), len(others)):
                changed = True
                self.metrics.gpu(self.monitor.gpus[gpu_id])
        for user, request_ids in active.items():
            count = sum(1 for request_id in request_ids if request_id not in own)
            if self._active_elsewhere[user] != count:
                changed = True
                if count:
                    self._active_elsewhere[user] = count
                else:
                    del self._active_elsewhere[user]
        return self._emit(self._pass(now)) if changed else []

    def tick(self, now: float) -> list[Decision]:
        """Apply the passing of time: expiry, staleness, backoffs ending, circuits half-opening."""
        decisions = self._fail_over(self.monitor.refresh(now), now)
        while self._deadlines and self._deadlines[0][0] <= now:
            request_id = self._deadlines[0][1]
            request = self._requests.get(request_id)
            if request is None or request.deadline > now:
                heapq.heappop(self._deadlines)
                continue
            error = ErrorInfo("timeout", f"not finished within {request.timeout_s:g} s")
            decisions += self._stop(request, _S.EXPIRED, now, error)
        while self._backoff and self._backoff[0][0] <= now:
            _, _, request_id = heapq.heappop(self._backoff)
            request = self._requests.get(request_id)
            if request is not None and request.status is _S.QUEUED and request_id not in self.queue:
                self.queue.push(request, fair_share_cost(request))
        self._circuits.advance(now)
        return self._emit(decisions + self._pass(now))

    def next_wakeup(self) -> float | None:
        """When :meth:`tick` next has something to do, or ``None``."""
        while self._deadlines and self._deadlines[0][1] not in self._requests:
            heapq.heappop(self._deadlines)
        times = [
            self._deadlines[0][0] if self._deadlines else None,
            self._backoff[0][0] if self._backoff else None,
            self.monitor.next_change(),
            self.errors.circuits.next_change(),
            self._quota_wakeup,
        ]
        return min((t for t in times if t is not None), default=None)

    def _fail_over(self, lost_gpus: Iterable[str], now: float) -> list[Decision]:
        """Retry elsewhere the work of lost GPUs, and tell their executions to stop.

        Besides the GPUs just lost, every unhealthy GPU still holding work is handled.
        """
        decisions: list[Decision] = []
        for gpu_id in dict.fromkeys([*lost_gpus, *self.monitor.unhealthy_with_work()]):
            self.metrics.gpu(self.monitor.gpus[gpu_id])
            for execution_id in self.monitor.holders_on(gpu_id):
                execution = self._executions.get(execution_id)
                if execution is None:
                    continue
                failure = Failure(FailureKind.WORKER_LOST, f"GPU {gpu_id} was lost")
                decisions += self._fail(execution_id, execution, failure, now, "router")
                decisions.append(_cancel(execution_id, execution, "gpu_lost"))
        return decisions

    # The dispatch pass ----------------------------------------------------------------------------

    def _pass(self, now: float) -> list[Decision]:
        """Place queued requests in priority order while they fit.

        Backfill and starvation holds: see :mod:`~gpu_request_router.core.holds`.
        """
        schedulable = self.monitor.schedulable
        fleet = self.monitor.index
        most_room = fleet.most_room()
        # A quota wait noted by an earlier pass is this pass's to renew: left in place, a time
        # already past would make next_wakeup() ask for a tick at once, again and again.
        self._quota_wakeup = None
        self._gpu_seconds_waits.clear()
        self._heads = []
        if not len(self.queue) or most_room is None:
            self._publish_queue()
            return []
        started = self._perf()
        decisions: list[Decision] = []
        holds = self.holds
        holds.prune(schedulable)
        for request_id, gpu_ids in list(holds.items()):
            since = self._requests[request_id].created_at
            if any(self._held_elsewhere.get(gpu_id, math.inf) <= since for gpu_id in gpu_ids):
                holds.drop(request_id)  # a longer wait elsewhere took it
        # A hold binds the requests of its holder's priority level and below; candidates come
        # level by level, so ``held`` grows along the pass. Room only shrinks during a pass and
        # ``held`` only grows (but for a holder that starts, which clears ``no_fit``), so a need
        # that did not fit will not fit later in it, and the largest room at the start bounds
        # every GPU's room until the end.
        binding = sorted(
            (self.queue.level(self._requests[request_id], now), gpu_ids)
            for request_id, gpu_ids in holds.items()
        )
        bound_so_far = 0
        # GPUs other routers hold (shared store) take nothing of this router's.
        held: set[str] = set(self._held_elsewhere)
        taken = {gpu_id for gpu_ids in holds.values() for gpu_id in gpu_ids}

        no_prospect: set[tuple[object, ...]] = set()
        no_fit: dict[tuple[object, ...], NoFit] = {}
        misses = 0
        depth = self._settings.placement.backfill_depth
        bound = self._settings.placement.starvation_bound_s
        examined: set[str] = set()
        # Other routers' requests waiting for room, best ranked first (_set_aside_for).
        heads = iter(self._heads_elsewhere)
        head = next(heads, None)
        queue = self.queue
        try:
            for request in self.queue.candidates(now):
                if head is not None:
                    head = self._set_aside_for(head, heads, queue.level(request, now), now, held)
                if misses >= depth:
                    # Holds of requests this pass did not reach would keep their GPUs idle.
                    holds.keep_only(examined)
                    break
                user = request.user
                waiting_for = self.quotas.blocks_dispatch(
                    user,
                    self._active[user] + self._active_elsewhere[user],
                    gpu_seconds(request),
                    now,
                )
                if waiting_for is not None:
                    misses += 1
                    # Held GPUs wait for the request, not for its quota.
                    dropped = holds.drop(request.id)
                    if dropped:
                        taken.difference_update(dropped)
                        no_prospect.clear()
                    if waiting_for == "gpu_seconds_per_hour":
                        self._note_quota_wait(request.user, now)
                    continue
                if bound_so_far < len(binding):
                    level = self.queue.level(request, now)
                    while bound_so_far < len(binding) and binding[bound_so_far][0] <= level:
                        held.update(binding[bound_so_far][1])
                        bound_so_far += 1
                need = need_of(request, avoid=self._avoid.get(request.id, ()))
                shape = (need.model, need.memory_mb, need.weights_mb, need.gpu_count, need.gpu_type)
                own = holds.of(request.id)
                examined.add(request.id)
                chosen: Chosen | NoFit | None = None if own else no_fit.get(shape)
                if chosen is None and need.memory_mb - need.weights_mb > most_room:
                    chosen = NoFit(free_slots=True)
                if chosen is None:
                    chosen = self.balancer.place(need, fleet, held.difference(own) if own else held)
                if isinstance(chosen, NoFit):
                    if not own:
                        if shape not in no_fit and len(self._heads) < SHARED_HEADS:
                            self._heads.append(QueueHead(request.id, queue.key(request), need))
                        no_fit[shape] = chosen
                        if now - request.created_at >= bound and shape not in no_prospect:
                            # A GPU held elsewhere for a request waiting longer is not on offer.
                            older = {
                                gpu_id
                                for gpu_id, since in self._held_elsewhere.items()
                                if since <= request.created_at
                            }
                            own = holds.hold(
                                request, need, schedulable.values(), taken | older, now
                            )
                            taken.update(own)
                            if not own:
                                no_prospect.add(shape)
                            held.update(own)
                    misses += 1
                    if not chosen.free_slots:
                        break
                    continue
                try:
                    decisions.append(self._dispatch(request, chosen, now, need))
                except StateConflict as exc:
                    # A GPU refused the memory (its room changed under the choice); nothing changed
                    # here, and the dispatches already decided still go out.
                    _log.warning("dispatch_conflict", request_id=request.id, error=str(exc))
                    misses += 1
                    continue
                if own:  # the dispatch ended the hold
                    held.difference_update(own)
                    taken.difference_update(own)
                    no_fit.clear()  # what the hold kept out may fit now
                    no_prospect.clear()
        finally:
            self.monitor.clear_aside()  # what the heads kept is for this pass only
        self.metrics.decision(self._perf() - started)
        self._publish_queue()
        return decisions

    def _set_aside_for(
        self,
        head: QueueHead,
        heads: Iterator[QueueHead],
        level: int,
        now: float,
        held: Collection[str],
    ) -> QueueHead | None:
        """Set aside what ``head`` and the next of ``heads`` need while of a better level.

        Each is kept where the policy would place it (off ``held`` GPUs), until the pass ends,
        from this router's requests of priority level ``level``. Returns the first head not
        better, or ``None``.
        """
        current: QueueHead | None = head
        while current is not None and self.queue.level_of_key(current.key, now) < level:
            kept = self.balancer.place(current.need, self.monitor.index, held, learn=False)
            if isinstance(kept, Chosen):
                for gpu_id, memory_mb in kept.reservations.items():
                    self.monitor.set_aside(gpu_id, memory_mb)
            current = next(heads, None)
        return current

    def _publish_queue(self) -> None:
        """Queue depth per priority class and the GPUs held, as a pass leaves them."""
        self.metrics.set_queue_depth(self._depths())
        self.metrics.set_gpus_held(sum(len(gpu_ids) for gpu_ids in self.holds.values()))

    def _note_quota_wait(self, user: str, now: float) -> None:
        self._gpu_seconds_waits.add(user)
        frees = self.quotas.gpu_seconds_frees_at(user, now)
        if frees is None or frees <= now:
            return
        if self._quota_wakeup is None or frees < self._quota_wakeup:
            self._quota_wakeup = frees

    def _dispatch(self, request: Request, chosen: Chosen, now: float, need: Need) -> Dispatch:
        attempt = request.attempts + 1
        execution_id = f"exe_{request.id}_{attempt}"
        placement = Placement(chosen.worker, chosen.gpu_ids, chosen.reason)
        wait = now - request.queued_at
        # Memory first, then the claim with the estimate's charge (settled when the execution
        # ends): if a GPU refuses, what the others reserved is given back.
        for gpu_id, memory_mb in chosen.reservations.items():
            if not self.monitor.reserve(gpu_id, execution_id, memory_mb):
                self.monitor.release(execution_id)
                raise StateConflict(request.id, f"room for {memory_mb} MiB on {gpu_id}")
        charge = Charge(request.user, execution_id, now, gpu_seconds(request))
        monitor = self.monitor
        quota = self.quotas.quota_for(request.user)
        claim = Claim(
            tuple(
                (gpu_id, memory_mb, monitor.shared_limit_mb(gpu), gpu.slots)
                for gpu_id, memory_mb in chosen.reservations.items()
                for gpu in (monitor.gpus[gpu_id],)
            ),
            quota.max_concurrent,
            quota.gpu_seconds_per_hour,
        )
        self._set(
            request,
            _S.DISPATCHING,
            now,
            actor="router",
            placement=placement,
            charge=charge,
            claim=claim,
        )
        for gpu_id in chosen.gpu_ids:
            self.metrics.gpu(self.monitor.gpus[gpu_id])
        self.queue.dispatched(request.id)
        backend = self.monitor.gpus[chosen.gpu_ids[0]].reading.backend
        execution = _Execution(request.id, attempt, backend, chosen.worker, chosen.gpu_ids, now)
        self._executions[execution_id] = execution
        self._current[request.id] = execution_id
        if attempt == 1:
            self.errors.budget.first_attempt(now)
        self._circuits.dispatched(backend, chosen.gpu_ids)
        self.metrics.request_dispatched(request, wait)
        self._decisions.record(request.id, Decided(now, need, chosen.gpu_ids, chosen.weighed))
        return Dispatch(
            request=request.snapshot(),
            execution_id=execution_id,
            attempt=attempt,
            backend=backend,
            placement=placement,
            reservations=dict(chosen.reservations),
            deadline=request.deadline,
        )

    def _depths(self) -> dict[str, int]:
        depths = self.queue.depths()
        for _, _, request_id in self._backoff:
            request = self._requests.get(request_id)
            if request is not None and request.status is _S.QUEUED and request_id not in self.queue:
                depths[request.priority] += 1
        return depths

    # Status changes ------------------------------------------------------------------------------

    def _set(
        self,
        request: Request,
        to: RequestStatus,
        now: float,
        *,
        actor: str,
        placement: Placement | None = None,
        result: object = None,
        error: ErrorInfo | None = None,
        estimate: Estimate | None = None,
        charge: Charge | None = None,
        claim: Claim | None = None,
        attempt_spent: bool = True,
    ) -> None:
        """Move a request to ``to``, with the counts; the change goes out to be persisted.

        ``charge`` (an execution's GPU-seconds) is counted now and persisted with the change,
        as is a dispatch's ``claim``. Without ``attempt_spent``, the attempt that ends does not
        count (its dispatch never happened).

        Raises:
            IllegalTransition: ``to`` does not follow the request's status (nothing changed).
        """
        before = request.status
        draft = request.snapshot()
        if estimate is not None:
            draft.estimate = estimate
        draft.transition(to, now, placement=placement, result=result, error=error)
        if not attempt_spent:
            draft.attempts -= 1
        if charge is not None:
            self.quotas.charge(charge)
        request.adopt(draft)
        self._record(request, before, actor, now, charge, claim)
        if before is _S.QUEUED:
            self._queued[request.user] -= 1
            self._queued_total -= 1
            self.holds.drop(request.id)  # dispatched or ended: its GPUs wait no more
        elif before.active and not to.active:
            self._active[request.user] -= 1
        if to is _S.QUEUED:
            self._queued[request.user] += 1
            self._queued_total += 1
        elif to.active and not before.active:
            self._active[request.user] += 1
        if to.terminal:
            self._untrack(request)
            self._avoid.pop(request.id, None)
            self.metrics.request_finished(request, now)

    def _record(
        self,
        request: Request,
        before: RequestStatus,
        actor: str,
        now: float,
        charge: Charge | None = None,
        claim: Claim | None = None,
    ) -> None:
        """Send out a changed request and its audit entry (charge, claim) to be persisted."""
        change = transition_of(request, before, actor, now)
        self._changes.append(StateChange(request.snapshot(), change, charge, claim=claim))

    def _untrack(self, request: Request) -> None:
        del self._requests[request.id]
        if request.idempotency_key is not None:
            self._keys.pop((request.user, request.idempotency_key), None)


def transition_of(
    request: Request, before: RequestStatus | None, actor: str, at: float
) -> Transition:
    """The audit entry of the change that brought ``request`` to its status at time ``at``."""
    if request.status is _S.DISPATCHING and request.placement is not None:
        placement = request.placement
        detail = f"on {', '.join(placement.gpu_ids)}: {placement.reason}"
    elif request.error is not None and request.status is not _S.SUCCEEDED:
        detail = f"{request.error.type}: {request.error.message}"
    else:
        detail = ""
    return Transition(
        request_id=request.id,
        seq=request.version,
        from_status=before,
        to_status=request.status,
        at=at,
        attempt=request.attempts,
        actor=actor,
        detail=detail,
    )

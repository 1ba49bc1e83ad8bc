"""The asyncio driver: the core in real time, against real (or simulated) backends.

It owns the I/O the core does not: a timer loop that calls
:meth:`~gpu_request_router.core.request_router.RequestRouter.tick` at
:meth:`~gpu_request_router.core.request_router.RequestRouter.next_wakeup`, one polling loop per
GPU source, one task per execution that awaits the backend client and feeds the outcome back, and
the :class:`~gpu_request_router.writer.Writer` that persists the core's status changes in group
commits. The core is synchronous and the event loop single-threaded, so no locks are needed.

Durability (SPEC §2, "Durability contract"):

- **Async requests** (:meth:`Runtime.admit`): answered once the commit holding their creation
  succeeded; a failed commit answers 503 and the core takes them back (none exists afterwards).
- **A status change is durable before it is visible**: reads (:meth:`Runtime.get`), waits and
  audit-trail watches show a request as its last committed change left it, and an execution
  starts only once the change that dispatched it is committed (a crash can never leave a request
  running that the store shows queued).
- **Synchronous requests** (``durable=False``: the OpenAI door) are held in memory and visible at
  once; the caller's open connection is their durability. Their changes are written behind when
  they end (:meth:`~gpu_request_router.writer.Writer.add_behind`, within a second), so a crash
  loses at most that second of their accounting.

On start it reads the store's unfinished requests and quota windows, asks the workers about the
executions in flight (all at once, each within five seconds), hands the answers to the core's
recovery, and waits on the executions it re-attached to like on those it dispatches.

**Routers sharing a store** (``StateStore.shared``: several routers serve at once on one Redis
prefix). Every request is durable before it runs, the OpenAI door's included (its creation
and dispatch commit in one script, and its end in the next): the store checks each creation's
limits and each dispatch's claim against every router, and a refusal comes back as an answer
(429 or 503) or as a dispatch that goes back to its queue. Every :data:`SHARED_SYNC_S` the
runtime reads what the other routers hold (GPU reservations, users' slots) into the core,
carries out the cancellations they passed to it, refreshes the quota overrides, and adopts the
work of any router whose lease lapsed (recovered as after a restart; a synchronous request of
a dead router ends, its caller having gone with it). The agent workers are read in turns: one
router per poll interval reads each and publishes what it read for the others
(:meth:`Runtime._take_turns`). A request another router owns is read,
waited on and watched through the store, and cancelled through its owner.

Example::

    async with Runtime.from_settings(load_settings()) as runtime:
        request = await runtime.submit(Submission(model="llama-3-8b"), Caller("alice"))
        done = await runtime.wait(request.id, timeout_s=30)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Self

import structlog

from gpu_request_router.config.config_loader import BackendSettings, Settings
from gpu_request_router.core.engine import Engine
from gpu_request_router.core.events import (
    CancelExecution,
    Decision,
    Dispatch,
    ExecutionResult,
    Failure,
    FailureKind,
    InFlight,
    Lookup,
    StateChange,
)
from gpu_request_router.core.explain import Explanation
from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.core.quota import HOUR_S, MINUTE_S
from gpu_request_router.core.request_receiver import Caller, EstimateReport, Submission
from gpu_request_router.core.resource_estimator import ResourceEstimator
from gpu_request_router.core.state_store import (
    WRITE_PROBE_INTERVAL_S,
    Change,
    OverrideChange,
    Page,
    Refusal,
    RequestQuery,
    SharedReading,
    SharedStore,
    StateStore,
)
from gpu_request_router.exceptions import (
    AlreadyTerminal,
    InvalidRequest,
    NotFound,
    QueueFull,
    QuotaExceeded,
    RequestRejected,
    StoreUnavailable,
)
from gpu_request_router.models.gpu_state import GPUReading, GPUState
from gpu_request_router.models.gpu_types import gpu_type
from gpu_request_router.models.request import Request, RequestStatus, Transition
from gpu_request_router.models.user_quota import QuotaUsage, UserQuota
from gpu_request_router.services.ai_orchestrator import (
    AgentClient,
    BackendClient,
    OpenAIClient,
    SimulatedBackend,
    StreamSink,
)
from gpu_request_router.services.gpu_monitoring import (
    AgentSource,
    DcgmSource,
    GpuSource,
    OpenAIBackendSource,
    SimulatedSource,
)
from gpu_request_router.services.simulator import SimulatedFleet
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.utils.budget import TimeBudget
from gpu_request_router.utils.clock import Clock, SystemClock
from gpu_request_router.utils.json_values import first_problem, repaired_text
from gpu_request_router.writer import Writer

__all__ = ["POSITION_LIMIT", "SHARED_SYNC_S", "Runtime", "received"]

_log = structlog.get_logger(__name__)

# Queue positions are counted this far back at most.
POSITION_LIMIT = 1_000
# The pause after a background event failed (a bug), before the loop goes on.
_EVENT_RETRY_S = 0.2
# How long a backend gets to acknowledge a cancellation before the router stops waiting.
_CANCEL_TIMEOUT_S = 5.0
# How long a worker gets, at start, to say what became of an execution; then it is retried.
_LOOKUP_TIMEOUT_S = 5.0
# Cancellations kept for a backend not known yet (a worker that registers itself), at most.
_PENDING_CANCELS = 10_000
# Explanations may take this share of the event loop's time on average, in bursts of up to
# this many seconds (Runtime.explain).
_EXPLAIN_SHARE = 0.1
_EXPLAIN_BURST_S = 0.25

SHARED_SYNC_S = 0.25
"""How often a router of a shared store reads what the others hold (see the module docstring)."""
# How often it reads other requests' progress while waiting on them, and how long a
# cancellation passed to another router is waited for.
_POLL_OTHERS_S = 0.1
# Every this many shared rounds, what the store says this router owns is checked against what
# it drives (Runtime._reconcile).
_RECONCILE_ROUNDS = 20
_CANCEL_ELSEWHERE_S = 5.0


class _KeyTaken(Exception):
    """A shared store refused a creation: another router took its idempotency key first."""

    def __init__(self, existing: str) -> None:
        super().__init__(existing)
        self.existing = existing


def received(outcome: ExecutionResult | Failure) -> ExecutionResult | Failure:
    """A backend's outcome as the router may keep it: every backend answer enters here.

    An answer that could not be sent back as JSON (a lone surrogate, a number that is not
    finite, nesting over 64 levels: :mod:`~gpu_request_router.utils.json_values`) fails the
    attempt as a ``backend_error`` naming the place; a failure's message keeps its text with
    U+FFFD for any lone surrogate.
    """
    if isinstance(outcome, Failure):
        message = repaired_text(outcome.message)
        return outcome if message is outcome.message else replace(outcome, message=message)
    problem = first_problem(outcome.output)
    if problem is None:
        return outcome
    return Failure(
        FailureKind.BACKEND_ERROR,
        f"the backend's answer cannot be sent back as JSON: {problem.at('output')}",
    )


class Runtime:
    """Runs an :class:`Engine` under asyncio; use it as an async context manager."""

    def __init__(
        self,
        engine: Engine,
        *,
        store: StateStore,
        clients: Mapping[str, BackendClient],
        sources: Sequence[GpuSource],
        clock: Clock | None = None,
    ) -> None:
        self.engine = engine
        self.router = engine.router
        self.metrics = engine.metrics
        self.registry = engine.registry
        self.store = store
        # The store as shared with other routers, if it is (state.shared).
        self._peers = store if isinstance(store, SharedStore) and store.shared else None
        self._heard: dict[str, str] = {}  # workers registered here since the last shared view
        self.clock = clock if clock is not None else SystemClock()
        self.writer = Writer(
            store,
            self.clock.now,
            on_committed=self._committed,
            on_refused=self._refused,
            on_refusals=self._refusals,
        )
        # Requests as their last committed change left them (synchronous ones: as they are),
        # until the store holds them finished.
        self._view: dict[str, Request] = {}
        # Creations of async requests waiting for their commit, by request id.
        self._creations: dict[str, asyncio.Future[None]] = {}
        # Synchronous requests not yet ended, and the changes each made so far.
        self._unwritten: dict[str, list[Change]] = {}
        self._clients = dict(clients)
        self._sources = list(sources)
        self._poll_s = engine.settings.monitor.poll_interval_s
        self._stale_s = engine.settings.monitor.stale_after_s
        # On a shared store the agent workers are read in turns with the other routers
        # (_take_turns): by name, the latest source of each, the stamp of the last shared reading
        # of each taken in, and this router's marks by the time they were taken.
        self._agents: dict[str, AgentSource] = (
            {s.worker: s for s in sources if isinstance(s, AgentSource)} if self._peers else {}
        )
        self._stamps: dict[str, int] = {}
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._wake = asyncio.Event()
        self._executions: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._waiters: dict[str, list[asyncio.Future[Request | None]]] = {}
        self._watchers: dict[str, list[asyncio.Future[Request | None]]] = {}
        self._sinks: dict[str, StreamSink] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._worker_loops: dict[str, asyncio.Task[None]] = {}
        self._worker_token: str | None = None
        # backend name -> execution ids to cancel once the backend is known (it registers)
        self._pending_cancels: dict[str, list[str]] = {}
        self._running = False
        self._explain_budget = TimeBudget(_EXPLAIN_SHARE, _EXPLAIN_BURST_S)
        self._rounds = 0  # of the shared loop
        # Called with every status change after a request's creation, once it is visible
        # (committed, for async requests).
        self.listeners: list[Callable[[Request, Transition], None]] = [self._on_transition]
        # Called with (request id, start, end) of every admission that created a request.
        self.admission_listeners: list[Callable[[str, float, float], None]] = []

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        store: StateStore | None = None,
        clock: Clock | None = None,
        seed: int | None = None,
    ) -> Runtime:
        """A runtime for the backends of ``settings``: a client and a GPU source for each.

        ``simulated`` backends run on an in-process fleet; ``agent`` ones are ``gpurouter worker``
        hosts; ``openai`` ones are inference servers, read through their configuration, their
        dcgm-exporter (``dcgm_url``) and their metrics (``metrics_url``).
        """
        store = store if store is not None else MemoryStore()
        engine = Engine.build(settings, seed=seed)
        clock = clock if clock is not None else SystemClock()
        estimator = engine.router.estimator
        fleet = SimulatedFleet.for_engine(settings, estimator)
        clients: dict[str, BackendClient] = {}
        sources: list[GpuSource] = [SimulatedSource(fleet, worker) for worker in fleet.workers]
        token = settings.auth.worker_token
        reported_id = _reported_ids(engine.router.monitor)
        for backend in settings.backends:
            if backend.kind == "simulated":
                clients[backend.name] = SimulatedBackend(backend.name, fleet, clock)
            elif backend.kind == "agent":
                assert backend.url is not None
                clients[backend.name] = AgentClient(
                    backend.name, backend.url, token, clock, reported_id=reported_id
                )
                sources.append(AgentSource(backend.url, backend.name, token))
            else:
                assert backend.url is not None
                client = OpenAIClient(backend.name, backend.url, clock)
                clients[backend.name] = client
                sources.append(_openai_source(backend, client, estimator, settings))
        runtime = cls(engine, store=store, clients=clients, sources=sources, clock=clock)
        runtime._worker_token = token
        return runtime

    def register_worker(self, name: str, url: str) -> bool:
        """Take in a worker that registered itself (or heartbeats); True if it is new.

        A new worker gets a client and a GPU source polled like a configured one; a known one
        that moved to another URL is followed there. Cancellations meant for it while it was not
        known (work it ran before a router restart, retried since) are delivered now. On a
        shared store the registration is published to the other routers with the next view.
        """
        new = self._add_worker(name, url)
        if self._peers is not None:
            self._heard[name] = url
        return new

    def _add_worker(self, name: str, url: str) -> bool:
        """:meth:`register_worker`, without publishing it."""
        known = self._clients.get(name)
        if isinstance(known, AgentClient) and known.url == url.rstrip("/"):
            return False
        if known is not None and not isinstance(known, AgentClient):
            raise InvalidRequest("name", f"{name!r} is the name of a configured backend")
        client = self._clients[name] = AgentClient(
            name,
            url,
            self._worker_token,
            self.clock,
            reported_id=_reported_ids(self.router.monitor),
        )
        for execution_id in self._pending_cancels.pop(name, []):
            self._notify_cancel(client, execution_id)
        source = AgentSource(url, name, self._worker_token)
        old = self._worker_loops.pop(name, None)
        if old is not None:
            old.cancel()
        self._sources.append(source)  # closed on leaving, like the configured ones
        if self._peers is not None:
            self._agents[name] = source  # read in turns (_take_turns)
        elif self._running:
            task = asyncio.create_task(self._poll_loop(source))
            self._worker_loops[name] = task
            self._loops.append(task)
        _log.info("worker_registered", worker=name, url=url, new=known is None)
        return known is None

    # Lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Read every source once, recover stored work, then start the loops.

        The executions in flight are asked about at their workers first (see the module
        docstring); those still running there are re-attached, not run again.
        """
        store = self.store
        unfinished = store.unfinished_requests()
        history = store.quota_history(self.clock.now(), MINUTE_S, HOUR_S)
        self.router.quotas.load(history, store.quota_overrides())
        self._view.update((request.id, request) for request in unfinished)
        self.writer.start()
        for source in self._sources:
            await self._poll_once(source)
        lookups = await self._look_up(self.router.in_flight(unfinished))
        recovery = self.router.recover(self.clock.now(), unfinished, lookups)
        # What recovery changed is durable, and so visible, before anything is served.
        await self._apply(recovery.decisions)
        for dispatch in recovery.reattached:
            self._executions[dispatch.execution_id] = asyncio.create_task(self._attach(dispatch))
        self._loops.append(asyncio.create_task(self._timer_loop()))
        self._loops.extend(
            asyncio.create_task(self._poll_loop(source))
            for source in self._sources
            if not (self._peers is not None and isinstance(source, AgentSource))
        )
        if self._peers is not None:
            self._loops.append(asyncio.create_task(self._shared_loop(self._peers)))
            self._loops.append(asyncio.create_task(self._turns_loop(self._peers)))
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the loops and the executions in flight, and commit what waits to be written."""
        self._running = False
        tasks = [*self._loops, *self._executions.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()
        await self.writer.close()
        for client in self._clients.values():
            await client.aclose()
        for source in self._sources:
            closer = getattr(source, "aclose", None)
            if closer is not None:
                await closer()

    # Requests ------------------------------------------------------------------------------------

    async def submit(self, submission: Submission, caller: Caller) -> Request:
        """Admit a submission (raises ``RequestRejected`` subclasses); return it as stored."""
        request, _ = await self.admit(submission, caller)
        return request

    async def admit(
        self,
        submission: Submission,
        caller: Caller,
        sink: StreamSink | None = None,
        *,
        durable: bool = True,
    ) -> tuple[Request, bool]:
        """Admit a submission; return it and whether it is new (not an idempotent replay).

        A durable (async) request is returned once its creation is committed; a synchronous
        one (``durable=False``) at once, held in memory (see the module docstring). With
        ``sink``, the answer is streamed into it as the backend produces it; the sink is
        closed when the request ends.

        Raises:
            RequestRejected: any reason the request is refused (see ``exceptions``).
            StoreUnavailable: the store cannot take it (a failed commit, or the writer behind).
        """
        self.writer.admitting()
        started = self.clock.now()
        key = submission.idempotency_key
        known = None
        if key is not None and self.router.find_live(caller.user, key) is None:
            known = self.store.find_idempotent(caller.user, key)
        synchronous = not durable
        # On a shared store every request is checked there before it runs (module docstring).
        durable = durable or self._peers is not None
        admission = self.engine.receiver.submit(
            submission, caller, started, known, synchronous=synchronous
        )
        request_id = admission.request.id
        if not admission.created:
            pending = self._creations.get(request_id)
            if pending is not None:
                await asyncio.shield(pending)
            return self.get(request_id), False
        if durable:
            created = self._creations[request_id] = asyncio.get_running_loop().create_future()
        else:
            self._unwritten[request_id] = []
        if sink is not None:
            self._sinks[request_id] = sink
        self._apply(admission.decisions)
        self._wake.set()
        if durable:
            try:
                await asyncio.shield(created)
            except _KeyTaken as taken:
                # Another router created it first: answer as a replay of its request.
                self._sinks.pop(request_id, None)
                known = await asyncio.to_thread(self.store.get_request, taken.existing)
                if known is None:  # taken back meanwhile (its commit's answer was lost)
                    raise StoreUnavailable(
                        "another router is writing the request of this idempotency key; retry"
                    ) from None
                replay = self.engine.receiver.submit(submission, caller, started, known)
                return self.get(replay.request.id), False
            finally:
                self._creations.pop(request_id, None)
        finished = self.clock.now()
        for listener in self.admission_listeners:
            listener(request_id, started, finished)
        return self.get(request_id), True

    def estimate(self, submission: Submission, caller: Caller) -> EstimateReport:
        """The dry run: validate and estimate without storing or queueing anything."""
        return self.engine.receiver.estimate(submission, caller, self.clock.now())

    async def cancel(self, request_id: str, actor: str = "user") -> Request:
        """Cancel a request; return it once the cancellation is visible.

        Raises:
            NotFound: no such request.
            AlreadyTerminal: it has finished already.
        """
        if self.router.get(request_id) is None:
            # Finished: once its end is committed, the store says how.
            await self.writer.flushed()
            ended = self.get(request_id)
            if not ended.status.terminal and self._peers is not None:
                return await self._cancel_elsewhere(self._peers, request_id, actor)
            raise AlreadyTerminal(request_id, ended.status.value, RequestStatus.CANCELLED.value)
        done = self._apply(self.router.cancel(request_id, self.clock.now(), actor))
        self._wake.set()
        await asyncio.shield(done)
        return self.get(request_id)

    async def _cancel_elsewhere(self, peers: SharedStore, request_id: str, actor: str) -> Request:
        """Cancel a request another router owns: through it, then wait to see it end.

        Returns the request as it is once it ended, or after :data:`_CANCEL_ELSEWHERE_S`.

        Raises:
            AlreadyTerminal: it ended before the cancellation reached its router.
        """
        if not await asyncio.to_thread(peers.send_cancel, request_id, actor):
            ended = self.get(request_id)
            raise AlreadyTerminal(request_id, ended.status.value, RequestStatus.CANCELLED.value)
        return await self._poll_until_ended(request_id, _CANCEL_ELSEWHERE_S)

    async def _poll_until_ended(self, request_id: str, timeout_s: float) -> Request:
        """A request another router owns, once the store shows it ended or after ``timeout_s``."""
        deadline = self.clock.now() + timeout_s
        while True:
            request = self.get(request_id)
            left = deadline - self.clock.now()
            if request.status.terminal or left <= 0:
                return request
            await asyncio.sleep(min(_POLL_OTHERS_S, left))

    async def set_quota(self, user: str, values: Mapping[str, object]) -> UserQuota:
        """Replace ``user``'s run-time quota override; return the new quota once committed.

        Raises:
            InvalidRequest: a key is not a quota limit, or ``max_priority`` is not a class
                (nothing changes).
        """
        quota = self.router.quotas.set_override(user, values)
        await asyncio.shield(self.writer.add([OverrideChange(user, dict(values))]))
        return quota

    def quota(self, user: str, *, admin: bool = False) -> UserQuota:
        """``user``'s effective quota (see :meth:`QuotaEnforcer.quota_for`)."""
        return self.router.quotas.quota_for(user, admin=admin)

    def quota_usage(self, user: str, *, admin: bool = False) -> tuple[UserQuota, QuotaUsage]:
        """``user``'s effective quota and live usage."""
        router = self.router
        quotas = router.quotas
        usage = quotas.usage(
            user,
            queued=router.queued_count(user),
            concurrent=router.active_count(user),
            now=self.clock.now(),
        )
        return quotas.quota_for(user, admin=admin), usage

    def store_failure(self) -> str | None:
        """Why the store cannot be used now, as already known (no I/O), or ``None``."""
        failure = self.writer.failure
        return failure.message if failure is not None else self.store.failure()

    def check_store(self) -> None:
        """Return if the store answers and takes writes, else raise ``StoreUnavailable``."""
        failure = self.writer.failure
        if failure is not None:
            raise failure
        self.store.ping()
        self.store.check_writable(self.clock.now())

    def take_readings(self, worker: str, readings: list[GPUReading]) -> None:
        """Readings a worker pushed (its heartbeat): its complete report now."""
        self._apply(self.router.readings(readings, self.clock.now(), worker=worker))
        self._wake.set()

    def cordon(self, gpu_id: str) -> GPUState:
        """Stop placing work on a GPU (``NotFound`` for an unknown id)."""
        self._apply(self.router.cordon(gpu_id, self.clock.now()))
        return self.router.monitor.get(gpu_id)

    def uncordon(self, gpu_id: str) -> GPUState:
        """Resume placing work on a GPU."""
        self._apply(self.router.uncordon(gpu_id, self.clock.now()))
        return self.router.monitor.get(gpu_id)

    def drain(self, gpu_id: str) -> GPUState:
        """Cordon a GPU and let its running work finish."""
        self._apply(self.router.drain(gpu_id, self.clock.now()))
        return self.router.monitor.get(gpu_id)

    def gpus(self) -> list[GPUState]:
        """Every GPU the router knows, in id order."""
        return sorted(self.router.monitor.gpus.values(), key=lambda gpu: gpu.id)

    def gpu_count(self) -> int:
        """How many GPUs the router knows (``/readyz`` polls it: no list is built)."""
        return len(self.router.monitor.gpus)

    def gpu(self, gpu_id: str) -> GPUState:
        """One GPU (``NotFound`` for an unknown id)."""
        return self.router.monitor.get(gpu_id)

    def gpu_type(self, gpu_id: str) -> str | None:
        """The type of a GPU the router knows, else ``None``."""
        gpu = self.router.monitor.gpus.get(gpu_id)
        return None if gpu is None else gpu.type

    def requests_on(self, gpu_id: str, user: str | None = None) -> list[str]:
        """The ids of the requests running on a GPU (with ``user``: that user's only)."""
        running = self.router.requests_on(gpu_id)
        if user is None:
            return running
        return [
            request_id
            for request_id in running
            if (live := self.router.get(request_id)) is not None and live.user == user
        ]

    def unfinished(self, user: str | None = None) -> list[Request]:
        """The requests not yet finished, as visible (with ``user``: that user's only)."""
        return [
            request
            for request in self._view.values()
            if not request.status.terminal and (user is None or request.user == user)
        ]

    def queue_positions(self, request_ids: Collection[str]) -> dict[str, int]:
        """How many queued requests go before each of these now, in one walk of the queue.

        Requests not in the queue, or more than :data:`POSITION_LIMIT` places back, are left
        out (the walk costs O(position × log n)). On a shared store it is their place among
        every router's queued requests, as the store orders them (priority class with aging,
        then submission time), so that every router gives the same answer; while the store
        cannot be reached, their place in this router's queue.
        """
        if self._peers is not None:
            try:
                ranks = self._peers.queue_positions(request_ids)
            except StoreUnavailable:
                pass
            else:
                return {rid: rank for rid, rank in ranks.items() if rank < POSITION_LIMIT}
        queue = self.router.queue
        wanted = {request_id for request_id in request_ids if request_id in queue}
        positions: dict[str, int] = {}
        if not wanted:
            return positions
        walk = queue.candidates(self.clock.now(), assume_dispatched=True)
        for position, request in enumerate(walk):
            if position >= POSITION_LIMIT:
                break
            if request.id in wanted:
                positions[request.id] = position
                if len(positions) == len(wanted):
                    break
        return positions

    def explain(self, request: Request) -> Explanation:
        """Where ``request`` (as :meth:`get` returned it) was placed and why, or why it waits.

        A waiting request's ETA is projected while explanations have taken less than
        :data:`_EXPLAIN_SHARE` of the time (burst :data:`_EXPLAIN_BURST_S`); past that it has
        none, so that callers asking again and again cannot stall the event loop. A request
        queued at another router sharing the store is explained there; here it is said so.
        """
        if request.status is RequestStatus.QUEUED and self._elsewhere(request.id):
            position = self.queue_positions([request.id]).get(request.id)
            where = "" if position is None else f" (position {position} among all routers')"
            return Explanation(
                request.id,
                request.status.value,
                f"It waits in the queue of another router{where}; that router places it.",
            )
        now = self.clock.now()
        return self._explain_budget.spend(
            lambda project: self.router.explain(request, now, project=project)
        )

    async def watch(self, request_id: str, after: int, timeout_s: float) -> list[Transition]:
        """The request's audit entries after ``after``, waiting up to ``timeout_s`` for one."""
        entries = self.transitions(request_id, after)
        if entries or timeout_s <= 0:
            return entries
        if self._elsewhere(request_id):
            deadline = self.clock.now() + timeout_s
            while not entries and (left := deadline - self.clock.now()) > 0:
                await asyncio.sleep(min(_POLL_OTHERS_S, left))
                entries = self.transitions(request_id, after)
            return entries
        await self._signal(self._watchers, request_id, timeout_s)
        return self.transitions(request_id, after)

    def _elsewhere(self, request_id: str) -> bool:
        """Whether another router sharing the store owns the request (its changes come not here)."""
        return (
            self._peers is not None
            and request_id not in self._view
            and request_id not in self._creations
            and self.router.get(request_id) is None
        )

    def transitions(self, request_id: str, after: int = -1) -> list[Transition]:
        """The visible audit trail: a synchronous request's from memory until it is written."""
        unwritten = self._unwritten.get(request_id)
        if unwritten is None:
            return self.store.transitions(request_id, after)
        return [
            change.entry
            for change in unwritten
            if isinstance(change, StateChange) and change.entry.seq > after
        ]

    def list_requests(self, query: RequestQuery) -> Page:
        """A page of stored requests (synchronous ones appear once written, when they end)."""
        return self.store.list_requests(query)

    def get(self, request_id: str) -> Request:
        """The request as it is now.

        Raises:
            NotFound: no such request.
        """
        visible = self._view.get(request_id)
        if visible is not None:
            return visible.snapshot()
        stored = self.store.get_request(request_id)
        if stored is None:
            raise NotFound("request", request_id)
        return stored

    async def wait(self, request_id: str, timeout_s: float) -> Request:
        """The request once it is terminal, or as it is when ``timeout_s`` has passed.

        A request that ends while waited on comes as its terminal transition left it (once it
        is visible), without reading it back from the store.
        """
        request = self.get(request_id)
        if request.status.terminal or timeout_s <= 0:
            return request
        if self._elsewhere(request_id):
            return await self._poll_until_ended(request_id, timeout_s)
        ended = await self._signal(self._waiters, request_id, timeout_s)
        return ended if ended is not None else self.get(request_id)

    async def _signal(
        self,
        registry: dict[str, list[asyncio.Future[Request | None]]],
        request_id: str,
        timeout_s: float,
    ) -> Request | None:
        """Wait until a transition of ``request_id`` resolves an entry of ``registry``.

        Returns the request if that transition ended it, else ``None`` (also on time-out).
        """
        future: asyncio.Future[Request | None] = asyncio.get_running_loop().create_future()
        registry.setdefault(request_id, []).append(future)
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            return None
        finally:
            pending = registry.get(request_id, [])
            if future in pending:
                pending.remove(future)
            if not pending:
                registry.pop(request_id, None)

    def _on_transition(self, request: Request, change: Transition) -> None:
        waiting = self._watchers.pop(request.id, [])
        ended = None
        if request.status.terminal:
            ended = request.snapshot()
            waiting += self._waiters.pop(request.id, [])
            sink = self._sinks.pop(request.id, None)
            if sink is not None:
                sink.close()
        for future in waiting:
            if not future.done():
                future.set_result(ended)

    # Decisions -----------------------------------------------------------------------------------

    def _apply(self, decisions: list[Decision]) -> asyncio.Future[None]:
        """Carry out an event's decisions; the future is settled once its changes are durable.

        Status changes of async requests go to the writer, as one group; a dispatch starts once
        that group is committed. Those of synchronous requests are visible at once, and written
        behind when the request ends.
        """
        durable: list[Change] = []
        for decision in decisions:
            if isinstance(decision, StateChange):
                unwritten = self._unwritten.get(decision.request.id)
                if unwritten is None:
                    durable.append(decision)
                else:
                    self._in_memory(decision, unwritten)
        done = self.writer.add(durable)
        for decision in decisions:
            if isinstance(decision, Dispatch):
                after = done if decision.request.id not in self._unwritten else None
                task = asyncio.create_task(self._execute(decision, after))
                self._executions[decision.execution_id] = task
            elif isinstance(decision, CancelExecution):
                self._stop(decision)
        return done

    def _in_memory(self, change: StateChange, unwritten: list[Change]) -> None:
        """A synchronous request's change: visible now, written behind once it ends."""
        request = change.request
        unwritten.append(change)
        self._view[request.id] = request
        if request.status.terminal:
            del self._unwritten[request.id]
            self.writer.add_behind(unwritten)
        if not change.created:
            self._announce(request, change.entry)

    def _committed(self, durable: Sequence[Change], behind: Sequence[Change]) -> None:
        """Changes the writer committed: the durable ones become visible, in order.

        Requests written behind (ended synchronous ones) are now the store's to show.
        """
        view = self._view
        for change in durable:
            if not isinstance(change, StateChange):
                continue
            request = change.request
            creation = self._creations.get(request.id)
            if creation is not None and not creation.done():
                creation.set_result(None)
            if request.status.terminal:
                view.pop(request.id, None)
            else:
                view[request.id] = request
            if not change.created:
                self._announce(request, change.entry)
        for change in behind:
            if isinstance(change, StateChange) and change.request.status.terminal:
                view.pop(change.request.id, None)

    def _refused(self, request_ids: set[str], failure: StoreUnavailable) -> None:
        """Requests whose creation a failed commit held: refused (503), taken back by the core."""
        now = self.clock.now()
        for request_id in request_ids:
            creation = self._creations.get(request_id)
            if creation is not None and not creation.done():
                creation.set_exception(failure)
            self._sinks.pop(request_id, None)
            self._apply(self.router.forget(request_id, now))

    def _refusals(self, refusals: list[Refusal]) -> None:
        """What a shared store refused in a commit (other routers got there first).

        A refused creation is answered with why (the waiter gets 429, 503, or the request that
        took its idempotency key) and taken back by the core. A refused claim's dispatch goes
        back to its queue, after the core learned what the other routers hold.
        """
        now = self.clock.now()
        router = self.router
        for refusal in refusals:
            request_id = refusal.request_id
            live = router.get(request_id)
            if refusal.creation:
                creation = self._creations.get(request_id)
                if creation is not None and not creation.done():
                    user = live.user if live is not None else ""
                    creation.set_exception(self._rejection(refusal, user, now))
                self._sinks.pop(request_id, None)
                self._apply(router.forget(request_id, now))
                if refusal.charges:  # the user's hour, spent: admission refuses it here too
                    self._apply(router.shared_view({}, {}, now, charges=refusal.charges))
                continue
            execution_id = router.execution_of(request_id)
            if live is None or execution_id is None or not self._running:
                # Stopping: the dispatch stays stored without its reservation; whoever recovers
                # the request retries it (queued again here, it would be placed again, and the
                # last commits would never end).
                continue
            active = {} if refusal.active is None else {live.user: refusal.active}
            held = None
            if refusal.held is not None:  # how long theirs waits comes with the next view
                held = {**router.held_elsewhere, **dict.fromkeys(refusal.held, -math.inf)}
            charges = refusal.charges or ()
            self._apply(router.shared_view(refusal.ledger or {}, active, now, held, charges))
            self._apply(router.claim_refused(execution_id, refusal.message, now))
        self._wake.set()

    def _rejection(self, refusal: Refusal, user: str, now: float) -> Exception:
        """The error a refused creation's caller (``user``) gets."""
        if refusal.kind == "idempotency_key" and refusal.existing is not None:
            return _KeyTaken(refusal.existing)
        retry_after = refusal.retry_after_s or self.router.queue_retry_after(now)
        error: RequestRejected
        if refusal.kind == "max_queued_total":
            error = QueueFull(refusal.waiting or 0, refusal.limit or 0, retry_after)
        else:
            error = QuotaExceeded(refusal.kind, refusal.message, retry_after)
        self.metrics.request_rejected(error.reason, user)
        return error

    def _announce(self, request: Request, change: Transition) -> None:
        for listener in self.listeners:
            listener(request, change)

    def _stop(self, decision: CancelExecution) -> None:
        task = self._executions.pop(decision.execution_id, None)
        if task is not None:
            task.cancel()
        client = self._clients.get(decision.backend)
        if client is None:
            # A worker that registers itself is not known until it does (after a restart).
            pending = self._pending_cancels.setdefault(decision.backend, [])
            if len(pending) < _PENDING_CANCELS:
                pending.append(decision.execution_id)
            return
        self._notify_cancel(client, decision.execution_id)

    def _notify_cancel(self, client: BackendClient, execution_id: str) -> None:
        notice = asyncio.create_task(self._tell_cancel(client, execution_id))
        self._background.add(notice)
        notice.add_done_callback(self._background.discard)

    async def _tell_cancel(self, client: BackendClient, execution_id: str) -> None:
        try:
            async with asyncio.timeout(_CANCEL_TIMEOUT_S):
                await client.cancel(execution_id)
        except Exception as exc:  # a backend that cannot be told is retried by nobody: log it
            _log.warning("cancel_not_delivered", execution_id=execution_id, error=repr(exc))

    async def _execute(self, dispatch: Dispatch, after: asyncio.Future[None] | None) -> None:
        """Run one execution on its backend and feed its outcome, as :func:`received`, back.

        With ``after`` (the commit of the change that dispatched it), it starts once that
        change is durable, and not at all if the core has since taken the request back.
        """
        execution_id = dispatch.execution_id
        if after is not None:
            await asyncio.shield(after)
            # Taken back meanwhile, or superseded: a dispatch a shared store refused goes back
            # to the queue with its attempt not counted, so its next one has the same id.
            mine = self._executions.get(execution_id) is asyncio.current_task()
            if not mine or self.router.execution_of(dispatch.request.id) != execution_id:
                if mine:
                    del self._executions[execution_id]
                return
        client = self._clients.get(dispatch.backend)
        sink = self._sinks.get(dispatch.request.id)

        def started() -> None:
            self._apply(self.router.started(execution_id, self.clock.now()))

        outcome = await self._outcome(
            execution_id,
            None if client is None else lambda: client.execute(dispatch, started, sink),
            f"no client for backend {dispatch.backend!r}",
        )
        partly_sent = sink is not None and sink.sent
        if isinstance(outcome, Failure) and partly_sent and outcome.kind.retryable:
            # Part of the answer already reached the client: another attempt would repeat it.
            outcome = Failure(FailureKind.STREAM_BROKEN, outcome.message)
        await self._report(execution_id, outcome)

    async def _look_up(self, in_flight: Sequence[InFlight]) -> dict[str, Lookup]:
        """What the workers say of executions in flight, by execution id, asked all at once.

        Only ``agent`` backends can be asked: an in-process simulated fleet died with the
        previous process, and an OpenAI-compatible server has no execution ids. A worker that
        does not answer within ``_LOOKUP_TIMEOUT_S`` is left out (its work is retried). An
        outcome taken this way enters as :func:`received`, like any other.
        """

        async def ask(execution_id: str, client: AgentClient) -> tuple[str, Lookup | None]:
            try:
                async with asyncio.timeout(_LOOKUP_TIMEOUT_S):
                    return execution_id, await client.lookup(execution_id)
            except Exception as exc:  # any failure to ask counts as no answer
                _log.warning("execution_lookup_failed", execution_id=execution_id, error=repr(exc))
                return execution_id, None

        asks = []
        for execution in in_flight:
            client = self._clients.get(execution.backend)
            if isinstance(client, AgentClient):
                asks.append(ask(execution.execution_id, client))
        answers = await asyncio.gather(*asks)
        return {
            execution_id: received(answer)
            if isinstance(answer, ExecutionResult | Failure)
            else answer
            for execution_id, answer in answers
            if answer is not None
        }

    async def _attach(self, dispatch: Dispatch) -> None:
        """Wait for the outcome of a re-attached execution and feed it back, as for dispatches."""
        execution_id = dispatch.execution_id
        client = self._clients.get(dispatch.backend)
        attach = client.attach if isinstance(client, AgentClient) else None
        outcome = await self._outcome(
            execution_id,
            None if attach is None else lambda: attach(dispatch),
            f"no worker client for backend {dispatch.backend!r}",
        )
        await self._report(execution_id, outcome)

    async def _outcome(
        self,
        execution_id: str,
        call: Callable[[], Awaitable[ExecutionResult | Failure]] | None,
        missing: str,
    ) -> ExecutionResult | Failure:
        """What became of an execution, as :func:`received`: the backend's answer to ``call``.

        No call (no client for its backend) is ``unreachable``; a client that raises fails the
        attempt (a client bug must not take the router down).
        """
        outcome: ExecutionResult | Failure
        try:
            if call is None:
                outcome = Failure(FailureKind.UNREACHABLE, missing)
            else:
                outcome = await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _log.exception("backend_client_error", execution_id=execution_id)
            outcome = Failure(FailureKind.BACKEND_ERROR, f"backend client error: {exc!r}")
        finally:
            self._executions.pop(execution_id, None)
        return received(outcome)

    async def _report(self, execution_id: str, outcome: ExecutionResult | Failure) -> None:
        """Feed an execution's outcome to the router (the writer persists what it changes)."""
        now = self.clock.now()
        if isinstance(outcome, Failure):
            decisions = self.router.failed(execution_id, outcome, now)
        else:
            decisions = self.router.finished(execution_id, outcome, now)
        self._apply(decisions)
        self._wake.set()

    # Loops ---------------------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            wakeup = self.router.next_wakeup()
            delay = None if wakeup is None else max(0.0, wakeup - self.clock.now())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
            # arrives as the event is set, and the loop would then outlive its runtime.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            if wakeup is not None and self.clock.now() >= wakeup:
                await self._guarded(self.router.tick)

    async def _poll_loop(self, source: GpuSource) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await self._poll_once(source)

    async def _poll_once(self, source: GpuSource) -> list[Any] | str | None:
        """Read one source and take the readings in.

        Returns what an agent worker sent (its items), or why reading the source failed: what a
        router of a shared store publishes (:meth:`_take_turns`).
        """
        # What changes while the reading is on its way, the reading does not show.
        mark = self.router.monitor.mark()
        items: list[Any] | None = None
        try:
            async with asyncio.timeout(self._poll_s * 2):
                if isinstance(source, AgentSource):
                    items = await source.read_items()
                    readings = source.parse(items)
                else:
                    readings = await source.read()
        except Exception as exc:  # any failure to read counts as the worker not answering
            _log.warning("gpu_source_failed", worker=source.worker, error=repr(exc))
            self.router.source_failed(source.worker, self.clock.now())
            return repr(exc)
        await self._guarded(
            lambda now: self.router.readings(readings, now, worker=source.worker, mark=mark)
        )
        self._wake.set()
        return items

    async def _turns_loop(self, peers: SharedStore) -> None:
        """Read the agent workers in turns with the other routers sharing the store."""
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self._take_turns(peers)
            except Exception:  # a bug must not stop the loop
                _log.exception("gpu_turns_failed")
                await asyncio.sleep(_EVENT_RETRY_S)

    async def _take_turns(self, peers: SharedStore) -> None:
        """One round: read the workers whose turn this router takes, take in the others' readings.

        Each worker is read by one router per poll interval, which publishes what it read (or
        its failure) for the others (``SharedStore.poll_turns``). While the store cannot be
        reached, this router reads every worker itself.

        A shared reading that lists the executions it saw is taken in as this router's own
        would be (the list, not the time, says what it shows). One that does not (a worker
        without that field) is taken in with this router's mark of no later than its stamp, and
        with all its used memory counted as used by others: its netting of the executions'
        memory against their reservations was right for the publisher's mark, not this one's,
        so it is dropped (conservative, as for plain NVML).
        """
        agents = dict(self._agents)
        if not agents:
            return
        sent = self.clock.now()
        self._marks.append((sent, self.router.monitor.mark()))
        while self._marks[0][0] < sent - self._stale_s - self._poll_s:
            self._marks.popleft()
        stamps = {name: self._stamps.get(name, 0) for name in agents}
        try:
            turns = await asyncio.to_thread(peers.poll_turns, stamps, self._poll_s)
        except StoreUnavailable:
            await asyncio.gather(*(self._poll_once(source) for source in agents.values()))
            return
        for shared in turns.readings:
            source = agents.get(shared.worker)
            if source is not None and shared.age_s < self._stale_s:
                self._stamps[shared.worker] = shared.stamp
                await self._take_shared(source, shared, self._mark_at(sent - shared.age_s))
        mine = [name for name in turns.mine if name in agents]
        reports = await asyncio.gather(*(self._poll_once(agents[name]) for name in mine))
        published = {}
        for name, report in zip(mine, reports, strict=True):
            self._stamps[name] = turns.stamp
            if report is not None:
                published[name] = report
        with contextlib.suppress(StoreUnavailable):  # the others read the worker when it lapses
            await asyncio.to_thread(peers.publish_readings, turns.stamp, published, self._stale_s)
        self._wake.set()

    async def _take_shared(self, source: AgentSource, shared: SharedReading, mark: int) -> None:
        """Take in another router's reading of a worker (see :meth:`_take_turns`)."""
        now = self.clock.now()
        try:
            if shared.items is None:
                raise ValueError(shared.error)
            readings = source.parse(shared.items)
        except ValueError as exc:
            _log.warning("gpu_source_failed", worker=source.worker, error=str(exc), shared=True)
            self.router.source_failed(source.worker, now)
            return
        shown: int | None = None  # what the readings' execution lists say they show
        if any(reading.running is None for reading in readings):
            readings = [replace(reading, memory_reserved_mb=0) for reading in readings]
            shown = mark
        await self._guarded(
            lambda now: self.router.readings(readings, now, worker=source.worker, mark=shown)
        )

    def _mark_at(self, when: float) -> int:
        """This router's monitor mark as it was at ``when`` or a little before (0: earlier)."""
        for at, mark in reversed(self._marks):
            if at <= when:
                return mark
        return 0

    async def _shared_loop(self, peers: SharedStore) -> None:
        """Keep up with the routers sharing the store (see the module docstring)."""
        overrides_read = self.clock.now()
        while True:
            await asyncio.sleep(SHARED_SYNC_S)
            try:
                await self._share(peers)
                if self.clock.now() - overrides_read >= WRITE_PROBE_INTERVAL_S:
                    overrides = await asyncio.to_thread(self.store.quota_overrides)
                    self.router.quotas.replace_overrides(overrides)
                    overrides_read = self.clock.now()
            except StoreUnavailable as exc:  # the writer reports the outage; try again
                _log.debug("shared_view_failed", error=exc.message)
            except Exception:  # a bug must not stop the loop
                _log.exception("shared_view_failed")
                await asyncio.sleep(_EVENT_RETRY_S)

    async def _share(self, peers: SharedStore) -> None:
        """One round: what the others hold, the cancellations passed here, lapsed routers."""
        router = self.router
        gpu_ids, users = list(router.monitor.gpus), router.shared_users()
        holds = router.holds_to_share()
        charged = sorted(router.waiting_for_gpu_seconds)
        heard, self._heard = self._heard, {}
        heads = router.heads_to_share()
        try:
            view = await asyncio.to_thread(
                peers.shared_view, gpu_ids, users, holds, charged, heard, heads
            )
        except StoreUnavailable:  # published with the next round that reaches Redis
            self._heard = {**heard, **self._heard}
            raise
        for name, url in (view.workers or {}).items():  # registered with another router
            try:
                self._add_worker(name, url)
            except InvalidRequest as exc:
                _log.warning("shared_worker_refused", worker=name, url=url, error=exc.message)
        now = self.clock.now()
        self._apply(
            router.shared_view(view.ledger, view.active, now, view.held, view.charges, view.heads)
        )
        for request_id, actor in view.cancels:
            if router.get(request_id) is not None:
                self._apply(router.cancel(request_id, now, actor))
        for lapsed in view.lapsed:
            adopted = await asyncio.to_thread(peers.adopt, lapsed)
            if adopted:
                await self._take_over(adopted)
        self._rounds += 1
        if self._rounds % _RECONCILE_ROUNDS == 0:
            await self._reconcile(peers)
        self._wake.set()

    async def _reconcile(self, peers: SharedStore) -> None:
        """Take over what the store says this router owns but it does not drive.

        An adoption whose answer was lost (or whose requests could not be read just after)
        leaves them so: nobody would run them. What this router drives, or holds changes of
        that wait for their commit, is noted *before* the store is read: a request that ends
        meanwhile was among them (its end not yet committed) or is gone from the store's list.
        """
        known = set(self.router.live) | set(self._view) | set(self._creations)
        missing = [r for r in await asyncio.to_thread(peers.owned) if r.id not in known]
        if missing:
            _log.warning("owned_requests_taken_over", count=len(missing))
            await self._take_over(missing)

    async def _take_over(self, adopted: list[Request]) -> None:
        """Recover the requests adopted from a router that died, as after a restart."""
        self._view.update((request.id, request) for request in adopted)
        lookups = await self._look_up(self.router.in_flight(adopted))
        recovery = self.router.recover(self.clock.now(), adopted, lookups)
        self._apply(recovery.decisions)
        for dispatch in recovery.reattached:
            self._executions[dispatch.execution_id] = asyncio.create_task(self._attach(dispatch))

    async def _guarded(self, event: Callable[[float], list[Decision]]) -> None:
        """Feed a background event to the router; a failure is logged, never ends a loop."""
        try:
            self._apply(event(self.clock.now()))
        except Exception:  # a bug must not silently stop the timer or the polling
            _log.exception("router_event_failed")
            await asyncio.sleep(_EVENT_RETRY_S)


def _reported_ids(monitor: GPUStateMonitor) -> Callable[[str], str]:
    """For an agent client: the id its worker reported for a GPU the router knows by ``gpu_id``.

    That is the id of the GPU's latest reading (a worker renamed on restart is followed at its
    next report); a GPU without one keeps the router's id.
    """

    def reported_id(gpu_id: str) -> str:
        state = monitor.gpus.get(gpu_id)
        reported = state.reading.reported_id if state is not None else None
        return reported or gpu_id

    return reported_id


def _openai_source(
    backend: BackendSettings,
    client: OpenAIClient,
    estimator: ResourceEstimator,
    settings: Settings,
) -> OpenAIBackendSource:
    """The GPU source of an ``openai`` backend (its served models' weights stay resident)."""
    assert backend.gpu is not None
    kind = gpu_type(backend.gpu.type, backend.gpu.memory_mb)
    weights_mb = sum(
        -(-estimator.profile(model).weights_bytes // 2**20)
        for model in backend.models
        if model in settings.models
    )
    dcgm = (
        DcgmSource(backend.dcgm_url, backend.name, gpu_type=kind.name, backend=backend.name)
        if backend.dcgm_url
        else None
    )
    metrics_url = backend.metrics_url

    async def load() -> float | None:
        return await client.load(metrics_url) if metrics_url else None

    return OpenAIBackendSource(
        backend.name,
        kind.name,
        kind.memory_mb,
        slots=backend.slots_per_gpu,
        models=backend.models,
        weights_mb=weights_mb,
        dcgm=dcgm,
        dcgm_gpu=backend.dcgm_gpu,
        load=load if metrics_url else None,
    )

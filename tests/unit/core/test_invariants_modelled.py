"""Stateful property tests: the real core driven by random events, SPEC §2 checked after each.

Two machines drive the core. ``RouterMachine`` covers every kind of event (submits, starts,
completions, failures, cancels, GPU loss, cordons, time, router restarts, and another execution
taking the room on a GPU between the core's choice and its reservation). ``QueueMachine`` keeps
capacity scarce (few GPUs and slots, large requests, bursts, GPU-seconds quotas) so that the
queue's order decides who runs.
Both check the core against the test's own model (``fleet_model.py``), built from the decisions
alone, persist the status changes the core hands out to a store of their own (as the runtime
does), and both end every run with a drain: all work finishes or expires, and then every request
must have reached one terminal state and every reservation must be gone.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from typing import Any

from fleet_model import GPU, FleetModel, Submitted
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpu_request_router.config import load_settings
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
    NotKnown,
    StateChange,
    StillRunning,
)
from gpu_request_router.core.quota import HOUR_S, MINUTE_S
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.exceptions import NotFound, RequestRejected
from gpu_request_router.models.gpu_state import GPUReading
from gpu_request_router.models.gpu_types import gpu_type
from gpu_request_router.models.request import Request, RequestStatus, ResourceHints, Shape, Task
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.testing import reading

MARGIN_MB = 1024
CLASSES = ["critical", "high", "normal", "low", "batch"]
SIZES = {  # name -> (model, shape)
    "tiny": ("all-minilm-l6-v2", Shape(1, 64, 0)),
    "chat": ("llama-3-8b", Shape(1, 500, 200)),
    "long": ("llama-3-8b", Shape(8, 6000, 1000)),
    "huge": ("llama-3-8b", Shape(32, 6000, 2000)),
    "qwen": ("qwen2.5-7b", Shape(4, 4000, 1000)),
}
# More rounds than a run can need to finish and expire everything it left, or to see every
# wakeup of one advance; more would mean the core never settles.
DRAIN_ROUNDS = 1000


def _settings(
    fleet: dict[str, tuple[str, ...]],
    slots: int,
    quota: dict[str, Any],
    queue_bound: int,
    **sections: dict[str, Any],
) -> Settings:
    return load_settings(
        overrides={
            "auth": {"enabled": False},
            "state": {"backend": "memory"},
            "quotas": {
                "default": {"max_priority": "critical", "max_gpu_memory_mb": None, **quota},
                "max_queued_total": queue_bound,
            },
            "backends": [
                {
                    "name": worker,
                    "kind": "simulated",
                    "gpus": [{"type": kind, "count": 1} for kind in kinds],
                    "slots_per_gpu": slots,
                }
                for worker, kinds in fleet.items()
            ],
            **sections,
        }
    )


def _submission(
    size: str, priority: str, gpu_count: int, gpu_type: str | None, timeout: float | None
) -> Submission:
    model, shape = SIZES[size]
    return Submission(
        model=model,
        task=Task.EMBEDDING if model == "all-minilm-l6-v2" else Task.CHAT,
        shape=shape,
        priority=priority,
        resources=ResourceHints(gpu_count=gpu_count, gpu_type=gpu_type),
        timeout_s=timeout,
    )


class DrivenCore(RuleBasedStateMachine):
    """The real core and the test's model of it, fed the same events; what both machines share.

    The model (``self.model``) learns only from what the test did and what the core decided:
    every check compares the core with it. ``self.store`` holds what the core's status changes
    persisted.
    """

    def __init__(self, settings: Settings, fleet: dict[str, tuple[str, ...]], slots: int) -> None:
        """The core built from ``settings``, whose backends are ``fleet`` with ``slots`` each."""
        super().__init__()
        self.fleet = fleet
        self.slots = slots
        self.engine = Engine.build(settings, seed=0)
        self.router = self.engine.router
        self.store = MemoryStore()
        self.now = 1000.0
        quota = settings.quotas.default
        self.model = FleetModel(
            (
                GPU(f"{worker}:{index}", worker, kind, gpu_type(kind).memory_mb, self.slots)
                for worker, kinds in self.fleet.items()
                for index, kind in enumerate(kinds)
            ),
            classes=list(settings.priorities.classes),
            aging_s=settings.priorities.aging_seconds,
            margin_mb=MARGIN_MB,
            max_concurrent=quota.max_concurrent,
            gpu_seconds_per_hour=quota.gpu_seconds_per_hour,
        )
        self.default_timeout_s = settings.server.default_timeout_s
        self.terminal_transitions: Counter[str] = Counter()
        for worker in self.fleet:
            self._report(worker)

    # The world ---------------------------------------------------------------------------------

    def _report(self, worker: str) -> None:
        """A complete report of ``worker``: its GPUs but the lost ones, used = reserved."""
        readings: list[GPUReading] = []
        for index, kind in enumerate(self.fleet[worker]):
            gpu_id = f"{worker}:{index}"
            if gpu_id in self.model.lost:
                continue
            held = self.model.reserved_on(gpu_id)
            readings.append(
                reading(worker, index, kind, used_mb=held, reserved_mb=held, slots=self.slots)
            )
        self._carry_out(self.router.readings(readings, self.now, worker=worker))

    def _carry_out(self, decisions: list[Decision], *, check_order: bool = True) -> None:
        """Persist the status changes, then carry out the rest as a fleet would, checked.

        Cancellations come first: the core frees what they held before its dispatch pass.
        """
        self._persist(decisions)
        for decision in decisions:
            if isinstance(decision, CancelExecution):
                self.model.end(decision.execution_id, self.now)
        for decision in decisions:
            if not isinstance(decision, Dispatch):
                continue
            assert decision.execution_id not in self.model.live, "I3: dispatched twice"
            assert not self.model.lost.intersection(decision.placement.gpu_ids)
            charge = decision.request.estimate.typical_duration_s * len(decision.placement.gpu_ids)
            assert self.model.within_gpu_seconds(decision.request.user, charge, self.now), (
                f"I4: {decision.request.id} takes {decision.request.user} over the hour's "
                "GPU-seconds"
            )
            if check_order:
                self._check_order(decision)
            self.model.dispatch(decision, self.now)

    def _persist(self, decisions: list[Decision]) -> None:
        """Write the status changes, checked: they lead, and follow what the store holds.

        Each is a creation of a request not stored, or a change from the stored status (the
        guarded write the store no longer makes), never out of a terminal one. Every dispatch
        comes with the change that claimed its request: to dispatching, with its placement and
        attempt, so the store holds each placement the fleet runs (I2 against the store).
        """
        changes = [d for d in decisions if isinstance(d, StateChange)]
        assert decisions[: len(changes)] == changes, "status changes come before what they allow"
        written: dict[str, Request] = {}
        for change in changes:
            request = change.request
            before = written.get(request.id) or self.store.get_request(request.id)
            if change.created:
                assert before is None, f"{request.id} created twice"
            else:
                assert before is not None, f"{request.id} changed before it was created"
                assert change.entry.from_status is before.status, change.entry
                assert not before.status.terminal, f"I1: {request.id} left a terminal status"
            assert change.entry.to_status is request.status
            written[request.id] = request
            if request.status.terminal:
                self.terminal_transitions[request.id] += 1
        for dispatch in decisions:
            if isinstance(dispatch, Dispatch):
                claimed = written.get(dispatch.request.id)
                assert claimed is not None, f"{dispatch.execution_id} dispatched unclaimed"
                assert claimed.status is RequestStatus.DISPATCHING
                assert claimed.placement == dispatch.placement
                assert claimed.execution_id == dispatch.execution_id
        self.store.write(changes)

    def _stored_holders(self, gpu_id: str) -> set[str]:
        """The executions the store shows in flight on a GPU."""
        return {
            request.execution_id
            for request in self.store.unfinished_requests()
            if request.status.active
            and request.placement is not None
            and gpu_id in request.placement.gpu_ids
        }

    def _could_take(self, waiting: Submitted, dispatch: Dispatch) -> bool:
        """Whether ``waiting`` could have been placed where the core placed ``dispatch``."""
        raise NotImplementedError

    def _check_order(self, dispatch: Dispatch) -> None:
        """I6: no waiting request that must go first could have started instead."""
        placed = self.model.requests[dispatch.request.id]
        for waiting in self.model.waiting(self.now):
            if waiting.id == placed.id or not self.model.goes_before(waiting, placed, self.now):
                continue
            if not self.model.may_start(waiting, self.now):
                continue
            event("I6: a request that goes first had its quota free at a dispatch")
            assert not self._could_take(waiting, dispatch), (
                f"I6: {placed.id} (level {self.model.level(placed, self.now)}, arrival "
                f"{placed.arrival}) was dispatched while {waiting.id} (level "
                f"{self.model.level(waiting, self.now)}, arrival {waiting.arrival}) could "
                "have started"
            )

    def _submit(
        self, user: str, submission: Submission, *, check_order: bool = True
    ) -> Submitted | None:
        """Submit as ``user`` at the current time; the model learns of it if it is accepted."""
        try:
            admission = self.engine.receiver.submit(submission, Caller(user), self.now)
        except RequestRejected:
            return None
        assert admission.created
        priority = submission.priority or self.engine.settings.priorities.default
        timeout = submission.timeout_s
        timeout_s = timeout if timeout is not None else self.default_timeout_s
        accepted = self.model.accept(admission.request, user, priority, timeout_s, self.now)
        self._carry_out(admission.decisions, check_order=check_order)
        return accepted

    def _finish(self, execution_id: str, reported: float | None = None) -> None:
        """The backend reports success, with the GPU-seconds it measured where it did."""
        dispatch = self.model.live[execution_id].dispatch
        self.model.end(execution_id, self.now, reported)
        result = ExecutionResult(
            output={"ok": True},
            gpu_seconds=reported,
            peak_memory_mb=max(dispatch.reservations.values()),
        )
        self._carry_out(self.router.finished(execution_id, result, self.now))

    def _cancel(self, request_id: str) -> None:
        """Cancel as its user; refused only once the request has ended."""
        try:
            decisions = self.router.cancel(request_id, self.now)
        except NotFound:
            assert self.terminal_transitions[request_id] == 1, f"{request_id} was not ended"
            return
        self.model.requests[request_id].cancelled = True
        self._carry_out(decisions)
        stored = self.store.get_request(request_id)
        assert stored is not None and stored.status.value == "cancelled"

    # Rules both machines have ------------------------------------------------------------------

    @precondition(lambda self: self.model.live)
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        execution_id = data.draw(st.sampled_from(sorted(self.model.live)))
        self.model.started(execution_id, self.now)
        self._carry_out(self.router.started(execution_id, self.now))

    @precondition(lambda self: self.model.requests)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self._cancel(data.draw(st.sampled_from(sorted(self.model.requests))))

    @rule(data=st.data(), on=st.booleans())
    def cordon(self, data: st.DataObject, on: bool) -> None:
        gpu_id = data.draw(st.sampled_from(sorted(self.model.gpus)))
        if gpu_id not in self.router.monitor.gpus:
            # Lost before a restart: the new router never heard of it, and refuses.
            assert gpu_id in self.model.lost, f"{gpu_id} is unknown to the router"
            try:
                self.router.cordon(gpu_id, self.now)
            except NotFound:
                return
            raise AssertionError(f"{gpu_id}, never reported, was cordoned")
        if on:
            self.model.cordoned.add(gpu_id)
            self._carry_out(self.router.cordon(gpu_id, self.now))
        else:
            self.model.cordoned.discard(gpu_id)
            self._carry_out(self.router.uncordon(gpu_id, self.now))

    # Invariants --------------------------------------------------------------------------------

    @invariant()
    def one_terminal_state_each(self) -> None:
        """I1: every accepted request is stored, and terminal exactly once when it has ended."""
        for request_id in self.model.requests:
            stored = self.store.get_request(request_id)
            assert stored is not None, f"{request_id} was lost"
            expected = 1 if stored.status.terminal else 0
            assert self.terminal_transitions[request_id] == expected
            live = self.router.get(request_id)
            assert (live is None) == stored.status.terminal
            if live is not None:
                assert live.status is stored.status and live.attempts == stored.attempts
        for waiting in self.model.waiting(self.now):
            stored = self.store.get_request(waiting.id)
            assert stored is not None and stored.status.value == "queued", f"{waiting.id} ended"

    @invariant()
    def reservations_are_the_placements(self) -> None:
        """I2: each GPU's reservations are exactly those of the live executions placed there.

        The monitor holds their memory, and the store shows those executions in flight there.
        """
        for gpu_id, gpu in self.router.monitor.gpus.items():
            holders = self.model.holders_on(gpu_id)
            placed = self.model.reserved_on(gpu_id)
            assert set(gpu.running) == holders, f"{gpu_id} holds {sorted(gpu.running)}"
            assert gpu.reserved_mb == placed, f"{gpu_id}: {gpu.reserved_mb} MiB, placed {placed}"
            assert sum(gpu.running.values()) == placed
            assert self._stored_holders(gpu_id) == holders, f"{gpu_id}: the store disagrees"
            total = self.model.gpus[gpu_id].memory_mb
            assert placed <= total - MARGIN_MB, f"{gpu_id} over-committed"
            assert len(holders) <= self.slots

    @invariant()
    def never_running_twice(self) -> None:
        """I3: one live execution per request, and it is the one the router tracks."""
        per_request = Counter(live.dispatch.request.id for live in self.model.live.values())
        for request_id, count in per_request.items():
            assert count == 1, f"{request_id} runs {count} times"
        for execution_id, live in self.model.live.items():
            assert self.router.execution_of(live.dispatch.request.id) == execution_id

    # The drain ---------------------------------------------------------------------------------

    def teardown(self) -> None:
        """I1 and I2 at the end: finish all work, let the rest expire, then check everything.

        Finishing work lets queued requests start, which are finished in turn; then the clock
        moves past every deadline, with fresh readings, and what still waits expires. Skipped
        when the run failed already, so that its failure is the one reported.
        """
        if sys.exc_info()[0] is not None:
            return
        end = max((r.deadline for r in self.model.requests.values()), default=self.now)
        for _ in range(DRAIN_ROUNDS):
            if self.model.live:
                for execution_id in sorted(self.model.live):
                    if execution_id in self.model.live:
                        self._finish(execution_id)
            elif self.now > end:
                break
            else:
                self.now = end + 1.0
                for worker in self.fleet:
                    self._report(worker)
                self._carry_out(self.router.tick(self.now))
        else:
            raise AssertionError(f"the core did not settle within {DRAIN_ROUNDS} rounds")
        for request_id in self.model.requests:
            assert self.terminal_transitions[request_id] == 1, f"I1: {request_id} at the end"
            trail = self.store.transitions(request_id)
            ends = [entry for entry in trail if entry.to_status.terminal]
            assert len(ends) == 1 and ends[0] is trail[-1], f"I1: {request_id}'s audit trail"
        assert not self.router.live and self.router.queued_total() == 0
        for gpu_id, gpu in self.router.monitor.gpus.items():
            assert not gpu.running and gpu.reserved_mb == 0, f"I2: {gpu_id} holds memory at rest"
        assert self.store.unfinished_requests() == [], "the store shows work at rest"


# The machine with every kind of event -------------------------------------------------------------

AGING_S = 10.0
USERS = ("ann", "ben", "cat")
QUOTA = {"max_concurrent": 3, "max_queued": 6, "requests_per_minute": 10}
QUEUE_BOUND = 8  # below the users' max_queued together (18), so that it refuses too
FLEET: dict[str, tuple[str, ...]] = {  # worker -> GPU types by index
    "a": ("H100-80GB", "H100-80GB"),
    "b": ("L4-24GB", "H100-80GB"),
}
GPU_IDS = ["a:0", "a:1", "b:0", "b:1"]
ROUTER_SLOTS = 3
ROUTER_SETTINGS = _settings(  # built once: the sections are frozen
    FLEET,
    ROUTER_SLOTS,
    {**QUOTA, "gpu_seconds_per_hour": None},
    QUEUE_BOUND,
    priorities={"aging_seconds": AGING_S},
    placement={"memory_safety_margin_mb": MARGIN_MB, "starvation_bound_s": 2, "backfill_depth": 8},
    retries={
        "max_attempts": 3,
        "backoff_s": 0.5,
        "circuit_breaker": {"failure_threshold": 3, "reset_s": 5},
    },
    monitor={"stale_after_s": 10},
)


class RouterMachine(DrivenCore):
    """Random submits, starts, completions, failures, cancels, GPU loss, cordons and time."""

    def __init__(self) -> None:
        """The core over ``FLEET``, and what the rules below keep apart from the model."""
        self.admissions: dict[str, list[float]] = defaultdict(list)
        # GPUs whose room an out-of-memory failure cut until their worker's next report.
        self.cut: set[str] = set()
        self.held_before: dict[str, tuple[str, ...]] = {}
        self.restarts = 0
        super().__init__(ROUTER_SETTINGS, FLEET, ROUTER_SLOTS)

    def _report(self, worker: str) -> None:
        super()._report(worker)
        self.cut.difference_update(f"{worker}:{index}" for index in range(len(FLEET[worker])))

    def _carry_out(self, decisions: list[Decision], *, check_order: bool = True) -> None:
        super()._carry_out(decisions, check_order=check_order)
        self.held_before = dict(self.router.holds)  # as the next event will find them

    def _could_take(self, waiting: Submitted, dispatch: Dispatch) -> bool:
        """On the dispatch's own GPUs, unless held against it (other GPUs may be held unseen).

        A GPU held for a starving request takes nothing of that request's level or below
        (docs/architecture.md); which GPUs are held is the core's choice, so every hold before
        or after the event counts. Where an out-of-memory failure cut a GPU's room, the core's
        room is not known: there only what the dispatch itself took is sure to be room.
        """
        level = self.model.level(waiting, self.now)
        held = {
            gpu_id
            for holds in (self.held_before, self.router.holds)
            for holder, gpu_ids in holds.items()
            if holder != waiting.id
            and self.model.level(self.model.requests[holder], self.now) <= level
            for gpu_id in gpu_ids
        }
        gpu_ids = [
            gpu_id
            for gpu_id in dispatch.placement.gpu_ids
            if gpu_id not in held
            and (gpu_id not in self.cut or waiting.memory_mb <= dispatch.reservations[gpu_id])
        ]
        return self.model.fits_on(waiting, gpu_ids)

    # Rules ---------------------------------------------------------------------------------------

    @rule(
        user=st.sampled_from(USERS),
        size=st.sampled_from(sorted(SIZES)),
        priority=st.sampled_from(CLASSES),
        gpu_count=st.sampled_from([1, 1, 1, 2]),
        gpu_type=st.sampled_from([None, None, "L4-24GB"]),
        timeout=st.sampled_from([None, 5.0, 60.0]),
    )
    def submit(
        self,
        user: str,
        size: str,
        priority: str,
        gpu_count: int,
        gpu_type: str | None,
        timeout: float | None,
    ) -> None:
        queued_before = self.router.queued_count(user)
        waiting_before = self.router.queued_total()
        if self._submit(user, _submission(size, priority, gpu_count, gpu_type, timeout)) is None:
            return
        assert queued_before < QUOTA["max_queued"], "I4: admitted over max_queued"
        assert waiting_before < QUEUE_BOUND, "admitted over max_queued_total"
        self.admissions[user].append(self.now)

    @rule(
        gpu=st.sampled_from(GPU_IDS),
        user=st.sampled_from(USERS),
        size=st.sampled_from(["chat", "long", "qwen"]),
        priority=st.sampled_from(CLASSES),
    )
    def replica_race(self, gpu: str, user: str, size: str, priority: str) -> None:
        """Another execution takes all the room left on a GPU between the choice and the memory.

        A two-GPU request is submitted. When the core first reserves on ``gpu`` in that event,
        the other execution has just taken its room: the core chose the GPU on what it saw, and
        the GPU refuses. What the core reserved on the other GPU of the placement is given back
        (the request stays queued). The other execution then ends.
        """
        monitor = self.router.monitor
        state = monitor.gpus.get(gpu)
        if state is None or monitor.limit_mb(state) - state.reserved_mb <= 0:
            return
        reserve = monitor.reserve
        refused: list[str] = []

        def reserve_after_another(gpu_id: str, holder: str, memory_mb: int) -> bool:
            if gpu_id == gpu and not refused:
                monitor.adopt(gpu, "replica-2", monitor.limit_mb(state) - state.reserved_mb)
                assert not reserve(gpu_id, holder, memory_mb), "the room was all taken"
                refused.append(holder)
                others = [g for g, other in monitor.gpus.items() if holder in other.running]
                event(
                    "replica race: refused on the second GPU, the first given back"
                    if others
                    else "replica race: refused on the first GPU"
                )
                return False
            return reserve(gpu_id, holder, memory_mb)

        monitor.reserve = reserve_after_another  # type: ignore[method-assign]
        try:
            submitted = self._submit(
                user, _submission(size, priority, 2, None, None), check_order=False
            )
        finally:
            del monitor.reserve
            monitor.release("replica-2")
        for holder in refused:
            held = [g for g, other in monitor.gpus.items() if holder in other.running]
            assert held == [], f"{holder} keeps {held} after a GPU refused it"
            assert holder not in self.model.live, f"{holder} was dispatched though refused"
        if submitted is not None:
            self.admissions[user].append(self.now)

    @precondition(lambda self: self.model.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self._finish(data.draw(st.sampled_from(sorted(self.model.live))))

    @precondition(lambda self: self.model.live)
    @rule(
        data=st.data(),
        kind=st.sampled_from(
            [
                FailureKind.BACKEND_ERROR,
                FailureKind.UNREACHABLE,
                FailureKind.OUT_OF_MEMORY,
                FailureKind.CLIENT_ERROR,
            ]
        ),
    )
    def fail(self, data: st.DataObject, kind: FailureKind) -> None:
        execution_id = data.draw(st.sampled_from(sorted(self.model.live)))
        if kind is FailureKind.OUT_OF_MEMORY:
            self.cut.update(self.model.live[execution_id].dispatch.placement.gpu_ids)
        self.model.end(execution_id, self.now)
        self._carry_out(self.router.failed(execution_id, Failure(kind, "injected"), self.now))

    @rule(gpu=st.sampled_from(GPU_IDS))
    def lose_gpu(self, gpu: str) -> None:
        self.model.lost.add(gpu)
        for execution_id, live in list(self.model.live.items()):
            if gpu in live.dispatch.placement.gpu_ids:
                self.model.end(execution_id, self.now)  # the work dies with the GPU
        self._report(gpu.split(":")[0])

    @precondition(lambda self: self.model.lost)
    @rule(data=st.data())
    def restore_gpu(self, data: st.DataObject) -> None:
        gpu = data.draw(st.sampled_from(sorted(self.model.lost)))
        self.model.lost.discard(gpu)
        self._report(gpu.split(":")[0])

    @rule(seconds=st.sampled_from([0.1, 0.5, 2.0, 7.0, 31.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        for worker in FLEET:
            self._report(worker)
        wakeup = self.router.next_wakeup()
        if wakeup is not None and wakeup <= self.now:
            self._carry_out(self.router.tick(self.now))

    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        """The router dies; a new one on the same store asks the world about work in flight.

        The world runs on: each execution it runs is still running, ended (succeeded or failed)
        or silent (its worker does not answer); one it does not run is unknown or silent. The
        new router knows only what the store holds: cordons and holds are gone, quota windows
        are reloaded, and what an out-of-memory failure cut is measured afresh.
        """
        self.restarts += 1  # a new seed: request ids of a new process never repeat old ones
        self.engine = Engine.build(ROUTER_SETTINGS, seed=self.restarts)
        self.router = self.engine.router
        self.router.quotas.load(
            self.store.quota_history(self.now, MINUTE_S, HOUR_S), self.store.quota_overrides()
        )
        self.model.cordoned.clear()
        self.held_before = {}
        for worker in FLEET:
            self._report(worker)
        lookups: dict[str, Lookup] = {}
        for ask in self.router.in_flight(self.store.unfinished_requests()):
            live = self.model.live.get(ask.execution_id)
            choices = ["unknown", "silent"] if live is None else ["running", "ended", "silent"]
            said = data.draw(st.sampled_from(choices))
            if said == "running":
                lookups[ask.execution_id] = StillRunning()
            elif said == "unknown":
                lookups[ask.execution_id] = NotKnown()
            elif said == "ended" and live is not None:
                self.model.end(ask.execution_id, self.now)
                if data.draw(st.booleans()):
                    peak = max(live.dispatch.reservations.values())
                    lookups[ask.execution_id] = ExecutionResult({"ok": True}, peak_memory_mb=peak)
                else:
                    lookups[ask.execution_id] = Failure(FailureKind.BACKEND_ERROR, "while away")
        recovery = self.router.recover(self.now, self.store.unfinished_requests(), lookups)
        self._carry_out(recovery.decisions)
        for dispatch in recovery.reattached:
            assert isinstance(lookups.get(dispatch.execution_id), StillRunning)
            assert dispatch.execution_id in self.model.live, f"{dispatch.execution_id} reattached"
        event(f"restart: {len(recovery.reattached)} re-attached")

    # Invariants ----------------------------------------------------------------------------------

    @invariant()
    def holds_never_overlap(self) -> None:
        """A GPU is held for one starving request at most, and only a request's own holds."""
        held = [gpu_id for gpu_ids in self.router.holds.values() for gpu_id in gpu_ids]
        assert len(held) == len(set(held)), self.router.holds
        for request_id, gpu_ids in self.router.holds.items():
            assert request_id in self.router.live
            assert all(gpu_id in self.router.monitor.gpus for gpu_id in gpu_ids)

    @invariant()
    def quotas_held(self) -> None:
        """I4: concurrency and the per-minute rate never exceed the user's quota."""
        for user in USERS:
            active = self.model.active(user)
            assert active == self.router.active_count(user)
            assert active <= QUOTA["max_concurrent"]
            times = self.admissions[user]
            for index, start in enumerate(times):
                in_window = [t for t in times[index:] if t < start + 60.0]
                assert len(in_window) <= QUOTA["requests_per_minute"]

    @invariant()
    def queue_bounded(self) -> None:
        """Waiting requests are counted exactly; those never dispatched stay within the bound."""
        waiting = [r for r in self.router.live.values() if r.status.value == "queued"]
        assert self.router.queued_total() == len(waiting)
        fresh = sum(1 for request in waiting if request.attempts == 0)
        assert fresh <= QUEUE_BOUND, f"{fresh} waiting for a first dispatch"


# The machine where capacity binds ----------------------------------------------------------------

QUEUE_AGING_S = 8.0
QUEUE_USERS = ("ann", "ben", "cat")
QUEUE_QUOTA = {
    "max_concurrent": 2,
    "max_queued": 8,
    "requests_per_minute": None,
    "gpu_seconds_per_hour": 60.0,
}
QUEUE_FLEET: dict[str, tuple[str, ...]] = {"a": ("H100-80GB", "H100-80GB"), "b": ("L4-24GB",)}
QUEUE_SLOTS = 2
# Steps exact in binary (as every time here is), so that ages and the hour have no rounding.
STEPS = [0.5, 0.5, 2.0, 2.0, 8.0, 64.0, 1800.0, 3600.0]
QUEUE_SETTINGS = _settings(
    QUEUE_FLEET,
    QUEUE_SLOTS,
    QUEUE_QUOTA,
    14,
    server={"default_timeout_s": 7200.0},
    priorities={"aging_seconds": QUEUE_AGING_S},
    # No GPU is ever held for a starving request: the bound is never reached.
    placement={
        "memory_safety_margin_mb": MARGIN_MB,
        "starvation_bound_s": 10**9,
        "backfill_depth": 64,
    },
    monitor={"stale_after_s": 10**7},  # the readings of the start stay fresh
)


class QueueMachine(DrivenCore):
    """Six slots, requests that fill a GPU, bursts and hourly GPU-seconds: the queue decides.

    The starvation bound is never reached here, so no GPU is ever held: whatever waits and
    fits must be placed in order, at once.
    """

    def __init__(self) -> None:
        """The core over ``QUEUE_FLEET``."""
        super().__init__(QUEUE_SETTINGS, QUEUE_FLEET, QUEUE_SLOTS)

    def _could_take(self, waiting: Submitted, dispatch: Dispatch) -> bool:
        """Anywhere: with no holds, a request that goes first and fits is placed first."""
        return self.model.fits_anywhere(waiting)

    # Rules ---------------------------------------------------------------------------------------

    @rule(
        user=st.sampled_from(QUEUE_USERS),
        size=st.sampled_from(["tiny", "chat", "long", "huge", "huge", "qwen"]),
        priority=st.sampled_from(CLASSES),
        gpu_count=st.sampled_from([1, 1, 2]),
        gpu_type=st.sampled_from([None, None, None, "L4-24GB"]),
        timeout=st.sampled_from([None, None, 30.0]),
    )
    def submit(
        self,
        user: str,
        size: str,
        priority: str,
        gpu_count: int,
        gpu_type: str | None,
        timeout: float | None,
    ) -> None:
        self._submit(user, _submission(size, priority, gpu_count, gpu_type, timeout))

    @rule(
        user=st.sampled_from(QUEUE_USERS),
        size=st.sampled_from(["chat", "long", "huge"]),
        priority=st.sampled_from(CLASSES),
        count=st.integers(2, 4),
    )
    def burst(self, user: str, size: str, priority: str, count: int) -> None:
        """Several like requests of one user at the same instant."""
        for _ in range(count):
            self._submit(user, _submission(size, priority, 1, None, None))

    @precondition(lambda self: self.model.live)
    @rule(data=st.data(), share=st.sampled_from([None, 0.5, 1.0, 2.0, 2.0]))
    def finish(self, data: st.DataObject, share: float | None) -> None:
        """Success, with the GPU-seconds measured as a share of the estimate (or not reported)."""
        execution_id = data.draw(st.sampled_from(sorted(self.model.live)))
        charged = self.model.charges[execution_id].gpu_seconds
        self._finish(execution_id, None if share is None else share * charged)

    @rule(seconds=st.sampled_from(STEPS))
    def advance(self, seconds: float) -> None:
        """Time passes; the core is woken exactly when it asked to be (as the runtime does)."""
        target = self.now + seconds
        for _ in range(DRAIN_ROUNDS):
            wakeup = self.router.next_wakeup()
            if wakeup is None or wakeup > target:
                break
            self.now = max(self.now, wakeup)
            self._carry_out(self.router.tick(self.now))
        else:
            raise AssertionError("the core keeps asking to be woken")
        self.now = target

    # Invariants ----------------------------------------------------------------------------------

    @invariant()
    def nothing_waits_that_could_start(self) -> None:
        """I6: no request waits while its quota lets it start and the fleet has room for it."""
        for waiting in self.model.waiting(self.now):
            if self.model.may_start(waiting, self.now) and self.model.fits_anywhere(waiting):
                raise AssertionError(
                    f"I6: {waiting.id} waits at {self.now} with its quota free "
                    f"({self.model.used(waiting.user, self.now):g} GPU-seconds used) and room"
                )


TestRouterInvariants = RouterMachine.TestCase
TestRouterInvariants.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestQueueOrder = QueueMachine.TestCase
TestQueueOrder.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

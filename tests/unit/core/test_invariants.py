"""Stateful property tests: the real core driven by random events, SPEC §2 checked after each."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpu_request_router.config import load_settings
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
from gpu_request_router.core.fit import need_of
from gpu_request_router.core.quota import HOUR_S, MINUTE_S
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.exceptions import NotFound, RequestRejected
from gpu_request_router.models.gpu_state import GPUReading
from gpu_request_router.models.request import Request, RequestStatus, ResourceHints, Shape, Task
from gpu_request_router.store.memory import MemoryStore
from gpu_request_router.testing import reading

AGING_S = 10.0
MARGIN_MB = 1024
USERS = ("ann", "ben", "cat")
QUOTA = {"max_concurrent": 3, "max_queued": 6, "requests_per_minute": 10}
QUEUE_BOUND = 8  # below the users' max_queued together (18), so that it refuses too
FLEET = {  # worker -> GPU types by index
    "a": ("H100-80GB", "H100-80GB"),
    "b": ("L4-24GB", "H100-80GB"),
}
SIZES = {  # name -> (model, shape)
    "tiny": ("all-minilm-l6-v2", Shape(1, 64, 0)),
    "chat": ("llama-3-8b", Shape(1, 500, 200)),
    "long": ("llama-3-8b", Shape(8, 6000, 1000)),
    "huge": ("llama-3-8b", Shape(32, 6000, 2000)),
    "qwen": ("qwen2.5-7b", Shape(4, 4000, 1000)),
}


def _settings() -> Any:
    return load_settings(
        overrides={
            "auth": {"enabled": False},
            "state": {"backend": "memory"},
            "priorities": {"aging_seconds": AGING_S},
            "quotas": {
                "default": {
                    **QUOTA,
                    "gpu_seconds_per_hour": None,
                    "max_priority": "critical",
                    "max_gpu_memory_mb": None,
                },
                "max_queued_total": QUEUE_BOUND,
            },
            "placement": {
                "memory_safety_margin_mb": MARGIN_MB,
                "starvation_bound_s": 2,
                "backfill_depth": 8,
            },
            "retries": {
                "max_attempts": 3,
                "backoff_s": 0.5,
                "circuit_breaker": {"failure_threshold": 3, "reset_s": 5},
            },
            "monitor": {"stale_after_s": 10},
            "backends": [
                {
                    "name": worker,
                    "kind": "simulated",
                    "gpus": [{"type": kind, "count": 1} for kind in kinds],
                    "slots_per_gpu": 3,
                }
                for worker, kinds in FLEET.items()
            ],
        }
    )


class RouterMachine(RuleBasedStateMachine):
    """Random submits, starts, completions, failures, cancels, GPU loss, cordons, time, restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = _settings()
        self.store = MemoryStore()
        self.engine = Engine.build(self.settings, seed=0)
        self.restarts = 0
        self.router = self.engine.router
        self.now = 1000.0
        self.lost: set[str] = set()
        self.live: dict[str, Dispatch] = {}  # executions the world is running
        self.accepted: dict[str, str] = {}  # request id -> user
        self.admissions: dict[str, list[float]] = defaultdict(list)
        self.terminal_transitions: Counter[str] = Counter()
        self._carry_out(self.router.readings(self._readings("a"), self.now, worker="a"))
        self._carry_out(self.router.readings(self._readings("b"), self.now, worker="b"))

    # The world ---------------------------------------------------------------------------------

    def _readings(self, worker: str) -> list[GPUReading]:
        result = []
        for index, kind in enumerate(FLEET[worker]):
            gpu_id = f"{worker}:{index}"
            if gpu_id in self.lost:
                continue
            held = sum(d.reservations.get(gpu_id, 0) for d in self.live.values())
            result.append(reading(worker, index, kind, used_mb=held, reserved_mb=held, slots=3))
        return result

    def _carry_out(self, decisions: list[Decision]) -> None:
        """Persist the status changes, then carry out the rest as a fleet would; check I6.

        The changes come first, and each follows the status its request has in the store (the
        guarded write the store no longer makes): a creation for a request not stored, else a
        change from the stored status and attempt.
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
                assert not before.status.terminal, f"{request.id} left a terminal status"
            assert change.entry.to_status is request.status
            written[request.id] = request
            if request.status.terminal:
                self.terminal_transitions[request.id] += 1
        self.store.write(changes)
        dispatched = [d for d in decisions if isinstance(d, Dispatch)]
        for decision in decisions:
            if isinstance(decision, CancelExecution):
                self.live.pop(decision.execution_id, None)
        for dispatch in dispatched:
            assert all(gpu not in self.lost for gpu in dispatch.placement.gpu_ids)
            self.live[dispatch.execution_id] = dispatch
        for dispatch in dispatched:
            self._check_order(dispatch)

    def _level(self, request: Request) -> int:
        rank = self.engine.settings.priorities.classes.index(request.priority)
        return rank - math.floor((self.now - request.created_at) / AGING_S + 1e-9)

    def _key(self, request: Request) -> float:
        rank = self.engine.settings.priorities.classes.index(request.priority)
        return rank * AGING_S + request.created_at

    def _check_order(self, dispatch: Dispatch) -> None:
        """I6: nothing still queued that ranks higher could have used this dispatch's room."""
        placed = dispatch.request
        if self.router.get(placed.id) is None:
            return  # finished within the same step
        level = self._level(placed)
        gpus = [self.router.monitor.gpus[gpu_id] for gpu_id in dispatch.placement.gpu_ids]
        for queued in self.router.live.values():
            if queued.status is not RequestStatus.QUEUED or queued.id not in self.router.queue:
                continue
            better = self._level(queued) < level or (
                queued.user == placed.user
                and self._level(queued) == level
                and self._key(queued) < self._key(placed)
            )
            if not better:
                continue
            active = self.router.active_count(queued.user) - (queued.user == placed.user)
            if active >= QUOTA["max_concurrent"]:
                continue
            need = need_of(queued)
            fitting = [
                gpu
                for gpu in gpus
                if gpu.schedulable
                and gpu.serves(queued.model)
                and (need.gpu_type is None or gpu.type == need.gpu_type)
                and need.memory_on(gpu) <= gpu.room_mb + dispatch.reservations[gpu.id]
            ]
            assert len(fitting) < need.gpu_count, (
                f"{placed.id} (level {level}) was dispatched while {queued.id} "
                f"(level {self._level(queued)}) could have taken its room"
            )

    # Rules ---------------------------------------------------------------------------------------

    @rule(
        user=st.sampled_from(USERS),
        size=st.sampled_from(sorted(SIZES)),
        priority=st.sampled_from(["critical", "high", "normal", "low", "batch"]),
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
        model, shape = SIZES[size]
        task = Task.EMBEDDING if model == "all-minilm-l6-v2" else Task.CHAT
        submission = Submission(
            model=model,
            task=task,
            shape=shape,
            priority=priority,
            resources=ResourceHints(gpu_count=gpu_count, gpu_type=gpu_type),
            timeout_s=timeout,
        )
        queued_before = self.router.queued_count(user)
        waiting_before = self.router.queued_total()
        try:
            admission = self.engine.receiver.submit(submission, Caller(user), self.now)
        except RequestRejected:
            return
        assert admission.created
        assert queued_before < QUOTA["max_queued"], "I4: admitted over max_queued"
        assert waiting_before < QUEUE_BOUND, "admitted over max_queued_total"
        self.accepted[admission.request.id] = user
        self.admissions[user].append(self.now)
        self._carry_out(admission.decisions)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        execution_id = data.draw(st.sampled_from(sorted(self.live)))
        self._carry_out(self.router.started(execution_id, self.now))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        execution_id = data.draw(st.sampled_from(sorted(self.live)))
        dispatch = self.live.pop(execution_id)
        peak = max(dispatch.reservations.values())
        result = ExecutionResult(output={"ok": True}, peak_memory_mb=peak)
        self._carry_out(self.router.finished(execution_id, result, self.now))

    @precondition(lambda self: self.live)
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
        execution_id = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[execution_id]
        self._carry_out(self.router.failed(execution_id, Failure(kind, "injected"), self.now))

    @precondition(lambda self: self.accepted)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.accepted)))
        try:
            decisions = self.router.cancel(request_id, self.now)
        except NotFound:
            assert self.router.get(request_id) is None
            assert self.store.get_request(request_id).status.terminal
            return
        self._carry_out(decisions)
        assert self.store.get_request(request_id).status is RequestStatus.CANCELLED

    @rule(gpu=st.sampled_from(["a:0", "a:1", "b:0", "b:1"]))
    def lose_gpu(self, gpu: str) -> None:
        self.lost.add(gpu)
        for execution_id, dispatch in list(self.live.items()):
            if gpu in dispatch.placement.gpu_ids:
                del self.live[execution_id]  # the work dies with the GPU
        worker = gpu.split(":")[0]
        self._carry_out(self.router.readings(self._readings(worker), self.now, worker=worker))

    @precondition(lambda self: self.lost)
    @rule(data=st.data())
    def restore_gpu(self, data: st.DataObject) -> None:
        gpu = data.draw(st.sampled_from(sorted(self.lost)))
        self.lost.discard(gpu)
        worker = gpu.split(":")[0]
        self._carry_out(self.router.readings(self._readings(worker), self.now, worker=worker))

    @rule(gpu=st.sampled_from(["a:0", "a:1", "b:0", "b:1"]), on=st.booleans())
    def cordon(self, gpu: str, on: bool) -> None:
        if gpu not in self.router.monitor.gpus:
            return  # lost before a restart: the new router has not seen it
        action = self.router.cordon if on else self.router.uncordon
        self._carry_out(action(gpu, self.now))

    @rule(seconds=st.sampled_from([0.1, 0.5, 2.0, 7.0, 31.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        for worker in FLEET:
            self._carry_out(self.router.readings(self._readings(worker), self.now, worker=worker))
        wakeup = self.router.next_wakeup()
        if wakeup is not None and wakeup <= self.now:
            self._carry_out(self.router.tick(self.now))

    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        """The router dies; a new one on the same store asks the world about work in flight.

        The world runs on: each execution it runs is still running, ended (succeeded or failed)
        or silent (its worker does not answer); one it does not run is unknown or silent.
        """
        self.restarts += 1  # a new seed: request ids of a new process never repeat old ones
        self.engine = Engine.build(self.settings, seed=self.restarts)
        self.router = self.engine.router
        self.router.quotas.load(
            self.store.quota_history(self.now, MINUTE_S, HOUR_S), self.store.quota_overrides()
        )
        for worker in FLEET:
            self._carry_out(self.router.readings(self._readings(worker), self.now, worker=worker))
        lookups: dict[str, Lookup] = {}
        for ask in self.router.in_flight(self.store.unfinished_requests()):
            dispatch = self.live.get(ask.execution_id)
            if dispatch is None:
                said = data.draw(st.sampled_from(["unknown", "silent"]))
            else:
                said = data.draw(st.sampled_from(["running", "succeeded", "failed", "silent"]))
            if said == "running":
                lookups[ask.execution_id] = StillRunning()
            elif said == "unknown":
                lookups[ask.execution_id] = NotKnown()
            elif said == "succeeded" and dispatch is not None:
                del self.live[ask.execution_id]
                peak = max(dispatch.reservations.values())
                lookups[ask.execution_id] = ExecutionResult({"ok": True}, peak_memory_mb=peak)
            elif said == "failed":
                del self.live[ask.execution_id]
                lookups[ask.execution_id] = Failure(FailureKind.BACKEND_ERROR, "while away")
        recovery = self.router.recover(self.now, self.store.unfinished_requests(), lookups)
        self._carry_out(recovery.decisions)
        for dispatch in recovery.reattached:
            assert isinstance(lookups.get(dispatch.execution_id), StillRunning)
            assert dispatch.execution_id in self.live

    # Invariants ----------------------------------------------------------------------------------

    @invariant()
    def one_terminal_state_each(self) -> None:
        """I1: every accepted request is stored, and terminal exactly once when it has ended."""
        for request_id in self.accepted:
            stored = self.store.get_request(request_id)
            assert stored is not None, f"{request_id} was lost"
            expected = 1 if stored.status.terminal else 0
            assert self.terminal_transitions[request_id] == expected
            live = self.router.get(request_id)
            assert (live is None) == stored.status.terminal
            if live is not None:
                assert live.status is stored.status and live.attempts == stored.attempts

    @invariant()
    def no_gpu_over_committed(self) -> None:
        """I2: router reservations on a GPU stay within total − margin − memory used by others."""
        for gpu in self.router.monitor.gpus.values():
            reserved = sum(
                d.reservations.get(gpu.id, 0)
                for execution_id, d in self.live.items()
                if self.router.execution_of(d.request.id) == execution_id
            )
            assert gpu.reserved_mb >= reserved
            assert gpu.reserved_mb == sum(gpu.running.values())
            limit = gpu.memory_total_mb - MARGIN_MB - gpu.reading.external_used_mb
            assert gpu.reserved_mb <= limit, f"{gpu.id} over-committed"
            assert len(gpu.running) <= gpu.slots

    @invariant()
    def holds_never_overlap(self) -> None:
        """A GPU is held for one starving request at most, and only a request's own holds."""
        held = [gpu_id for gpu_ids in self.router.holds.values() for gpu_id in gpu_ids]
        assert len(held) == len(set(held)), self.router.holds
        for request_id, gpu_ids in self.router.holds.items():
            assert request_id in self.router.live
            assert all(gpu_id in self.router.monitor.gpus for gpu_id in gpu_ids)

    @invariant()
    def never_running_twice(self) -> None:
        """I3: one live execution per request, and it is the one the router tracks."""
        per_request = Counter(d.request.id for d in self.live.values())
        for request_id, count in per_request.items():
            assert count == 1, f"{request_id} runs {count} times"
        for execution_id, dispatch in self.live.items():
            current = self.router.execution_of(dispatch.request.id)
            assert current == execution_id, f"{execution_id} runs untracked (router: {current})"

    @invariant()
    def quotas_held(self) -> None:
        """I4: concurrency and the per-minute rate never exceed the user's quota."""
        for user in USERS:
            active = sum(
                1
                for request in self.router.live.values()
                if request.user == user and request.status.active
            )
            assert active == self.router.active_count(user)
            assert active <= QUOTA["max_concurrent"]
            times = self.admissions[user]
            for index, start in enumerate(times):
                in_window = [t for t in times[index:] if t < start + 60.0]
                assert len(in_window) <= QUOTA["requests_per_minute"]

    @invariant()
    def queue_bounded(self) -> None:
        """Waiting requests are counted exactly; those never dispatched stay within the bound."""
        waiting = [r for r in self.router.live.values() if r.status is RequestStatus.QUEUED]
        assert self.router.queued_total() == len(waiting)
        fresh = sum(1 for request in waiting if request.attempts == 0)
        assert fresh <= QUEUE_BOUND, f"{fresh} waiting for a first dispatch"


TestRouterInvariants = RouterMachine.TestCase
TestRouterInvariants.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

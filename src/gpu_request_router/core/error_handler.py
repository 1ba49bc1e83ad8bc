"""Failures: what each kind means, retries with backoff and a budget, circuit breakers.

Classification (SPEC §3):

==================  ==========================================  ===========================
failure kind        action                                      counts against the circuit
==================  ==========================================  ===========================
client_error        fail the request (retrying cannot help)     no
backend_error       retry on another GPU after a backoff        yes
unreachable         retry on another GPU after a backoff        yes
worker_lost         retry on another GPU after a backoff        yes
gpu_out_of_memory   grow the estimate, retry where it fits      no
timeout             expire the request                          no
stream_interrupted  fail (the client has part of the answer)    yes
==================  ==========================================  ===========================

A retry also needs attempts left (``retries.max_attempts``, the first included) and, after a
backend error or an out-of-memory failure, room in the retry budget: retries in the last
``budget_window_s`` may not exceed ``budget_ratio`` of first attempts in that window, with
``budget_min`` always allowed (Envoy's retry budget), so a failing fleet cannot multiply its
load. Work whose backend is gone (``unreachable``, ``worker_lost``) only moves elsewhere and adds
no load, so the budget does not hold it back: a dead host's whole workload fails over. Backoff
doubles per attempt from ``backoff_s`` up to ``max_backoff_s``, with "equal jitter" (half fixed,
half random) from a seeded generator.

Circuit breakers, one per backend and one per GPU: ``failure_threshold`` consecutive counted
failures open the circuit (no new work) for ``reset_s``; then it is half-open and lets one probe
through; the probe's success closes it, its failure opens it again.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from gpu_request_router.config.config_loader import RetrySettings
from gpu_request_router.core.events import Failure, FailureKind

__all__ = ["Action", "CircuitBreaker", "CircuitState", "ErrorHandler", "RetryBudget", "Verdict"]


class Action(StrEnum):
    """What to do with a request whose execution failed."""

    FAIL = "fail"
    RETRY = "retry"
    GROW_AND_RETRY = "grow_and_retry"
    EXPIRE = "expire"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision about one failure: the action, the backoff before a retry, and why."""

    action: Action
    delay_s: float = 0.0
    reason: str = ""


_RETRYABLE = {
    FailureKind.BACKEND_ERROR: Action.RETRY,
    FailureKind.UNREACHABLE: Action.RETRY,
    FailureKind.WORKER_LOST: Action.RETRY,
    FailureKind.OUT_OF_MEMORY: Action.GROW_AND_RETRY,
}
# Work whose backend is gone moves to another one: no load is added, so the budget does not apply.
_MOVES_WORK = frozenset({FailureKind.UNREACHABLE, FailureKind.WORKER_LOST})
_COUNTED = frozenset(
    {
        FailureKind.BACKEND_ERROR,
        FailureKind.UNREACHABLE,
        FailureKind.WORKER_LOST,
        FailureKind.STREAM_BROKEN,
    }
)


class CircuitState(StrEnum):
    """The state of one circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class _Circuit:
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False


class CircuitBreaker:
    """Circuit breakers keyed by name (``backend:<name>``, ``gpu:<id>``)."""

    def __init__(self, failure_threshold: int, reset_s: float) -> None:
        self._threshold = failure_threshold
        self._reset_s = reset_s
        self._circuits: dict[str, _Circuit] = {}

    def state(self, key: str) -> CircuitState:
        """The current state of a circuit (closed when never seen)."""
        circuit = self._circuits.get(key)
        return circuit.state if circuit is not None else CircuitState.CLOSED

    def blocked(self, key: str) -> bool:
        """Whether new work must stay away: open, or half-open with its probe under way."""
        circuit = self._circuits.get(key)
        if circuit is None:
            return False
        return circuit.state is CircuitState.OPEN or circuit.probing

    def failure(self, key: str, now: float) -> bool:
        """Count a failure; return True if this opened the circuit."""
        circuit = self._circuits.setdefault(key, _Circuit())
        circuit.probing = False
        if circuit.state is CircuitState.HALF_OPEN:
            circuit.state = CircuitState.OPEN
            circuit.opened_at = now
            return True
        circuit.failures += 1
        if circuit.state is CircuitState.CLOSED and circuit.failures >= self._threshold:
            circuit.state = CircuitState.OPEN
            circuit.opened_at = now
            return True
        return False

    def success(self, key: str) -> bool:
        """Count a success; return True if this closed an open or half-open circuit."""
        circuit = self._circuits.get(key)
        if circuit is None:
            return False
        was_closed = circuit.state is CircuitState.CLOSED
        del self._circuits[key]
        return not was_closed

    def probe(self, key: str) -> bool:
        """Note work sent through a circuit; True if it was half-open (the work is its probe)."""
        circuit = self._circuits.get(key)
        if circuit is None or circuit.state is not CircuitState.HALF_OPEN or circuit.probing:
            return False
        circuit.probing = True
        return True

    def advance(self, now: float) -> list[str]:
        """Move circuits whose open period has ended to half-open; return their keys."""
        moved = []
        for key, circuit in self._circuits.items():
            if circuit.state is CircuitState.OPEN and now >= circuit.opened_at + self._reset_s:
                circuit.state = CircuitState.HALF_OPEN
                circuit.failures = 0
                moved.append(key)
        return moved

    def next_change(self) -> float | None:
        """When the next open circuit becomes half-open, or ``None``."""
        return min(
            (
                circuit.opened_at + self._reset_s
                for circuit in self._circuits.values()
                if circuit.state is CircuitState.OPEN
            ),
            default=None,
        )


class RetryBudget:
    """Caps retries at a ratio of first attempts over a sliding window, with a floor."""

    def __init__(self, ratio: float, minimum: int, window_s: float) -> None:
        self._ratio = ratio
        self._minimum = minimum
        self._window_s = window_s
        self._firsts: deque[float] = deque()
        self._retries: deque[float] = deque()

    def first_attempt(self, now: float) -> None:
        """Record a first attempt."""
        self._firsts.append(now)

    def try_retry(self, now: float) -> bool:
        """Take one retry from the budget if it allows one now."""
        cutoff = now - self._window_s
        for window in (self._firsts, self._retries):
            while window and window[0] <= cutoff:
                window.popleft()
        # The relative epsilon keeps e.g. 0.7 × 90 = 62.999… (float rounding) from flooring to 62.
        share = math.floor(self._ratio * len(self._firsts) * (1 + 1e-12))
        allowed = max(self._minimum, share)
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True


class ErrorHandler:
    """Classifies failures and owns retry backoff, the retry budget and the circuit breakers."""

    def __init__(self, settings: RetrySettings, rng: random.Random) -> None:
        self._settings = settings
        self._rng = rng
        self.circuits = CircuitBreaker(
            settings.circuit_breaker.failure_threshold, settings.circuit_breaker.reset_s
        )
        self.budget = RetryBudget(
            settings.budget_ratio, settings.budget_min, settings.budget_window_s
        )

    @staticmethod
    def counts_against_circuit(failure: Failure) -> bool:
        """Whether this failure says something about the backend or GPU (client errors never do)."""
        return failure.kind in _COUNTED

    def judge(self, failure: Failure, attempts: int, now: float) -> Verdict:
        """Decide what happens after attempt number ``attempts`` failed with ``failure``."""
        if failure.kind is FailureKind.TIMEOUT:
            return Verdict(Action.EXPIRE, reason="timeout")
        action = _RETRYABLE.get(failure.kind)
        if action is None:
            return Verdict(Action.FAIL, reason=failure.kind.value)
        if attempts >= self._settings.max_attempts:
            return Verdict(Action.FAIL, reason="max_attempts")
        if failure.kind not in _MOVES_WORK and not self.budget.try_retry(now):
            return Verdict(Action.FAIL, reason="retry_budget_exhausted")
        return Verdict(action, delay_s=self.backoff(attempts), reason=failure.kind.value)

    def backoff(self, attempts: int) -> float:
        """Delay before the retry that follows attempt number ``attempts`` (equal jitter)."""
        base: float = self._settings.backoff_s * 2.0 ** max(0, attempts - 1)
        capped = min(self._settings.max_backoff_s, base)
        return capped / 2 + self._rng.random() * capped / 2

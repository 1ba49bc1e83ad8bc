"""Tests of failure handling: classification, attempts, the retry budget, backoff, circuits."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpu_request_router.config import load_settings
from gpu_request_router.config.config_loader import RetrySettings
from gpu_request_router.core.error_handler import (
    Action,
    CircuitBreaker,
    CircuitState,
    ErrorHandler,
    RetryBudget,
    Verdict,
)
from gpu_request_router.core.events import Failure, FailureKind

K = FailureKind


def retry_settings(**changes: Any) -> RetrySettings:
    """The packaged retry settings, with ``changes`` merged over them."""
    return load_settings(overrides={"retries": changes} if changes else None).retries


def handler(seed: int = 0, **changes: Any) -> ErrorHandler:
    """An error handler over the packaged retry settings and a seeded generator."""
    return ErrorHandler(retry_settings(**changes), random.Random(seed))


# --- classification ------------------------------------------------------------------------------

# The table of the module docstring: kind -> (action, counts against the circuit).
TABLE: dict[FailureKind, tuple[Action, bool]] = {
    K.CLIENT_ERROR: (Action.FAIL, False),
    K.BACKEND_ERROR: (Action.RETRY, True),
    K.UNREACHABLE: (Action.RETRY, True),
    K.WORKER_LOST: (Action.RETRY, True),
    K.OUT_OF_MEMORY: (Action.GROW_AND_RETRY, False),
    K.TIMEOUT: (Action.EXPIRE, False),
    K.STREAM_BROKEN: (Action.FAIL, True),
}


def test_the_table_covers_every_failure_kind() -> None:
    """Every failure kind has a row in the classification table."""
    assert set(TABLE) == set(FailureKind)


@pytest.mark.parametrize("kind", list(FailureKind), ids=lambda kind: kind.value)
def test_classification_follows_the_table(kind: FailureKind) -> None:
    """A first failure of each kind gets the documented action and circuit accounting."""
    action, counted = TABLE[kind]
    verdict = handler().judge(Failure(kind, "x"), attempts=1, now=0.0)
    assert verdict.action is action
    assert ErrorHandler.counts_against_circuit(Failure(kind)) is counted
    if action in (Action.RETRY, Action.GROW_AND_RETRY):
        assert verdict.reason == kind.value
        assert verdict.delay_s > 0
    else:
        assert verdict.delay_s == 0.0


def test_retryable_kinds_are_exactly_those_the_handler_retries() -> None:
    """FailureKind.retryable agrees with the classification table."""
    for kind, (action, _) in TABLE.items():
        assert kind.retryable is (action in (Action.RETRY, Action.GROW_AND_RETRY)), kind


def test_client_error_fails_with_its_kind_as_reason() -> None:
    """A client error fails at once, naming itself."""
    assert handler().judge(Failure(K.CLIENT_ERROR), 1, 0.0) == Verdict(
        Action.FAIL, reason="client_error"
    )


def test_timeout_expires_even_on_the_last_attempt() -> None:
    """A timeout expires the request whatever the attempt count."""
    verdict = handler().judge(Failure(K.TIMEOUT), attempts=3, now=0.0)
    assert verdict == Verdict(Action.EXPIRE, reason="timeout")


@pytest.mark.parametrize("kind", [K.BACKEND_ERROR, K.UNREACHABLE, K.WORKER_LOST, K.OUT_OF_MEMORY])
def test_max_attempts_fails_the_request(kind: FailureKind) -> None:
    """A retryable failure of the last allowed attempt fails with reason max_attempts."""
    errors = handler()
    assert errors.judge(Failure(kind), attempts=2, now=0.0).action is not Action.FAIL
    assert errors.judge(Failure(kind), attempts=3, now=0.0) == Verdict(
        Action.FAIL, reason="max_attempts"
    )


def test_max_attempts_does_not_spend_the_budget() -> None:
    """A failure refused for max_attempts takes nothing from the retry budget."""
    errors = handler(budget_min=1, budget_ratio=0.0)
    assert errors.judge(Failure(K.BACKEND_ERROR), attempts=3, now=0.0).reason == "max_attempts"
    assert errors.judge(Failure(K.BACKEND_ERROR), attempts=1, now=0.0).action is Action.RETRY


def test_single_attempt_setting_never_retries() -> None:
    """With max_attempts 1 the first failure is final."""
    verdict = handler(max_attempts=1).judge(Failure(K.WORKER_LOST), attempts=1, now=0.0)
    assert verdict.reason == "max_attempts"


# --- the retry budget ---------------------------------------------------------------------------


def test_budget_allows_the_floor_without_first_attempts() -> None:
    """With no first attempts, budget_min retries are still allowed, and no more."""
    errors = handler()
    reasons = [errors.judge(Failure(K.BACKEND_ERROR), 1, 0.0).reason for _ in range(5)]
    assert reasons == ["backend_error"] * 3 + ["retry_budget_exhausted"] * 2


@pytest.mark.parametrize(("firsts", "allowed"), [(0, 3), (10, 3), (15, 3), (20, 4), (52, 10)])
def test_budget_is_the_larger_of_the_floor_and_the_ratio(firsts: int, allowed: int) -> None:
    """After N first attempts, max(3, 0.2 N) retries fit the window, then the budget is spent."""
    errors = handler()
    for _ in range(firsts):
        errors.budget.first_attempt(0.0)
    verdicts = [errors.judge(Failure(K.BACKEND_ERROR), 1, 1.0) for _ in range(allowed + 2)]
    assert [v.action for v in verdicts[:allowed]] == [Action.RETRY] * allowed
    assert all(
        v == Verdict(Action.FAIL, reason="retry_budget_exhausted") for v in verdicts[allowed:]
    )


def test_budget_window_slides() -> None:
    """Retries and first attempts leave the budget once budget_window_s old."""
    budget = RetryBudget(ratio=0.2, minimum=3, window_s=10.0)
    for _ in range(20):
        budget.first_attempt(0.0)
    assert [budget.try_retry(1.0) for _ in range(5)] == [True] * 4 + [False]
    # At t=10 the first attempts left the window, the retries (t=1) not yet: floor of 3, 4 used.
    assert not budget.try_retry(10.0)
    # At t=11 the retries left as well: the floor applies again.
    assert [budget.try_retry(11.0) for _ in range(4)] == [True] * 3 + [False]


def test_budget_ratio_is_exact_for_awkward_ratios() -> None:
    """budget_ratio 0.7 of 90 first attempts allows 63 retries (no float rounding loss)."""
    budget = RetryBudget(ratio=0.7, minimum=0, window_s=10.0)
    for _ in range(90):
        budget.first_attempt(0.0)
    granted = sum(budget.try_retry(1.0) for _ in range(70))
    assert granted == 63


@given(
    firsts=st.integers(0, 200),
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 1.0, 2.0]),
    minimum=st.integers(0, 5),
)
def test_budget_never_grants_more_than_its_share(firsts: int, ratio: float, minimum: int) -> None:
    """Retries granted in one window are max(minimum, ⌊ratio × firsts⌋), exactly."""
    budget = RetryBudget(ratio=ratio, minimum=minimum, window_s=10.0)
    for _ in range(firsts):
        budget.first_attempt(0.0)
    percent = round(ratio * 100)
    expected = max(minimum, percent * firsts // 100)
    granted = sum(budget.try_retry(1.0) for _ in range(expected + 3))
    assert granted == expected


# --- backoff -------------------------------------------------------------------------------------


class FixedDraws(random.Random):
    """A generator whose ``random()`` returns the given numbers in turn: the jitter made visible."""

    def __init__(self, *draws: float) -> None:
        super().__init__(0)
        self._draws = list(draws)

    def random(self) -> float:
        """The next of the given numbers."""
        return self._draws.pop(0)


# The ceiling of the delay after attempt n, worked out by hand from the documented rule: it
# doubles from backoff_s per attempt and never passes max_backoff_s.
CEILINGS = {
    (0.5, 30.0): [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0],
    (0.25, 5.0): [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0],
    (1.0, 6.0): [1.0, 2.0, 4.0, 6.0, 6.0],
    (3.0, 2.0): [2.0, 2.0, 2.0],
}


@pytest.mark.parametrize(("backoff_s", "max_backoff_s"), list(CEILINGS), ids=str)
def test_backoff_doubles_from_backoff_s_up_to_max_backoff_s(
    backoff_s: float, max_backoff_s: float
) -> None:
    """Equal jitter: a draw of 0 waits half the ceiling, 0.5 three quarters, 1 all of it."""
    ceilings = CEILINGS[backoff_s, max_backoff_s]
    settings = retry_settings(backoff_s=backoff_s, max_backoff_s=max_backoff_s)
    for draw, share in ((0.0, 0.5), (0.5, 0.75), (1.0, 1.0)):
        errors = ErrorHandler(settings, FixedDraws(*[draw] * len(ceilings)))
        delays = [errors.backoff(attempts) for attempts in range(1, len(ceilings) + 1)]
        assert delays == [share * ceiling for ceiling in ceilings]


def test_backoff_stays_within_its_ceiling_for_a_real_generator() -> None:
    """With a seeded generator every delay after attempt n lies in [ceiling/2, ceiling]."""
    errors = ErrorHandler(retry_settings(backoff_s=0.5, max_backoff_s=30.0), random.Random(7))
    for attempts, ceiling in enumerate(CEILINGS[0.5, 30.0], start=1):
        for _ in range(20):
            assert ceiling / 2 <= errors.backoff(attempts) <= ceiling


def test_each_backoff_takes_one_draw_of_the_handlers_generator() -> None:
    """The jitter comes from the handler's generator, one draw per delay, in turn."""
    errors = ErrorHandler(retry_settings(), FixedDraws(0.0, 1.0, 0.5, 0.25))
    assert [errors.backoff(3) for _ in range(4)] == [1.0, 2.0, 1.5, 1.25]


def test_backoff_is_deterministic_for_a_seed() -> None:
    """Two handlers with the same seed back off identically."""
    first = handler(seed=5)
    second = handler(seed=5)
    assert [first.backoff(n) for n in range(1, 8)] == [second.backoff(n) for n in range(1, 8)]


def test_backoff_spread_uses_the_whole_jitter_range() -> None:
    """Over many draws the delays spread over most of [cap/2, cap]."""
    errors = handler(seed=1)
    delays = [errors.backoff(3) for _ in range(500)]
    assert min(delays) < 1.0 + 0.05
    assert max(delays) > 2.0 - 0.05


def test_judge_returns_the_backoff_for_its_attempt() -> None:
    """A retry verdict carries a delay from the backoff of the failed attempt."""
    errors = handler(seed=3, max_attempts=10)
    verdict = errors.judge(Failure(K.BACKEND_ERROR), attempts=3, now=0.0)
    assert 1.0 <= verdict.delay_s <= 2.0


def test_zero_backoff_means_no_delay() -> None:
    """With backoff_s 0 a retry is immediate."""
    assert handler(backoff_s=0).judge(Failure(K.UNREACHABLE), 1, 0.0).delay_s == 0.0


# --- circuit breakers -----------------------------------------------------------------------------


def test_unknown_circuit_is_closed_and_not_blocked() -> None:
    """A circuit never seen is closed and lets work through."""
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30.0)
    assert breaker.state("gpu:a:0") is CircuitState.CLOSED
    assert not breaker.blocked("gpu:a:0")
    assert breaker.next_change() is None


def test_threshold_consecutive_failures_open_the_circuit() -> None:
    """The threshold-th consecutive failure opens the circuit and blocks it."""
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30.0)
    assert not breaker.failure("k", 1.0)
    assert not breaker.failure("k", 2.0)
    assert breaker.state("k") is CircuitState.CLOSED
    assert breaker.blocked("k") is False, "a bool: it is published as a gauge and logged"
    assert breaker.failure("k", 3.0)
    assert breaker.state("k") is CircuitState.OPEN
    assert breaker.blocked("k")
    assert not breaker.failure("k", 4.0)
    assert breaker.next_change() == 33.0


def test_a_success_resets_the_consecutive_count() -> None:
    """Failures must be consecutive: a success in between starts over."""
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30.0)
    breaker.failure("k", 1.0)
    breaker.failure("k", 2.0)
    assert not breaker.success("k")
    breaker.failure("k", 3.0)
    breaker.failure("k", 4.0)
    assert breaker.state("k") is CircuitState.CLOSED


def test_success_on_a_closed_circuit_returns_false() -> None:
    """A success that closes nothing says so."""
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30.0)
    assert not breaker.success("never-seen")
    breaker.failure("k", 0.0)
    assert not breaker.success("k")


def test_open_circuit_half_opens_after_reset_s() -> None:
    """advance() moves an open circuit to half-open once reset_s has passed, not before."""
    breaker = CircuitBreaker(failure_threshold=1, reset_s=30.0)
    breaker.failure("k", 10.0)
    assert breaker.advance(39.9) == []
    assert breaker.state("k") is CircuitState.OPEN
    assert breaker.advance(40.0) == ["k"]
    assert breaker.state("k") is CircuitState.HALF_OPEN
    assert not breaker.blocked("k")
    assert breaker.next_change() is None
    assert breaker.advance(100.0) == []


def test_probe_blocks_further_work_and_success_closes() -> None:
    """A half-open circuit lets one probe through; its success closes the circuit."""
    breaker = CircuitBreaker(failure_threshold=1, reset_s=30.0)
    breaker.failure("k", 0.0)
    breaker.advance(30.0)
    assert breaker.probe("k")
    assert breaker.blocked("k")
    assert not breaker.probe("k")
    assert breaker.success("k")
    assert breaker.state("k") is CircuitState.CLOSED
    assert not breaker.blocked("k")


def test_probe_on_closed_or_open_circuits_is_not_a_probe() -> None:
    """Only a half-open circuit takes a probe."""
    breaker = CircuitBreaker(failure_threshold=1, reset_s=30.0)
    assert not breaker.probe("k")
    breaker.failure("k", 0.0)
    assert not breaker.probe("k")
    assert breaker.state("k") is CircuitState.OPEN


def test_failure_in_half_open_reopens() -> None:
    """A failed probe opens the circuit again for another reset_s."""
    breaker = CircuitBreaker(failure_threshold=3, reset_s=30.0)
    for now in (0.0, 1.0, 2.0):
        breaker.failure("k", now)
    breaker.advance(32.0)
    breaker.probe("k")
    assert breaker.failure("k", 35.0)
    assert breaker.state("k") is CircuitState.OPEN
    assert breaker.blocked("k")
    assert breaker.next_change() == 65.0
    assert breaker.advance(64.0) == []
    assert breaker.advance(65.0) == ["k"]


def test_success_closes_an_open_circuit() -> None:
    """A success reported while open (work that started earlier) closes the circuit."""
    breaker = CircuitBreaker(failure_threshold=1, reset_s=30.0)
    breaker.failure("k", 0.0)
    assert breaker.success("k")
    assert breaker.state("k") is CircuitState.CLOSED


def test_circuits_are_independent() -> None:
    """Failures of one key do not affect another."""
    breaker = CircuitBreaker(failure_threshold=1, reset_s=30.0)
    breaker.failure("backend:a", 0.0)
    breaker.failure("gpu:b:0", 5.0)
    assert breaker.blocked("backend:a")
    assert not breaker.blocked("gpu:a:0")
    assert breaker.next_change() == 30.0
    assert breaker.advance(30.0) == ["backend:a"]
    assert breaker.next_change() == 35.0


def test_handler_circuits_use_the_configured_threshold() -> None:
    """The handler's breaker opens after retries.circuit_breaker.failure_threshold failures."""
    errors = handler()
    opened = [errors.circuits.failure("backend:sim", float(t)) for t in range(5)]
    assert opened == [False, False, False, False, True]
    assert errors.circuits.next_change() == 4.0 + 30.0


@pytest.mark.parametrize("kind", [K.UNREACHABLE, K.WORKER_LOST])
def test_work_moving_off_a_dead_backend_is_not_held_back_by_the_budget(kind: FailureKind) -> None:
    """A host's death fails over all its work, however little budget there is."""
    errors = handler(budget_min=0, budget_ratio=0.0)
    assert errors.judge(Failure(K.BACKEND_ERROR), 1, 0.0).reason == "retry_budget_exhausted"
    verdicts = [errors.judge(Failure(kind), 1, 0.0) for _ in range(50)]
    assert all(verdict.action is Action.RETRY for verdict in verdicts)

"""TimeBudget: optional work within a share of the time, on an injected timer."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gpu_request_router.utils.budget import TimeBudget


class Timer:
    """A clock the test moves by hand; work advances it by what it 'takes'."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def work(timer: Timer, seconds: float, seen: list[bool]) -> Callable[[bool], None]:
    """Work that takes ``seconds`` when allowed and nothing when not; records ``allowed``."""

    def run(allowed: bool) -> None:
        seen.append(allowed)
        if allowed:
            timer.now += seconds

    return run


def test_work_is_allowed_until_the_burst_is_spent_then_refused() -> None:
    """With a 0.25 s burst, 0.1 s pieces back to back: three run, the fourth is refused."""
    timer, seen = Timer(), list[bool]()
    budget = TimeBudget(0.1, 0.25, timer)
    for _ in range(4):
        budget.spend(work(timer, 0.1, seen))
    # 0.25 → 0.15 (+0.01 refill) → 0.06 (+0.01) → −0.03 (+0.01): the fourth finds −0.02
    assert seen == [True, True, True, False]


def test_credit_comes_back_at_its_share_of_the_time_that_passes() -> None:
    """Overdrawn by 0.05 s at a share of 0.1: refused until 0.5 s have passed, then allowed.

    The time counts from the overdrawing work's start: its own 0.3 s count too.
    """
    timer, seen = Timer(), list[bool]()
    budget = TimeBudget(0.1, 0.25, timer)
    budget.spend(work(timer, 0.3, seen))  # credit 0.25 − 0.3 = −0.05
    timer.now += 0.19
    budget.spend(work(timer, 0.0, seen))
    timer.now += 0.02
    budget.spend(work(timer, 0.0, seen))
    assert seen == [True, False, True]


def test_a_long_idle_time_gives_no_more_than_the_burst() -> None:
    """After an hour idle the credit is the burst: the same work as at the start is refused."""
    timer, seen = Timer(), list[bool]()
    budget = TimeBudget(0.1, 0.25, timer)
    timer.now += 3600
    budget.spend(work(timer, 0.3, seen))  # 0.25 − 0.3, then 0.03 back by the next start
    budget.spend(work(timer, 0.3, seen))
    assert seen == [True, False]


def test_the_result_of_the_work_is_returned() -> None:
    """``spend`` hands back what the work returned, allowed or not."""
    budget = TimeBudget(0.5, 1.0, Timer())
    assert budget.spend(lambda allowed: ("ran", allowed)) == ("ran", True)


@pytest.mark.parametrize(("share", "burst"), [(0.0, 1.0), (1.5, 1.0), (0.1, 0.0)])
def test_a_share_outside_0_to_1_or_no_burst_is_refused(share: float, burst: float) -> None:
    """A budget that could never allow work, or would allow more than all the time, is an error."""
    with pytest.raises(ValueError, match="share must be in"):
        TimeBudget(share, burst, Timer())

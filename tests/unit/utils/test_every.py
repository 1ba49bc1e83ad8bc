"""Every: due at most once an interval, again at once when asked, never stuck on a clock jump."""

from __future__ import annotations

from gpu_request_router.utils.every import Every


def test_due_once_an_interval_and_again_when_asked() -> None:
    """The first call is due; then not until the interval has passed; again() makes it due."""
    every = Every(30.0)
    assert [every.due(t) for t in (100.0, 101.0, 129.9, 130.0, 131.0)] == [
        True,
        False,
        False,
        True,
        False,
    ]
    every.again()
    assert every.due(131.5)
    assert not every.due(132.0)


def test_a_clock_that_went_backwards_makes_it_due() -> None:
    """A step back (a wall clock set back) is not taken for a recent call."""
    every = Every(30.0)
    assert every.due(1000.0)
    assert every.due(10.0)
    assert not every.due(20.0)

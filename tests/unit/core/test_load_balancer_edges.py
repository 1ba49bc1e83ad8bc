"""Placement cases that mutation testing found unchecked."""

from __future__ import annotations

from test_load_balancer import chosen_ids, fleet, need, place

from gpu_request_router.testing import reading


def test_balanced_prefers_healthy_over_degraded_for_an_exact_size_too() -> None:
    """An exact size also goes to a healthy GPU before a degraded one that fits tighter."""
    monitor = fleet(reading("a", 0), reading("a", 1, used_mb=50_000, temperature_c=95.0))
    assert monitor.get("a:1").health == "degraded"
    assert chosen_ids(place(monitor, need(exact=True), "balanced")) == ("a:0",)

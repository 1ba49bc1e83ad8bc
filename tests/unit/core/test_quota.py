"""Tests of run-time quota overrides."""

from __future__ import annotations

import pytest
from core_harness import Harness

from gpu_request_router.exceptions import InvalidRequest


def test_an_override_with_an_unknown_limit_names_the_quota_and_changes_nothing(
    harness_for,
) -> None:
    """A key that is not a quota limit raises InvalidRequest on "quota" and changes nothing."""
    h: Harness = harness_for(quota={"max_priority": "high"})
    with pytest.raises(InvalidRequest) as caught:
        h.router.quotas.set_override("alice", {"max_priority": "low", "max_bananas": 3})
    assert caught.value.field == "quota"
    assert "max_bananas" in str(caught.value)
    assert h.router.quotas.quota_for("alice").max_priority == "high"

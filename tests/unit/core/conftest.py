"""Fixtures of the core's unit tests."""

from __future__ import annotations

from typing import Any

import pytest
from core_harness import Harness

from gpu_request_router.testing import make_settings


@pytest.fixture
def harness_for() -> Any:
    """Build a :class:`Harness` from ``make_settings`` keyword arguments."""

    def build(**kwargs: Any) -> Harness:
        return Harness(make_settings(**kwargs))

    return build

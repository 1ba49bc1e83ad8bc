"""Shared by every test: no test leaves structlog or the stdlib loggers configured for the next.

Under ``pytest -n 2 --dist loadgroup`` (``make test``) the system tests form one group, so they
run one after another on one worker: they start routers and workers as processes, kill them and
wait on real time, and two of them at once on two cores would compete for both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import structlog

from gpu_request_router.testing import drop_redis_prefix, redis_prefix, require_redis

_SYSTEM = Path(__file__).parent / "system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put every system test in one xdist group (see the module docstring)."""
    for item in items:
        if _SYSTEM in item.path.parents:
            item.add_marker(pytest.mark.xdist_group("system"))


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Commands run in-process (typer's CliRunner) configure logging onto streams that close."""
    root, uvicorn = logging.getLogger(), logging.getLogger("uvicorn")
    levels = root.level, uvicorn.level
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    for handler in root.handlers[:]:
        if isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter):
            root.removeHandler(handler)  # the one configure_logging installed
    root.setLevel(levels[0])
    uvicorn.setLevel(levels[1])


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis the tests use (``REDIS_URL``); skipped if unreachable, failed under ``CI=true``."""
    return require_redis()


@pytest.fixture
def redis_store_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    prefix = redis_prefix()
    yield prefix
    drop_redis_prefix(redis_url, prefix)


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the tests' Redis (answers decoded), to read the keys themselves."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()

"""Shared by every test: no test leaves structlog or the stdlib loggers configured for the next."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog


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

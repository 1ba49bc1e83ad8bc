"""Structured logging set-up: one structlog configuration for the whole process.

Call :func:`configure_logging` once at start-up (calling it again simply replaces the
configuration). Log with ``structlog.get_logger()``; bind per-request fields with
``structlog.contextvars.bind_contextvars`` and they appear on every event logged in that context.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import Processor

from gpu_request_router.config.config_loader import LoggingSettings

__all__ = ["configure_logging"]

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(settings: LoggingSettings, *, cache_loggers: bool = False) -> None:
    """Configure structlog: level filter, contextvars, ISO UTC timestamps, JSON or console.

    ``cache_loggers``: each logger keeps the configuration of its first use, which saves
    building a logger on every log call (a few per request on the router's hot path), but a
    later configuration (or ``structlog.testing.capture_logs``) no longer reaches it: for a
    server process that configures logging once, at start-up.
    """
    level = _LEVELS[settings.level]
    stream = sys.stderr
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if settings.format == "json":
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=_isatty(stream)))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        context_class=dict,
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=cache_loggers,
    )


def _isatty(stream: object) -> bool:
    """Whether ``stream`` is an interactive terminal (colours only make sense there)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):
        return False

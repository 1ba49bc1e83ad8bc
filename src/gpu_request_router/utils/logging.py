"""Structured logging set-up: one structlog configuration for the whole process.

Call :func:`configure_logging` once at start-up (calling it again simply replaces the
configuration). Log with ``structlog.get_logger()``; bind per-request fields with
``structlog.contextvars.bind_contextvars`` and they appear on every event logged in that context.

The standard library's loggers (uvicorn's, asyncio's "Task exception was never retrieved", any
library's) are rendered by the same processors through one handler on the root logger, so that
with ``format: json`` every line on stderr is one JSON object, a traceback included (as the
``exception`` field). uvicorn's loggers follow the configured level; other libraries' loggers
only pass warnings and errors (their info lines, e.g. httpx's one per HTTP call, are noise here).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import Processor

from gpu_request_router.config.config_loader import LoggingSettings

__all__ = ["configure_logging"]

_handler: logging.Handler | None = None  # the root logger's handler that this module installed

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(settings: LoggingSettings, *, cache_loggers: bool = False) -> None:
    """Configure structlog and the stdlib loggers: level, contextvars, UTC times, JSON or console.

    ``cache_loggers``: each logger keeps the configuration of its first use, which saves
    building a logger on every log call (a few per request on the router's hot path), but a
    later configuration (or ``structlog.testing.capture_logs``) no longer reaches it: for a
    server process that configures logging once, at start-up.
    """
    level = _LEVELS[settings.level]
    stream = sys.stderr
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    rendering: list[Processor]
    if settings.format == "json":
        rendering = [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        rendering = [structlog.dev.ConsoleRenderer(colors=_isatty(stream))]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        context_class=dict,
        # One write per line (PrintLogger writes the newline apart): lines of the stdlib
        # handler below, from other threads, cannot land inside one.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=cache_loggers,
    )
    _route_stdlib(shared, rendering, level, stream)


_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def _route_stdlib(
    shared: list[Processor], rendering: list[Processor], level: int, stream: TextIO
) -> None:
    """Render the stdlib loggers' records with structlog's processors, on ``stream``.

    Replaces the handler a previous call installed, and leaves other handlers of the root
    logger (a test runner's, say) alone.
    """
    global _handler
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(max(level, logging.WARNING))
    # uvicorn's own logging set-up (any uvicorn.Config made with a log_config, an embedding
    # application's say) gives its loggers handlers of their own that bypass the root's: take
    # them back, so that every line goes out one way.
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    logging.getLogger("uvicorn").setLevel(level)


def _isatty(stream: object) -> bool:
    """Whether ``stream`` is an interactive terminal (colours only make sense there)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):
        return False

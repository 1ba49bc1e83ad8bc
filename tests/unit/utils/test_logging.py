"""Tests for the process-wide structlog configuration."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from datetime import UTC, datetime, timedelta

import pytest
import structlog
import uvicorn
from structlog.testing import capture_logs

from gpu_request_router.config.config_loader import LoggingSettings
from gpu_request_router.utils.logging import configure_logging


def test_events_and_contextvars_arrive() -> None:
    """Logged events carry their own fields and the fields bound in the context."""
    configure_logging(LoggingSettings(level="debug", format="json"))
    structlog.contextvars.bind_contextvars(request_id="req_1", user="alice")
    log = structlog.get_logger()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        log.info("dispatched", gpu="w:0")
        structlog.contextvars.unbind_contextvars("user")
        log.debug("probe")
    assert logs == [
        {
            "event": "dispatched",
            "log_level": "info",
            "gpu": "w:0",
            "request_id": "req_1",
            "user": "alice",
        },
        {"event": "probe", "log_level": "debug", "request_id": "req_1"},
    ]


def test_level_filter_applies_under_capture() -> None:
    """Events below the configured level never reach the processors."""
    configure_logging(LoggingSettings(level="warning", format="json"))
    log = structlog.get_logger()
    with capture_logs() as logs:
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
    assert [entry["event"] for entry in logs] == ["w", "e"]


def test_json_lines_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """With json and warning: info is dropped, a warning is one JSON line on stderr."""
    configure_logging(LoggingSettings(level="warning", format="json"))
    structlog.contextvars.bind_contextvars(request_id="req_7")
    log = structlog.get_logger()
    log.info("not shown")
    log.warning("queue full", depth=12)

    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "queue full"
    assert event["level"] == "warning"
    assert event["depth"] == 12
    assert event["request_id"] == "req_7"
    stamp = datetime.fromisoformat(event["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=5)


def test_json_exceptions_are_serialised(capsys: pytest.CaptureFixture[str]) -> None:
    """An exception logged in JSON mode stays one parseable line."""
    configure_logging(LoggingSettings(level="info", format="json"))
    log = structlog.get_logger()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "failed"
    assert "RuntimeError" in json.dumps(event["exception"])


def test_console_format(capsys: pytest.CaptureFixture[str]) -> None:
    """The console renderer writes human-readable lines (no colours when not a terminal)."""
    configure_logging(LoggingSettings(level="info", format="console"))
    structlog.get_logger().info("started", port=8080)
    err = capsys.readouterr().err
    assert "started" in err
    assert "port=8080" in err
    assert "\x1b[" not in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def test_configure_twice_is_fine(capsys: pytest.CaptureFixture[str]) -> None:
    """A second call replaces the first; loggers made before it follow the new settings."""
    configure_logging(LoggingSettings(level="error", format="json"))
    log = structlog.get_logger()
    configure_logging(LoggingSettings(level="info", format="json"))
    configure_logging(LoggingSettings(level="info", format="json"))
    log.info("once")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["once"]


def test_cached_loggers_keep_the_configuration_of_their_first_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With ``cache_loggers`` (a server process), a logger used once no longer follows changes."""
    configure_logging(LoggingSettings(level="info", format="json"), cache_loggers=True)
    log = structlog.get_logger()
    log.info("first")
    configure_logging(LoggingSettings(level="error", format="json"))
    log.info("second")  # cached at its first use: still at info
    structlog.get_logger().info("fresh")  # a new logger follows the error level
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["first", "second"]


def test_uvicorns_own_handlers_are_taken_back(capsys: pytest.CaptureFixture[str]) -> None:
    """After uvicorn set up log handlers of its own (a Config with a log_config), lines are JSON."""
    uvicorn.Config(app=lambda: None, log_level="info")  # installs uvicorn's default handlers
    configure_logging(LoggingSettings(level="info", format="json"))
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["Invalid HTTP request received."]


def test_stdlib_records_are_json_lines_with_their_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A stdlib logger's error with a traceback (uvicorn's, say) is one JSON line on stderr."""
    configure_logging(LoggingSettings(level="info", format="json"))
    try:
        raise RuntimeError("bind failed")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "Exception in ASGI application"
    assert event["logger"] == "uvicorn.error"
    assert event["level"] == "error"
    assert event["exception"][0]["exc_type"] == "RuntimeError"
    assert event["exception"][0]["exc_value"] == "bind failed"
    assert datetime.fromisoformat(event["timestamp"]).utcoffset() == timedelta(0)


def test_an_unretrieved_task_exception_is_one_json_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The "Task exception was never retrieved" of asyncio, traceback and all, is one JSON line."""
    configure_logging(LoggingSettings(level="info", format="json"))

    async def fail() -> None:
        raise KeyError("lost")

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(fail())
        loop.run_until_complete(asyncio.sleep(0.01))
        assert task.done()
        del task
        gc.collect()  # the task's finaliser reports the exception nobody retrieved
    finally:
        loop.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["logger"] == "asyncio"
    assert event["event"].startswith("Task exception was never retrieved")
    assert event["exception"][0]["exc_type"] == "KeyError"
    assert any(frame["name"] == "fail" for frame in event["exception"][0]["frames"])


def test_library_loggers_pass_warnings_and_uvicorn_follows_the_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """At info: uvicorn's info lines pass, another library's only from warning up."""
    configure_logging(LoggingSettings(level="info", format="json"))
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1:9/v1/gpus")
    logging.getLogger("httpx").warning("retrying")
    configure_logging(LoggingSettings(level="error", format="json"))
    logging.getLogger("uvicorn.error").warning("not shown at error")
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(event["logger"], event["event"]) for event in events] == [
        ("uvicorn.error", "Application startup complete."),
        ("httpx", "retrying"),
    ]


def test_configuring_again_replaces_the_stdlib_handler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After two configurations a stdlib record is written once, in the second one's format."""
    configure_logging(LoggingSettings(level="info", format="json"))
    configure_logging(LoggingSettings(level="info", format="console"))
    logging.getLogger("uvicorn.error").warning("once")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "once" in lines[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])

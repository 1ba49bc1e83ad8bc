"""The audit log and the OTLP trace export, against a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from structlog.testing import capture_logs

from gpu_request_router.core.request_receiver import Caller
from gpu_request_router.runtime import Runtime
from gpu_request_router.services.logging_service import (
    AuditLog,
    RequestTracer,
    otlp_tracer_provider,
)
from gpu_request_router.testing import chat, make_settings

SETTINGS = make_settings(monitor={"poll_interval_s": 0.05, "stale_after_s": 2})


class _Collector:
    """An OTLP/HTTP trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                for resource_spans in message.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        collector.spans.extend(scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def collector() -> Iterator[_Collector]:
    """A running OTLP receiver."""
    receiver = _Collector()
    yield receiver
    receiver.close()


async def test_audit_log_logs_every_transition_and_the_end_at_info() -> None:
    """Each status change is a structured event; the terminal one is request_finished."""
    runtime = Runtime.from_settings(SETTINGS, seed=1)
    runtime.listeners.append(AuditLog())
    with capture_logs() as events:
        async with runtime:
            request = await runtime.submit(chat(duration_s=0.05), Caller("alice"))
            await runtime.wait(request.id, 5)
    mine = [e for e in events if e.get("request_id") == request.id]
    assert [e["to_status"] for e in mine] == ["dispatching", "running", "succeeded"]
    finished = mine[-1]
    assert finished["event"] == "request_finished" and finished["log_level"] == "info"
    assert finished["user"] == "alice" and finished["actor"] == "backend:sim"
    assert mine[0]["log_level"] == "debug" and mine[0]["detail"].startswith("on sim:")


async def test_each_finished_request_is_exported_as_one_trace(collector: _Collector) -> None:
    """A request retried after an OOM is one trace with a span per phase and per attempt."""
    provider = otlp_tracer_provider(collector.url, "router-under-test")
    tracer = RequestTracer(provider.get_tracer("test"))
    runtime = Runtime.from_settings(SETTINGS, seed=1)
    runtime.listeners.append(tracer)
    runtime.admission_listeners.append(tracer.admitted)
    async with runtime:
        request = await runtime.submit(
            chat(failure="oom", fail_attempts=1, duration_s=0.05), Caller("alice")
        )
        done = await runtime.wait(request.id, 10)
    assert done.status.value == "succeeded" and done.attempts == 2
    assert provider.force_flush(5_000)
    provider.shutdown()
    roots = [s for s in collector.spans if s.name == "gpurouter.request"]
    assert len(roots) == 1
    root = roots[0]
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["gpurouter.request_id"].string_value == request.id
    assert attributes["gpurouter.attempts"].int_value == 2
    children = [s for s in collector.spans if s.parent_span_id == root.span_id]
    names = sorted(s.name for s in children)
    assert names == [
        "gpurouter.admission",
        "gpurouter.backend",
        "gpurouter.backend",
        "gpurouter.placement",
        "gpurouter.placement",
        "gpurouter.queue",
        "gpurouter.queue",
    ]
    for child in children:
        assert child.trace_id == root.trace_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano
        assert child.end_time_unix_nano <= root.end_time_unix_nano
    outcomes = sorted(
        next(a.value.string_value for a in s.attributes if a.key == "outcome")
        for s in children
        if s.name == "gpurouter.backend"
    )
    assert outcomes == ["queued", "succeeded"]

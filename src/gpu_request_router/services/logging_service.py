"""The Logging and Monitoring System integration: the audit log and OpenTelemetry traces.

:class:`AuditLog` listens to every status change of every request (the router writes each one
to the state store with who made it, from which status and when; ``GET /v1/requests/{id}/events``
reads that trail) and logs it as a structured event: the final one at ``info``, the others at
``debug``.

:class:`RequestTracer` turns each finished request into an OpenTelemetry trace exported over
OTLP/HTTP when ``logging.otlp_endpoint`` is set: a ``gpurouter.request`` span from submission to
the end, with children ``gpurouter.admission`` (validation, estimate, quota, durable store),
``gpurouter.queue`` (each wait in the queue), ``gpurouter.placement`` (the decision, with the
GPUs and the policy's reason) and ``gpurouter.backend`` (each attempt on a backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, Tracer, set_span_in_context

from gpu_request_router import __version__
from gpu_request_router.models.request import Request, RequestStatus, Transition

__all__ = ["AuditLog", "RequestTracer", "otlp_tracer_provider"]

_S = RequestStatus


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


class AuditLog:
    """Logs every status change of every request as a structured event."""

    def __init__(self) -> None:
        self._log = structlog.get_logger("gpu_request_router.audit")

    def __call__(self, request: Request, change: Transition) -> None:
        """Log one status change (a router listener)."""
        fields = {
            "request_id": request.id,
            "user": request.user,
            "model": request.model,
            "priority": request.priority,
            "from_status": change.from_status.value if change.from_status else None,
            "to_status": change.to_status.value,
            "attempt": change.attempt,
            "actor": change.actor,
            "detail": change.detail,
        }
        if change.to_status.terminal:
            self._log.info("request_finished", **fields)
        else:
            self._log.debug("request_transition", **fields)


def otlp_tracer_provider(endpoint: str, service_name: str) -> TracerProvider:
    """A tracer provider exporting batches of spans over OTLP/HTTP to ``endpoint``."""
    resource = Resource.create({"service.name": service_name, "service.version": __version__})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


@dataclass(slots=True)
class _Timeline:
    """What happened to one request, collected until it ends."""

    admission: tuple[float, float] | None = None
    changes: list[Transition] = field(default_factory=list)


class RequestTracer:
    """Builds one trace per request from its status changes, emitted when it ends."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._timelines: dict[str, _Timeline] = {}

    def admitted(self, request_id: str, started: float, finished: float) -> None:
        """Record how long admission took (validation, estimate, quota, durable write)."""
        self._timelines.setdefault(request_id, _Timeline()).admission = (started, finished)

    def __call__(self, request: Request, change: Transition) -> None:
        """Collect a status change; export the request's trace at its end."""
        timeline = self._timelines.setdefault(request.id, _Timeline())
        timeline.changes.append(change)
        if change.to_status.terminal:
            del self._timelines[request.id]
            self._export(request, timeline)

    def _export(self, request: Request, timeline: _Timeline) -> None:
        end = request.finished_at or request.created_at
        root = self._tracer.start_span(
            "gpurouter.request",
            start_time=_ns(request.created_at),
            attributes={
                "gpurouter.request_id": request.id,
                "gpurouter.user": request.user,
                "gpurouter.model": request.model,
                "gpurouter.priority": request.priority,
                "gpurouter.status": request.status.value,
                "gpurouter.attempts": request.attempts,
            },
        )
        context = set_span_in_context(root)

        def child(name: str, start: float, stop: float, **attributes: str | int) -> Span:
            span = self._tracer.start_span(
                name, context=context, start_time=_ns(start), attributes=attributes
            )
            span.end(end_time=_ns(max(stop, start)))
            return span

        if timeline.admission is not None:
            child("gpurouter.admission", *timeline.admission)
        queued_since: float | None = request.created_at
        attempt_since: float | None = None
        for change in timeline.changes:
            if change.to_status is _S.QUEUED:
                queued_since = change.at
            elif change.to_status is _S.DISPATCHING:
                if queued_since is not None:
                    child("gpurouter.queue", queued_since, change.at)
                    queued_since = None
                child("gpurouter.placement", change.at, change.at, detail=change.detail)
                attempt_since = change.at
            attempt_ended = (
                change.from_status is not None
                and change.from_status.active
                and not change.to_status.active
            )
            if attempt_ended and attempt_since is not None:
                child(
                    "gpurouter.backend",
                    attempt_since,
                    change.at,
                    attempt=change.attempt,
                    outcome=change.to_status.value,
                )
                attempt_since = None
        if queued_since is not None and request.status.terminal:
            child("gpurouter.queue", queued_since, end)
        root.end(end_time=_ns(end))

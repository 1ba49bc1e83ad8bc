"""The FastAPI application, assembled in one place from explicit parts.

Example::

    app = create_app(load_settings("config.yaml"))
    uvicorn.run(app, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from gpu_request_router import __version__
from gpu_request_router.api.dependencies import Service
from gpu_request_router.api.middleware.auth import Authenticator, AuthMiddleware
from gpu_request_router.api.middleware.client_address import ClientAddress
from gpu_request_router.api.middleware.header_limit import HeaderLimitMiddleware
from gpu_request_router.api.models.common import OpenAIError, Problem
from gpu_request_router.api.openapi import describe_catalog
from gpu_request_router.api.routes import (
    admin_routes,
    gpu_routes,
    metrics_routes,
    openai_routes,
    request_routes,
    worker_routes,
)
from gpu_request_router.api.routes.lean import HotPaths
from gpu_request_router.config.config_loader import Settings
from gpu_request_router.core.state_store import StateStore
from gpu_request_router.http.body_limit import BodyLimitMiddleware
from gpu_request_router.http.docs_page import install_docs_page
from gpu_request_router.http.problems import install_error_handlers, is_openai_path
from gpu_request_router.http.request_context import RequestContextMiddleware
from gpu_request_router.runtime import Runtime
from gpu_request_router.services.logging_service import (
    AuditLog,
    RequestTracer,
    otlp_tracer_provider,
)
from gpu_request_router.store import open_store
from gpu_request_router.utils.clock import Clock, SystemClock
from gpu_request_router.web import install_dashboard

__all__ = ["create_app"]

_DESCRIPTION = """
A GPU-aware, fair and durable router in front of a fleet of GPUs.

Submit work with `POST /v1/requests`; it is estimated, queued by priority with fair share between
users, and placed on a GPU that can hold it. Follow it with `GET /v1/requests/{id}?wait=30` or
its Server-Sent Events. Every error is RFC 9457 problem details (`application/problem+json`).
"""


def create_app(
    settings: Settings,
    *,
    store: StateStore | None = None,
    clock: Clock | None = None,
    seed: int | None = None,
) -> FastAPI:
    """Build the router's HTTP application for ``settings``.

    ``store`` defaults to the one ``settings.state`` names; ``clock`` to the system clock. The
    runtime (its timer, GPU polling and executions) starts with the application's lifespan and
    stops with it.
    """
    clock = clock if clock is not None else SystemClock()
    store = store if store is not None else open_store(settings.state)
    runtime = Runtime.from_settings(settings, store=store, clock=clock, seed=seed)
    service = Service(
        settings,
        runtime,
        Authenticator(settings.auth, clock.now),
        ClientAddress(settings.server.trusted_proxies),
    )
    runtime.listeners.append(AuditLog())
    provider = None
    if settings.logging.otlp_endpoint is not None:
        provider = otlp_tracer_provider(
            settings.logging.otlp_endpoint, settings.logging.service_name
        )
        tracer = RequestTracer(provider.get_tracer("gpu_request_router"))
        runtime.listeners.append(tracer)
        runtime.admission_listeners.append(tracer.admitted)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with runtime:
                yield
        finally:
            store.close()
            if provider is not None:
                provider.shutdown()

    app = FastAPI(
        title="gpu-request-router",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    install_docs_page(app)
    install_dashboard(app)
    app.state.service = service
    install_error_handlers(app)
    # Added innermost first: request context, then the header limit, then authentication, then
    # the body limit, then the hot routes' fast path.
    app.add_middleware(HotPaths, routes={**openai_routes.HOT_PATHS, **request_routes.HOT_PATHS})
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes)
    app.add_middleware(
        AuthMiddleware,
        authenticator=service.auth,
        client_address=service.client_address,
        protect_metrics=settings.server.metrics_require_auth,
    )
    app.add_middleware(HeaderLimitMiddleware, max_bytes=settings.server.max_header_bytes)
    app.add_middleware(RequestContextMiddleware)
    for module in (
        request_routes,
        openai_routes,
        gpu_routes,
        admin_routes,
        worker_routes,
        metrics_routes,
    ):
        app.include_router(module.router)
    _register_problem_schema(app, settings)
    return app


def _register_problem_schema(app: FastAPI, settings: Settings) -> None:
    """Describe every error response as problem details in the OpenAPI document.

    The catalog's models, tasks and priority classes are written in too (:func:`describe_catalog`).

    (On the OpenAI-compatible routes errors are OpenAI's ``{"error": {...}}`` instead.)

    FastAPI documents its own 422 as ``application/json`` with its validation-error schema;
    the router answers every error as ``application/problem+json`` with :class:`Problem`.
    Body-taking operations also document 400 (a body that cannot be parsed at all) and 413.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(problem.pop("$defs", {}))
            components["Problem"] = problem
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            components["OpenAIError"] = OpenAIError.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components.update(components["OpenAIError"].pop("$defs", {}))
            # As pydantic describes them, null defaults included, as the document has always
            # shown them (FastAPI's own description of a body leaves a null default out).
            for body in openai_routes.BODIES:
                described = body.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(described.pop("$defs", {}))
                components[body.__name__] = described
            problem_content = {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            }
            openai_content = {
                "application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}
            }
            for path, operations in schema.get("paths", {}).items():
                content = openai_content if is_openai_path(path) else problem_content
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    if "requestBody" in operation:
                        responses.setdefault("400", {"description": "The body is not valid JSON."})
                        responses.setdefault(
                            "413", {"description": "Body larger than server.max_body_bytes."}
                        )
                    for status, response in responses.items():
                        if status.isdigit() and int(status) >= 400:
                            response["content"] = content
            describe_catalog(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

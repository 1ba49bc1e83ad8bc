"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis import checks

from gpu_request_router.api import create_app
from gpu_request_router.api.middleware.auth import hash_key
from gpu_request_router.testing import free_port, make_settings

KEY = "fuzz-user-key"
ADMIN_KEY = "fuzz-admin-key"


APP = create_app(
    make_settings(
        gpus=[("H100-80GB", 2)],
        auth={
            "enabled": True,
            "users": [
                {"name": "fuzzer", "role": "user", "api_key_sha256": hash_key(KEY)},
                {"name": "root", "role": "admin", "api_key_sha256": hash_key(ADMIN_KEY)},
            ],
            "max_failures_per_minute": 1_000_000,
        },
        quota={"requests_per_minute": None, "max_queued": 200},
        monitor={"poll_interval_s": 0.2},
    )
)
schema = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The router of this module, served for real over loopback."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(APP, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


OPENAI_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}


@schemathesis.check
def errors_are_problem_details(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx and 5xx answer is RFC 9457 problem details with the request id.

    On the OpenAI-compatible routes, it is OpenAI's error object instead.
    """
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    body = response.json()
    if case.path in OPENAI_PATHS:
        assert content_type.startswith("application/json"), content_type
        assert {"message", "type", "param", "code"} <= body["error"].keys(), body
        return True
    assert content_type.startswith("application/problem+json"), content_type
    for key in ("type", "title", "status", "detail", "request_id"):
        assert key in body, f"problem without {key}: {body}"
    assert body["status"] == response.status_code
    return True


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_answers_every_generated_request_without_server_errors(
    case: Any, base_url: str
) -> None:
    """Generated valid and invalid calls get no 5xx, documented statuses, problem+json errors.

    (``negative_data_rejection`` is left out: a repeated scalar query parameter is read as its
    last value, as Starlette does, rather than refused.)
    """
    case.call_and_validate(
        base_url=base_url,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        checks=[
            checks.not_a_server_error,
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_schema_conformance,
            checks.ignored_auth,
            checks.missing_required_header,
            checks.unsupported_method,
            errors_are_problem_details,
        ],
    )

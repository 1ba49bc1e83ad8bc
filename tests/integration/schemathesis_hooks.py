"""Checks of the router's own that the schemathesis runs add to their built-in ones.

Loaded by ``st run`` through ``SCHEMATHESIS_HOOKS`` (see ``test_openapi_fuzz.py``). Where
``FUZZ_FOREIGN_IDS`` names requests of another user (comma-separated), the run is a user's: those
ids are also put into the paths that take a request id, half the valid listings filter by one
status only, and no answer may show one of those ids (an error may repeat the id its call named).
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

BODY_OPERATIONS = {
    "/v1/requests",
    "/v1/estimate",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
}
# The refusals of schema-valid input that depend on more than the call itself (the problem's
# reason, or the OpenAI error's code):
# - tokens past the model's context: input and output tokens together, which no schema states;
# - an idempotency key reused with another body (generated keys repeat; IETF draft §2.7);
# - more memory per GPU than the caller's own limit, which the stateful phase sets at run time;
# - a request no GPU of the fleet could hold, which depends on the GPUs known at that moment.
ALLOWED_REFUSALS = {
    "context_length_exceeded",
    "context-length-exceeded",
    "idempotency_conflict",
    "quota_max_gpu_memory_mb",
    "quota-forbidden",
    "unschedulable",
}
OPENAI_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/models",
}
FOREIGN_IDS = tuple(filter(None, os.environ.get("FUZZ_FOREIGN_IDS", "").split(",")))
STATUSES = ("queued", "dispatching", "running", "succeeded", "failed", "cancelled", "expired")


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
    if case.path in OPENAI_PATHS or case.path.startswith("/v1/models/"):
        assert content_type.startswith("application/json"), content_type
        assert {"message", "type", "param", "code"} <= body["error"].keys(), body
        return True
    assert content_type.startswith("application/problem+json"), content_type
    for key in ("type", "title", "status", "detail", "request_id"):
        assert key in body, f"problem without {key}: {body}"
    assert body["status"] == response.status_code
    return True


@schemathesis.check
def valid_input_refused_only_past_the_context(ctx: Any, response: Any, case: Any) -> bool | None:
    """Input valid by the document is refused only for what the document cannot state.

    Those are :data:`ALLOWED_REFUSALS`; ``schemathesis.toml`` lets the built-in
    ``positive_data_acceptance`` accept 422 on the operations that take a request body, and this
    check takes its place there.
    """
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or case.method.upper() != "POST":
        return None
    if case.path not in BODY_OPERATIONS or response.status_code not in (400, 422):
        return None
    body = response.json()
    reason = body["error"]["code"] if "error" in body else body.get("reason")
    assert reason in ALLOWED_REFUSALS, (
        f"schema-valid input refused with {response.status_code}: {body}"
    )
    return True


@schemathesis.check
def no_other_users_request_ids(ctx: Any, response: Any, case: Any) -> bool | None:
    """No answer shows the id of another user's request (I5).

    Only an error may repeat an id the call itself named (a 404 says which id it did not find).
    """
    if not FOREIGN_IDS:
        return None
    answer = response.content.decode("utf-8", "replace")
    shown = [request_id for request_id in FOREIGN_IDS if request_id in answer]
    if response.status_code >= 400:
        sent = response.request
        body = sent.body.decode("utf-8", "replace") if isinstance(sent.body, bytes) else sent.body
        asked = f"{sent.url} {dict(sent.headers)} {body or ''}"
        shown = [request_id for request_id in shown if request_id not in asked]
    assert not shown, f"another user's request {shown} in a {response.status_code}: {answer[:500]}"
    return True


if FOREIGN_IDS:

    @schemathesis.hook
    def flatmap_path_parameters(ctx: Any, path_parameters: dict[str, Any] | None) -> Any:
        """Name another user's request as often as a generated id where a path takes one."""
        if not path_parameters or "request_id" not in path_parameters:
            return st.just(path_parameters)
        theirs = [{**path_parameters, "request_id": request_id} for request_id in FOREIGN_IDS]
        return st.sampled_from([path_parameters, *theirs])

    @schemathesis.hook
    def flatmap_case(ctx: Any, case: Any) -> Any:
        """Half the valid listings filter by one status only, as a user looking for others' work.

        Generated filters rarely match the other user's few requests; a listing by status alone
        matches them whenever it names the status one of them is in.
        """
        meta = case.meta
        positive = meta is not None and meta.generation.mode.is_positive
        if not positive or case.path != "/v1/requests" or case.method.upper() != "GET":
            return st.just(case)
        by_status = st.sampled_from(STATUSES).map(
            lambda status: case.derive(query={"status": [status]}, keep_auth=True)
        )
        return st.one_of(st.just(case), by_status)

"""The request body limit (``server.max_body_bytes``), enforced before anything parses a body.

A declared ``Content-Length`` over the limit is refused at once; otherwise the bytes are counted
as they arrive (chunked bodies, lying lengths) and the read fails with 413 as soon as the count
passes the limit, so an oversized body is never buffered whole. Both answers are problem details.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpu_request_router.http.problems import problem_response

__all__ = ["BodyLimitMiddleware"]


class BodyLimitMiddleware:
    """Answers 413 for bodies over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = (
            f"the request body is larger than the limit of {max_bytes} bytes"
            " (server.max_body_bytes)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = problem_response(Request(scope), 413, self.detail)
            await response(scope, receive, send)
            return
        received = 0
        limit = self.max_bytes
        detail = self.detail

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, detail)
            return message

        await self.app(scope, counted, send)

"""The request header limit (``server.max_header_bytes``), before authentication and routing.

uvicorn with httptools, as ``gpurouter serve`` runs it, sets no limit of its own on header size
(64 MiB of headers were measured to reach the application). This middleware refuses a request
whose header lines — each counted as it is sent, ``name: value`` and CRLF — total more than the
limit, with 431 (Request Header Fields Too Large) as problem details, on every route.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gpu_request_router.http.problems import problem_response

__all__ = ["HeaderLimitMiddleware", "header_bytes"]

# ": " between name and value, CRLF after the value.
_FRAMING = 4


def header_bytes(scope: Scope) -> int:
    """The size of the request's header lines as sent (``name: value`` CRLF each)."""
    return sum(len(name) + len(value) + _FRAMING for name, value in scope["headers"])


class HeaderLimitMiddleware:
    """Answers 431 for requests whose headers total more than ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] == "http":
            size = header_bytes(scope)
            if size > self.max_bytes:
                detail = (
                    f"the request headers total {size} bytes, more than the limit of "
                    f"{self.max_bytes} (server.max_header_bytes)"
                )
                response = problem_response(Request(scope), 431, detail)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

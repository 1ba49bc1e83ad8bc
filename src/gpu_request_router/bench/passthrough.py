"""A bare pass-through proxy: the floor of any router built on the router's own HTTP stack.

uvicorn (uvloop, httptools, as ``gpurouter serve`` runs) serving a plain ASGI app that sends
each request's body to the same path on the backend with one shared aiohttp session and answers
with the backend's status, content type and body: no authentication, no parsing, no state, no
framework. ``gpurouter bench overhead`` measures it beside the router (target ``passthrough``),
so that what the router adds over the bare transport is read in the same run. ``GET /health``
answers 200 without the backend.

Run it with ``python -m gpu_request_router.bench.passthrough --backend URL --port 8001``.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn
from starlette.types import Receive, Scope, Send

__all__ = ["PassThrough", "main"]


class PassThrough:
    """The ASGI app: forwards every request but ``GET /health`` to ``backend``."""

    def __init__(self, backend: str) -> None:
        self.backend = backend.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call (lifespan: close the session at shutdown)."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["path"] == "/health":
            await _answer(send, 200, b"application/json", b"{}")
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self._session is None:
            # No connection limit: the proxy must not queue what the load generator sends.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k == b"content-type"}
        url = self.backend + scope["path"]
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        async with self._session.request(
            scope["method"], url, data=bytes(body), headers=headers
        ) as response:
            content = await response.read()
            kind = response.headers.get("Content-Type", "application/octet-stream").encode()
            await _answer(send, response.status, kind, content)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._session is not None:
                    await self._session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _answer(send: Send, status: int, kind: bytes, body: bytes) -> None:
    start: dict[str, Any] = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", kind)],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    """Serve the pass-through proxy until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, help="base URL to forward to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    uvicorn.run(
        PassThrough(args.backend),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()

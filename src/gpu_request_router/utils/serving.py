"""Serving an application with uvicorn: the port first, the announcement last.

:func:`listen` binds the port before the application starts, so that a port in use stops a
start before the application's lifespan (the router's recovery, the worker's registration) has
changed anything. The kernel queues connections that arrive meanwhile; they are served once the
application has started. :class:`AnnouncingServer` calls its ``announce`` callback only once the
server accepts connections, so "listening" is never said of a port the process does not hold.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn

__all__ = ["AnnouncingServer", "listen"]


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` and listening, as uvicorn would bind it.

    Raises:
        OSError: the address is in use, not available on this host, or not permitted.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class AnnouncingServer(uvicorn.Server):
    """A uvicorn server that calls ``announce`` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[], None]) -> None:
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start the application, then serve the sockets, then announce."""
        await super().startup(sockets=sockets)
        self.announce()

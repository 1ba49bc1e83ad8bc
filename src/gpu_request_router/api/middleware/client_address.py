"""The address a call comes from: the socket's peer, or the client a trusted proxy names.

``X-Forwarded-For`` is believed only from ``server.trusted_proxies``. Each proxy appends the
address it received the call from, so the list is read from the right: entries of trusted
proxies are skipped and the first other one is the client. Entries further left were written by
the client itself and are never read. With no trusted proxy configured (the default), the
header is ignored and the socket's peer is the client::

    peer 10.0.0.5 (trusted), X-Forwarded-For: 6.6.6.6, 203.0.113.7  ->  203.0.113.7

An entry that is not an address stops the walk: the client is then the trusted hop that passed
it on. When every entry is trusted, the left-most one is the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import Scope

__all__ = ["UNKNOWN_CLIENT", "ClientAddress"]

UNKNOWN_CLIENT = "unknown"
"""The address of a call whose transport gives none (e.g. a Unix socket)."""

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse(text: str) -> _Address | None:
    """An address from a peer or an ``X-Forwarded-For`` entry (``[v6]:port``, ``v4:port`` too)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """Finds the client's address of an HTTP call, believing only trusted proxies.

    Args:
        trusted_proxies: addresses and networks of the proxies whose ``X-Forwarded-For`` counts.
    """

    def __init__(self, trusted_proxies: Iterable[_Network]) -> None:
        self._trusted = tuple(trusted_proxies)

    def _is_trusted(self, address: _Address) -> bool:
        return any(address in network for network in self._trusted)

    def of(self, scope: Scope) -> str:
        """The client's address of the call ``scope`` describes."""
        client = scope.get("client")
        if not client:
            return UNKNOWN_CLIENT
        peer = _parse(str(client[0]))
        if peer is None:
            return str(client[0])
        if not self._trusted or not self._is_trusted(peer):
            return str(peer)
        entries = [
            entry.strip()
            for name, value in scope["headers"]
            if name == b"x-forwarded-for"
            for entry in value.decode("latin-1").split(",")
        ]
        nearest = peer
        for entry in reversed(entries):
            address = _parse(entry)
            if address is None:
                return str(nearest)
            if not self._is_trusted(address):
                return str(address)
            nearest = address
        return str(nearest)

"""The client's address: the socket's peer, or what trusted proxies put in X-Forwarded-For."""

from __future__ import annotations

import ipaddress

import pytest

from gpu_request_router.api.middleware.client_address import UNKNOWN_CLIENT, ClientAddress

PROXIES = ClientAddress([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1")])


def scope(peer: str | None, *forwarded: str) -> dict[str, object]:
    """An HTTP scope from ``peer`` with one X-Forwarded-For header per ``forwarded`` value."""
    return {
        "type": "http",
        "client": None if peer is None else (peer, 51234),
        "headers": [(b"x-forwarded-for", value.encode("latin-1")) for value in forwarded],
    }


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    """With no trusted proxy configured, X-Forwarded-For never changes the client."""
    assert ClientAddress([]).of(scope("10.1.1.1", "203.0.113.7")) == "10.1.1.1"


def test_an_untrusted_peer_cannot_name_another_client() -> None:
    """A peer outside trusted_proxies is the client, whatever its X-Forwarded-For says."""
    assert PROXIES.of(scope("198.51.100.9", "203.0.113.7")) == "198.51.100.9"


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        (("203.0.113.7",), "203.0.113.7"),
        (("6.6.6.6, 203.0.113.7",), "203.0.113.7"),  # the left entry is the client's own claim
        (("203.0.113.7, 10.2.2.2",), "203.0.113.7"),  # a second trusted hop is skipped
        (("6.6.6.6", "203.0.113.7, 10.2.2.2"), "203.0.113.7"),  # headers joined in order
        (("10.3.3.3, 10.2.2.2",), "10.3.3.3"),  # all trusted: the left-most
        (("6.6.6.6, not-an-address, 10.2.2.2",), "10.2.2.2"),  # the hop that passed it on
        (("garbage",), "10.1.1.1"),  # nothing readable: the peer
        ((), "10.1.1.1"),  # no header: the peer
        (("203.0.113.7:4711",), "203.0.113.7"),
        (("[2001:db8::7]:4711",), "2001:db8::7"),
        (("2001:db8::7",), "2001:db8::7"),
    ],
)
def test_behind_a_trusted_proxy_the_right_most_untrusted_entry_is_the_client(
    forwarded: tuple[str, ...], client: str
) -> None:
    """From a trusted peer, entries are read from the right, skipping trusted proxies."""
    assert PROXIES.of(scope("10.1.1.1", *forwarded)) == client


def test_an_ipv4_mapped_peer_is_matched_as_ipv4() -> None:
    """A dual-stack socket's ``::ffff:10.1.1.1`` is the trusted proxy 10.1.1.1."""
    assert PROXIES.of(scope("::ffff:10.1.1.1", "203.0.113.7")) == "203.0.113.7"


def test_a_call_without_a_peer_address_is_unknown() -> None:
    """A transport that gives no peer (a Unix socket) yields the unknown client."""
    assert PROXIES.of(scope(None, "203.0.113.7")) == UNKNOWN_CLIENT

"""Sortable, unguessable identifiers: a prefix and a 26-character ULID."""

from __future__ import annotations

import random
import secrets

__all__ = ["IdFactory"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_CROCKFORD[digit])
    return "".join(reversed(chars))


class IdFactory:
    """Makes ids like ``req_01J9Z3...``: 48 bits of millisecond time then 80 random bits.

    Ids sort by creation time. Randomness comes from the operating system unless a seeded
    ``random.Random`` is given, which makes ids reproducible in simulation.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng

    def new(self, prefix: str, now: float) -> str:
        """A new id for time ``now`` (epoch seconds) with ``prefix`` and an underscore."""
        millis = max(0, int(now * 1000)) & ((1 << 48) - 1)
        bits = self._rng.getrandbits(80) if self._rng is not None else secrets.randbits(80)
        return f"{prefix}_{_encode(millis, 10)}{_encode(bits, 16)}"

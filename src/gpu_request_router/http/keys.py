"""API keys on the wire: the Bearer key of a call, and the hash a configuration stores."""

from __future__ import annotations

import hashlib

from starlette.types import Scope

__all__ = ["bearer_key", "hash_key"]


def hash_key(key: str) -> str:
    """The SHA-256 hex digest of an API key, as ``api_key_sha256`` stores it."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key(scope: Scope) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (scheme in any case), or ``None``."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").strip().partition(" ")
            return key.strip() or None if scheme.lower() == "bearer" else None
    return None

"""Timestamps on the wire: ISO 8601 in UTC, as every JSON body of both applications writes them."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["iso"]


def iso(epoch: float | None) -> str | None:
    """An epoch time as ISO 8601 UTC (``None`` stays ``None``)."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat().replace("+00:00", "Z")

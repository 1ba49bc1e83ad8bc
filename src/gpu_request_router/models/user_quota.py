"""A user's quota: the limits that apply to them and their live usage."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QuotaUsage", "UserQuota"]


@dataclass(frozen=True, slots=True)
class UserQuota:
    """The limits of one user (defaults merged with the user's overrides); ``None`` is unlimited.

    - ``requests_per_minute``: at most this many accepted in any 60 s window.
    - ``max_concurrent``: requests dispatching or running at once; more wait in the queue.
    - ``max_queued``: requests waiting at once; more are rejected.
    - ``gpu_seconds_per_hour``: GPU-seconds charged in any 3600 s window (estimate at dispatch,
      reconciled with the observed duration at the end).
    - ``max_priority``: the highest priority class the user may ask for.
    - ``max_gpu_memory_mb``: the most GPU memory one request may need per GPU.
    """

    user: str
    max_priority: str
    requests_per_minute: int | None = None
    max_concurrent: int | None = None
    max_queued: int | None = None
    gpu_seconds_per_hour: float | None = None
    max_gpu_memory_mb: int | None = None


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    """What a user is using right now, against their :class:`UserQuota`."""

    user: str
    requests_last_minute: int
    concurrent: int
    queued: int
    gpu_seconds_last_hour: float

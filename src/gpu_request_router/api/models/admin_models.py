"""Wire schemas of quotas and users."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from gpu_request_router.api.models.common import WireModel
from gpu_request_router.models.user_quota import QuotaUsage, UserQuota

__all__ = ["QuotaBody", "QuotaLimitsOut", "QuotaOut", "UserOut"]


class QuotaLimitsOut(BaseModel):
    """A user's effective limits; ``null`` is unlimited."""

    requests_per_minute: int | None
    max_concurrent: int | None
    max_queued: int | None
    gpu_seconds_per_hour: float | None
    max_priority: str
    max_gpu_memory_mb: int | None

    @classmethod
    def of(cls, quota: UserQuota) -> QuotaLimitsOut:
        """The wire form of a quota."""
        return cls(
            requests_per_minute=quota.requests_per_minute,
            max_concurrent=quota.max_concurrent,
            max_queued=quota.max_queued,
            gpu_seconds_per_hour=quota.gpu_seconds_per_hour,
            max_priority=quota.max_priority,
            max_gpu_memory_mb=quota.max_gpu_memory_mb,
        )


class UsageOut(BaseModel):
    """What the user uses right now."""

    requests_last_minute: int
    concurrent: int
    queued: int
    gpu_seconds_last_hour: float

    @classmethod
    def of(cls, usage: QuotaUsage) -> UsageOut:
        """The wire form of live usage."""
        return cls(
            requests_last_minute=usage.requests_last_minute,
            concurrent=usage.concurrent,
            queued=usage.queued,
            gpu_seconds_last_hour=round(usage.gpu_seconds_last_hour, 3),
        )


class QuotaOut(BaseModel):
    """A user's limits and live usage."""

    user: str
    limits: QuotaLimitsOut
    usage: UsageOut


class UserOut(BaseModel):
    """A user known to the router, with their effective limits and live usage."""

    name: str
    role: Literal["admin", "user"]
    quota: QuotaLimitsOut
    usage: UsageOut


class QuotaBody(WireModel):
    """A run-time override of a user's quota: the fields given replace the configured ones.

    ``null`` makes a limit unlimited; a field left out keeps its configured value. The override
    replaces any previous override of the user as a whole.
    """

    requests_per_minute: int | None = Field(None, ge=1, le=10_000_000)
    max_concurrent: int | None = Field(None, ge=1, le=1_000_000)
    max_queued: int | None = Field(None, ge=1, le=10_000_000)
    gpu_seconds_per_hour: float | None = Field(None, gt=0, le=1e12)
    max_priority: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_gpu_memory_mb: int | None = Field(None, ge=1, le=16 * 1024 * 1024)

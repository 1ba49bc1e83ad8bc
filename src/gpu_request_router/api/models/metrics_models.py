"""Wire schema of the JSON metrics summary."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["GpuTotals", "MetricsOut", "Percentiles"]


class Percentiles(BaseModel):
    """Percentiles of recent samples (seconds); ``null`` without samples."""

    p50: float | None
    p90: float | None
    p99: float | None


class GpuTotals(BaseModel):
    """The fleet at a glance."""

    count: int
    schedulable: int
    healthy: int
    memory_total_mb: int
    memory_used_mb: int
    memory_reserved_mb: int
    utilization_pct: float | None = Field(description="Mean over GPUs that report it.")


class MetricsOut(BaseModel):
    """Counts, queue, latencies, throughput and GPUs (GET /v1/metrics).

    The counts (``requests``, ``rejected``, ``retries``) are the caller's own, or every user's
    for an admin, as ``scope`` says; every other field describes the whole fleet.
    """

    scope: Literal["user", "fleet"] = Field(
        description="Whose counts these are: the caller's own (user) or every user's (fleet)."
    )
    requests: dict[str, int] = Field(description="Requests by status: live ones and ended ones.")
    rejected: dict[str, int] = Field(description="Refused submissions by reason.")
    queue_depth: dict[str, int] = Field(
        description="Waiting requests per priority class, every user's."
    )
    queue_wait_s: Percentiles = Field(description="Time queued before dispatch, every user's.")
    latency_s: Percentiles = Field(description="Submit to success, every user's.")
    throughput_rps: float = Field(
        description="Succeeded requests per second of the fleet, recent window."
    )
    retries: dict[str, int] = Field(description="Requests put back in the queue, by reason.")
    gpus: GpuTotals

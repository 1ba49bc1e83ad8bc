"""Wire schema of the JSON metrics summary."""

from __future__ import annotations

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
    """Counts, queue, latencies, throughput and GPUs (GET /v1/metrics)."""

    requests: dict[str, int] = Field(description="Requests by status: live ones and ended ones.")
    rejected: dict[str, int] = Field(description="Refused submissions by reason.")
    queue_depth: dict[str, int] = Field(description="Waiting requests per priority class.")
    queue_wait_s: Percentiles
    latency_s: Percentiles
    throughput_rps: float = Field(description="Succeeded requests per second, recent window.")
    retries: dict[str, int]
    gpus: GpuTotals

"""Wire schema of a GPU (SPEC §5 field names)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from gpu_request_router.http.timestamps import iso
from gpu_request_router.models.gpu_state import GPUState

__all__ = ["GpuOut"]


class GpuOut(BaseModel):
    """One GPU: its latest reading plus the router's reservations and state."""

    id: str = Field(description="<worker>:<index>")
    worker: str
    name: str
    type: str
    uuid: str | None
    memory_total_mb: int
    memory_used_mb: int = Field(description="In use on the device, by anyone (observed).")
    memory_reserved_mb: int = Field(description="Reserved by the router for its placements.")
    memory_free_mb: int = Field(
        description="Free for placement: total − safety margin − reserved − used by others."
    )
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None
    health: Literal["healthy", "degraded", "unhealthy", "unknown"]
    cordoned: bool
    draining: bool
    schedulable: bool
    slots: int
    models_loaded: list[str]
    models_cached: list[str] = Field(
        description="Models whose weights stay on the GPU unused (freed when a load needs room)."
    )
    running_requests: list[str]
    last_seen: str | None

    @classmethod
    def of(cls, gpu: GPUState, running_requests: list[str]) -> GpuOut:
        """The wire form of a GPU."""
        reading = gpu.reading
        return cls(
            id=gpu.id,
            worker=gpu.worker,
            name=reading.name or reading.type,
            type=reading.type,
            uuid=reading.uuid,
            memory_total_mb=reading.memory_total_mb,
            memory_used_mb=reading.memory_used_mb,
            memory_reserved_mb=gpu.reserved_mb,
            memory_free_mb=max(0, gpu.room_mb),
            utilization_pct=reading.utilization_pct,
            temperature_c=reading.temperature_c,
            power_w=reading.power_w,
            health=gpu.health.value,
            cordoned=gpu.cordoned,
            draining=gpu.draining,
            schedulable=gpu.schedulable,
            slots=gpu.slots,
            models_loaded=list(reading.models_loaded),
            models_cached=list(reading.models_cached),
            running_requests=running_requests,
            last_seen=iso(gpu.last_seen),
        )

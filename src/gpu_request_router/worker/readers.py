"""Where a worker's GPU readings come from: NVML on a real host, or a simulated fleet."""

from __future__ import annotations

from typing import Protocol

from gpu_request_router.models.gpu_state import GPUReading

__all__ = ["GpuReader"]


class GpuReader(Protocol):
    """Reads every GPU of this host (a blocking call; the worker runs it in a thread)."""

    def read(self) -> list[GPUReading]:
        """A complete report of the host's GPUs now."""
        ...

"""GPU monitoring sources: where readings come from (SPEC §4 GPU Monitoring System integration).

A source reads the GPUs of one worker and returns a complete report; the router's GPU state
monitor turns readings into health and room. The ``simulated`` source reads an in-process
:class:`~gpu_request_router.services.simulator.SimulatedFleet`.
"""

from __future__ import annotations

from typing import Protocol

from gpu_request_router.models.gpu_state import GPUReading
from gpu_request_router.services.simulator import SimulatedFleet

__all__ = ["GpuSource", "SimulatedSource"]


class GpuSource(Protocol):
    """Reads all GPUs of one worker."""

    worker: str

    async def read(self) -> list[GPUReading]:
        """A complete report of the worker's GPUs; raises when the worker cannot be read."""
        ...


class SimulatedSource:
    """Readings of one simulated worker."""

    def __init__(self, fleet: SimulatedFleet, worker: str) -> None:
        self.worker = worker
        self._fleet = fleet

    async def read(self) -> list[GPUReading]:
        """The simulated worker's GPUs as they are now."""
        return self._fleet.readings(self.worker)

"""Backend clients: what executes a placed request (SPEC §4 AI Orchestrator integration).

A client takes a :class:`~gpu_request_router.core.events.Dispatch` and returns either an
:class:`~gpu_request_router.core.events.ExecutionResult` or a
:class:`~gpu_request_router.core.events.Failure`; it raises only for its own bugs. It calls
``started()`` once the backend has accepted the work. The ``simulated`` client runs on an
in-process :class:`~gpu_request_router.services.simulator.SimulatedFleet` in real time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NoReturn, Protocol

from gpu_request_router.core.events import Dispatch, ExecutionResult, Failure
from gpu_request_router.services.simulator import FAILS_AFTER, SimulatedFleet
from gpu_request_router.utils.clock import Clock

__all__ = ["BackendClient", "SimulatedBackend"]


class BackendClient(Protocol):
    """Executes placed requests on one backend."""

    name: str

    async def execute(
        self, dispatch: Dispatch, started: Callable[[], None]
    ) -> ExecutionResult | Failure:
        """Run one execution to its end; call ``started()`` once the backend accepted it."""
        ...

    async def cancel(self, execution_id: str) -> None:
        """Tell the backend to stop an execution (a no-op for one it does not know)."""
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...


async def _hang() -> NoReturn:
    """Wait until cancelled (a simulated execution that never answers)."""
    await asyncio.Event().wait()
    raise AssertionError("an event nobody sets was set")


class SimulatedBackend:
    """The ``simulated`` backend: executions on a :class:`SimulatedFleet`, in real time."""

    def __init__(self, name: str, fleet: SimulatedFleet, clock: Clock) -> None:
        self.name = name
        self._fleet = fleet
        self._clock = clock

    async def execute(
        self, dispatch: Dispatch, started: Callable[[], None]
    ) -> ExecutionResult | Failure:
        """Hold the execution's memory for its simulated duration, then answer."""
        fleet = self._fleet
        plan = fleet.plan(dispatch)
        refused = fleet.start(dispatch, plan)
        if refused is not None:
            return refused
        began = self._clock.now()
        started()
        try:
            duration = plan.duration_s
            if duration is None:
                await _hang()
            if plan.failure is not None:
                await asyncio.sleep(duration * FAILS_AFTER)
                return plan.failure
            await asyncio.sleep(duration)
            return fleet.finish(dispatch.execution_id, plan, self._clock.now() - began)
        finally:
            fleet.stop(dispatch.execution_id)

    async def cancel(self, execution_id: str) -> None:
        """Free the execution's simulated GPUs."""
        self._fleet.stop(execution_id)

    async def aclose(self) -> None:
        """Nothing to release."""

"""gpu-request-router: a GPU-aware, fair and durable router in front of a fleet of GPUs.

The names below are the public surface; everything else may change between releases.
"""

from gpu_request_router.config.config_loader import Settings, load_settings
from gpu_request_router.core.engine import Engine
from gpu_request_router.core.events import (
    CancelExecution,
    Decision,
    Dispatch,
    ExecutionResult,
    Failure,
    FailureKind,
)
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading
from gpu_request_router.models.request import (
    Estimate,
    Placement,
    Request,
    RequestStatus,
    ResourceHints,
    Shape,
    Task,
)
from gpu_request_router.runtime import Runtime
from gpu_request_router.simulation import Simulation, SimulationReport

__version__ = "0.1.0"

__all__ = [
    "Caller",
    "CancelExecution",
    "Decision",
    "Dispatch",
    "Engine",
    "Estimate",
    "ExecutionResult",
    "Failure",
    "FailureKind",
    "GPUHealth",
    "GPUReading",
    "Placement",
    "Request",
    "RequestStatus",
    "ResourceHints",
    "Runtime",
    "Settings",
    "Shape",
    "Simulation",
    "SimulationReport",
    "Submission",
    "Task",
    "__version__",
    "load_settings",
]

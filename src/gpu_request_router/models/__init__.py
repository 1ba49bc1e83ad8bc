"""Domain models: plain dataclasses with their invariants, free of I/O and wire formats."""

from gpu_request_router.models.gpu_state import GPUHealth, GPUReading, GPUState, gpu_id_for
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES, GPUType, gpu_type
from gpu_request_router.models.request import (
    TERMINAL_STATUSES,
    ErrorInfo,
    Estimate,
    Placement,
    Request,
    RequestStatus,
    ResourceHints,
    Shape,
    Task,
)
from gpu_request_router.models.user_quota import QuotaUsage, UserQuota

__all__ = [
    "BUILTIN_GPU_TYPES",
    "TERMINAL_STATUSES",
    "ErrorInfo",
    "Estimate",
    "GPUHealth",
    "GPUReading",
    "GPUState",
    "GPUType",
    "Placement",
    "QuotaUsage",
    "Request",
    "RequestStatus",
    "ResourceHints",
    "Shape",
    "Task",
    "UserQuota",
    "gpu_id_for",
    "gpu_type",
]

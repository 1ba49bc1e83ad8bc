"""Small functions for ``CallableExecutor`` tests, imported by ``worker_callables:<name>``."""

from __future__ import annotations

import threading
from typing import Any

# Set by a test to let ``blocked`` return (a thread cannot be killed, only released).
RELEASE = threading.Event()


class OutOfMemoryError(RuntimeError):
    """Named like ``torch.cuda.OutOfMemoryError``."""


def echo(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Return what it was called with."""
    return {"gpu_index": gpu_index, "request": request}


def with_peak(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Report a peak at the top level."""
    return {"text": "ok", "peak_memory_mb": 1234.2}


def with_usage_peak(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Report a peak under ``usage``."""
    return {"text": "ok", "usage": {"peak_memory_mb": 777}}


def torch_oom(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Fail as torch does when CUDA memory runs out."""
    raise OutOfMemoryError("Tried to allocate 20.00 MiB")


def message_oom(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Fail with a CUDA out-of-memory message."""
    raise RuntimeError("CUDA error: out of memory")


def bad_value(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Refuse the input with a ValueError."""
    raise ValueError("prompt is empty")


def bad_type(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Refuse the input with a TypeError."""
    raise TypeError("messages must be a list")


def crash(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Fail with an error that is not the input's fault."""
    raise KeyError("weights")


def not_a_dict(gpu_index: int, request: dict[str, Any]) -> Any:
    """Return something that is not a dict."""
    return ["a", "list"]


def not_json(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Return a dict that JSON cannot hold."""
    return {"values": {1, 2}}


def nested_900_deep(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Return an answer nested 900 levels deep (JSON holds it; the router must not keep it)."""
    value: Any = "bottom"
    for _ in range(899):
        value = [value]
    return {"nested": value}


def blocked(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Block until released."""
    RELEASE.wait(10)
    return {"released": True}


NOT_CALLABLE = 42

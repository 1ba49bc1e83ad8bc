"""Ready-made GPU jobs for the ``callable`` executor (``worker.callable: module:function``).

A job is a function ``(gpu_index, request) -> dict`` run in a worker thread: ``request`` has the
request's ``input``, ``model``, ``task``, ``execution_id`` and ``gpu_ids``. The answer is the
request's result; a ``peak_memory_mb`` in it is reported to the router, which learns from it.

:func:`matmul` is a real PyTorch workload for smoke tests and benchmarks of a GPU host
(``scripts/gpu_smoke.sh``). PyTorch is not a dependency of the router: a host that runs this job
needs it installed.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

__all__ = ["matmul"]


def matmul(gpu_index: int, request: dict[str, Any]) -> dict[str, Any]:
    """Multiply ``n`` × ``n`` matrices ``iterations`` times on the GPU; report speed and memory.

    ``input``: ``n`` (default 4096), ``iterations`` (default 20), ``dtype`` (``float16``,
    ``bfloat16`` or ``float32``; default ``bfloat16``).

    Raises:
        ValueError: an input value is out of range (a client error for the router).
    """
    torch: Any = importlib.import_module("torch")
    body = request.get("input") or {}
    size = int(body.get("n", 4096))
    iterations = int(body.get("iterations", 20))
    if not 1 <= size <= 65_536 or not 1 <= iterations <= 100_000:
        raise ValueError("n must be 1 to 65536 and iterations 1 to 100000")
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    dtype = dtypes.get(str(body.get("dtype", "bfloat16")))
    if dtype is None:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}")
    device = torch.device("cuda", gpu_index)
    # The job runs in a worker thread: CUDA is not initialised there until something is
    # allocated, and resetting the statistics before that fails ("Invalid device argument").
    torch.empty(1, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(iterations):
        c = a @ b
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    checksum = float(c[0, 0].float().item())
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "gpu_index": gpu_index,
        "n": size,
        "iterations": iterations,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": round(elapsed, 4),
        "tflops": round(2 * size**3 * iterations / elapsed / 1e12, 2),
        "checksum": checksum,
        "peak_memory_mb": -(-peak // 2**20),
    }

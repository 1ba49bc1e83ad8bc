"""What runs an execution on a worker's GPUs: a simulated fleet, a Python function, or a server.

An :class:`Executor` takes a :class:`Job` (what the router sent in ``POST /v1/executions``) and
the local indexes of the GPUs it was placed on, and returns an
:class:`~gpu_request_router.core.events.ExecutionResult` or a
:class:`~gpu_request_router.core.events.Failure`; it raises only for its own bugs. The worker
runs every execution in its own task and cancels that task to stop it.

* :class:`SimulatedExecutor` runs on an in-process
  :class:`~gpu_request_router.services.simulator.SimulatedFleet`, exactly as the router's own
  ``simulated`` backend does (``input.simulate`` overrides duration, memory and failures);
* :class:`CallableExecutor` calls ``module:function(gpu_index, request) -> dict`` in a thread;
* :class:`OpenAIExecutor` forwards the input to a local OpenAI-compatible server (e.g. vLLM).

Example::

    executor = CallableExecutor("my_models:generate")
    outcome = await executor.execute(job, [0])
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import structlog

from gpu_request_router.config.config_loader import ModelSpec
from gpu_request_router.core.events import Dispatch, ExecutionResult, Failure, FailureKind
from gpu_request_router.core.resource_estimator import ResourceEstimator
from gpu_request_router.exceptions import ConfigError, GpuRouterError
from gpu_request_router.models.request import Estimate, Placement, Request, Shape, Task
from gpu_request_router.services.ai_orchestrator import SimulatedBackend
from gpu_request_router.services.simulator import SimulatedFleet
from gpu_request_router.utils.clock import SystemClock

__all__ = [
    "CallableExecutor",
    "Executor",
    "Job",
    "OpenAIExecutor",
    "SimulatedExecutor",
]

_log = structlog.get_logger(__name__)

# Output tokens per sequence of a simulated answer when the input does not say (max_tokens).
_SIMULATED_OUTPUT_TOKENS = 16
_OPENAI_PATHS = {
    Task.CHAT: "/v1/chat/completions",
    Task.COMPLETION: "/v1/completions",
    Task.EMBEDDING: "/v1/embeddings",
}


@dataclass(frozen=True, slots=True)
class Job:
    """One execution the router sent (the body of ``POST /v1/executions``).

    ``reservations`` holds the memory the router reserved on each GPU of ``gpu_ids`` (MiB);
    ``estimate_memory_mb`` and ``estimate_duration_s`` are the router's estimate per GPU,
    ``estimate_weights_mb`` the weights' share of that memory;
    ``deadline`` (epoch seconds) is when the request expires.
    """

    execution_id: str
    request_id: str
    attempt: int
    model: str
    task: Task
    input: Mapping[str, Any]
    gpu_ids: tuple[str, ...]
    reservations: Mapping[str, int]
    estimate_memory_mb: int
    estimate_duration_s: float
    deadline: float
    worker: str = ""
    estimate_weights_mb: int = 0
    created_at: float = field(default_factory=time.time)

    def request_dict(self, gpu_indexes: Sequence[int]) -> dict[str, Any]:
        """The request as a plain dict (what a callable receives)."""
        return {
            "model": self.model,
            "task": self.task.value,
            "input": dict(self.input),
            "execution_id": self.execution_id,
            "request_id": self.request_id,
            "attempt": self.attempt,
            "gpu_ids": list(self.gpu_ids),
            "gpu_indexes": list(gpu_indexes),
        }


class Executor(Protocol):
    """Runs executions on this worker's GPUs.

    An executor may also have ``async aclose()``; the worker calls it when it stops.
    """

    async def execute(self, job: Job, gpu_indexes: Sequence[int]) -> ExecutionResult | Failure:
        """Run ``job`` on the local GPUs ``gpu_indexes`` to its end (cancel the task to stop it)."""
        ...


_SHAPE_MODEL = "worker"
_SHAPES = ResourceEstimator(
    {
        _SHAPE_MODEL: ModelSpec(
            weights_mb=0, max_context=1_000_000_000, max_output_tokens=_SIMULATED_OUTPUT_TOKENS
        )
    },
    {},
)


def _shape(task: Task, input: Mapping[str, Any]) -> Shape:
    """The size of an input as the router counts it (an uncountable input: one short answer)."""
    try:
        return _SHAPES.shape_of(_SHAPE_MODEL, task, input, None)
    except GpuRouterError:
        return Shape(1, 0, _SIMULATED_OUTPUT_TOKENS)


class SimulatedExecutor:
    """Executions on a :class:`SimulatedFleet` in real time, as the ``simulated`` backend runs them.

    The job becomes a :class:`~gpu_request_router.core.events.Dispatch` whose estimate is the
    router's, so by default an execution takes the router's estimated duration and holds the
    memory the router reserved; ``input.simulate`` overrides that (see
    :mod:`gpu_request_router.services.simulator`). Cancelling the task frees its memory.
    """

    def __init__(self, fleet: SimulatedFleet) -> None:
        self.fleet = fleet
        self._backend = SimulatedBackend("worker", fleet, SystemClock())

    def dispatch_of(self, job: Job) -> Dispatch:
        """The dispatch the router would have made for ``job``."""
        gpu_type = self.fleet.gpu_types[job.gpu_ids[0]]
        estimate = Estimate(
            gpu_memory_mb=job.estimate_memory_mb,
            weights_mb=job.estimate_weights_mb,
            kv_cache_mb=job.estimate_memory_mb - job.estimate_weights_mb,
            activations_mb=0,
            duration_s={gpu_type: job.estimate_duration_s},
            gpu_count=len(job.gpu_ids),
        )
        request = Request(
            id=job.request_id,
            user="worker",
            model=job.model,
            task=job.task,
            priority="normal",
            estimate=estimate,
            created_at=job.created_at,
            input=job.input,
            shape=_shape(job.task, job.input),
        )
        return Dispatch(
            request=request,
            execution_id=job.execution_id,
            attempt=job.attempt,
            backend=job.worker or "worker",
            placement=Placement(job.worker, job.gpu_ids, "worker"),
            reservations={
                gpu_id: job.reservations.get(gpu_id, job.estimate_memory_mb)
                for gpu_id in job.gpu_ids
            },
            deadline=job.deadline,
        )

    async def execute(self, job: Job, gpu_indexes: Sequence[int]) -> ExecutionResult | Failure:
        """Hold the job's memory on the simulated GPUs for its duration, then answer."""
        unknown = [gpu_id for gpu_id in job.gpu_ids if gpu_id not in self.fleet.gpu_types]
        if unknown:
            return Failure(FailureKind.CLIENT_ERROR, f"unknown GPU(s): {', '.join(unknown)}")
        return await self._backend.execute(self.dispatch_of(job), _nothing)


def _nothing() -> None:
    """A ``started`` callback nobody needs."""


def _is_oom(error: BaseException) -> bool:
    """Whether an exception is a GPU out-of-memory (``torch.cuda.OutOfMemoryError`` and kin)."""
    name = type(error).__name__.lower()
    return "outofmemory" in name or "out of memory" in str(error).lower()


def _peak_of(output: Mapping[str, Any]) -> int | None:
    """The peak memory an answer reports: ``peak_memory_mb`` or ``usage.peak_memory_mb``."""
    value = output.get("peak_memory_mb")
    usage = output.get("usage")
    if value is None and isinstance(usage, Mapping):
        value = usage.get("peak_memory_mb")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return max(0, math.ceil(value))


class CallableExecutor:
    """Calls ``module:function(gpu_index, request) -> dict`` in a thread for each execution.

    ``gpu_index`` is the local index of the first GPU of the placement; ``request`` holds
    ``model``, ``task``, ``input``, ``execution_id``, ``request_id``, ``attempt``, ``gpu_ids``
    and ``gpu_indexes``. The returned dict (JSON-able) is the output; a ``peak_memory_mb`` in it
    (or in its ``usage``) is reported as the peak memory, else the peak is unknown. GPU-seconds
    are the wall time × the GPUs.

    Errors: an exception that says CUDA ran out of memory (``torch.cuda.OutOfMemoryError``,
    "out of memory") is an out-of-memory failure; ``ValueError`` and ``TypeError`` are client
    errors (bad input: retrying cannot help); anything else is a backend error.

    Cancelling: a thread cannot be killed. Cancelling the execution ends its task at once, so the
    worker frees its slot and memory accounting and the router moves on, but the function runs
    on in its thread until it returns, and its result is then discarded.

    Raises:
        ConfigError: the module cannot be imported or has no such function.
    """

    def __init__(self, target: str) -> None:
        module_name, _, function_name = target.partition(":")
        if not module_name or not function_name:
            raise ConfigError("worker.callable", f"{target!r} is not module:function")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                "worker.callable", f"cannot import module {module_name!r}: {exc}"
            ) from exc
        function = getattr(module, function_name, None)
        if not callable(function):
            raise ConfigError(
                "worker.callable", f"module {module_name!r} has no function {function_name!r}"
            )
        self.target = target
        self._function: Callable[[int, dict[str, Any]], Any] = function

    async def execute(self, job: Job, gpu_indexes: Sequence[int]) -> ExecutionResult | Failure:
        """Call the function on the first GPU of the placement, in a worker thread."""
        began = time.monotonic()
        first = gpu_indexes[0] if gpu_indexes else 0
        try:
            output = await asyncio.to_thread(self._function, first, job.request_dict(gpu_indexes))
        except Exception as exc:
            return self._failure(exc)
        elapsed = time.monotonic() - began
        if not isinstance(output, dict):
            return Failure(
                FailureKind.BACKEND_ERROR,
                f"{self.target} returned {type(output).__name__}, not a dict",
            )
        try:
            json.dumps(output, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return Failure(FailureKind.BACKEND_ERROR, f"{self.target} returned non-JSON: {exc}")
        return ExecutionResult(
            output=output,
            gpu_seconds=elapsed * max(1, len(gpu_indexes)),
            peak_memory_mb=_peak_of(output),
        )

    def _failure(self, error: Exception) -> Failure:
        message = f"{type(error).__name__}: {error}"
        if _is_oom(error):
            return Failure(FailureKind.OUT_OF_MEMORY, message)
        if isinstance(error, ValueError | TypeError):
            return Failure(FailureKind.CLIENT_ERROR, message)
        _log.warning("callable_failed", target=self.target, error=message)
        return Failure(FailureKind.BACKEND_ERROR, message)


class OpenAIExecutor:
    """Forwards each execution to a local OpenAI-compatible server (vLLM, TGI, llama.cpp ...).

    The input goes as the body of ``/v1/chat/completions``, ``/v1/completions`` or
    ``/v1/embeddings`` by task (``model`` added when the input has none); the JSON answer is the
    output. A 4xx answer is a client error (429 and 408, the server being busy, a backend
    error); a 5xx a backend error (out-of-memory where its text says so); a server that cannot
    be reached is unreachable. The server does not report memory: the peak is unknown. One
    pooled :class:`httpx.AsyncClient` serves every execution; :meth:`aclose` closes it.
    """

    def __init__(
        self, url: str, *, connect_timeout_s: float = 5.0, max_connections: int = 256
    ) -> None:
        self.url = url.rstrip("/")
        self._connect_timeout_s = connect_timeout_s
        self._client = httpx.AsyncClient(
            base_url=self.url,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )

    async def execute(self, job: Job, gpu_indexes: Sequence[int]) -> ExecutionResult | Failure:
        """Send the input to the server's endpoint for the task and wait for its answer."""
        path = _OPENAI_PATHS.get(job.task)
        if path is None:
            return Failure(
                FailureKind.CLIENT_ERROR,
                f"an OpenAI-compatible server does not serve task {job.task.value}",
            )
        body = dict(job.input)
        body.setdefault("model", job.model)
        remaining = job.deadline - time.time()
        if remaining <= 0:
            return Failure(FailureKind.TIMEOUT, "the deadline passed before the call")
        timeout = httpx.Timeout(remaining, connect=min(self._connect_timeout_s, remaining))
        began = time.monotonic()
        try:
            response = await self._client.post(path, json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                return Failure(FailureKind.UNREACHABLE, f"{self.url}: connect timed out")
            return Failure(FailureKind.TIMEOUT, f"{self.url} did not answer before the deadline")
        except httpx.ConnectError as exc:
            return Failure(FailureKind.UNREACHABLE, f"{self.url}: {exc}")
        except httpx.HTTPError as exc:
            return Failure(FailureKind.BACKEND_ERROR, f"{self.url}: {type(exc).__name__}: {exc}")
        elapsed = time.monotonic() - began
        if response.status_code >= 400:
            return _http_failure(response)
        try:
            output = response.json()
        except ValueError:
            return Failure(
                FailureKind.BACKEND_ERROR, f"{path} answered {response.status_code} without JSON"
            )
        return ExecutionResult(
            output=output, gpu_seconds=elapsed * max(1, len(gpu_indexes)), peak_memory_mb=None
        )

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._client.aclose()


def _http_failure(response: httpx.Response) -> Failure:
    """The failure an error answer of an OpenAI-compatible server means."""
    status = response.status_code
    text = response.text[:500]
    message = f"{response.request.url.path} answered {status}: {text}"
    if "out of memory" in text.lower():
        return Failure(FailureKind.OUT_OF_MEMORY, message)
    if status in (408, 429) or status >= 500:
        return Failure(FailureKind.BACKEND_ERROR, message)
    return Failure(FailureKind.CLIENT_ERROR, message)

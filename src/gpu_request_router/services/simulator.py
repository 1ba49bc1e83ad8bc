"""A simulated GPU fleet (SPEC §6 "Simulated execution"), free of time and I/O.

It models GPUs of real types (their real memory), accounts memory for real (an execution holds
its peak memory on each of its GPUs while it runs), limits concurrency by slots, and answers
like a real backend: OpenAI-shaped output for chat, completion and embedding, an out-of-memory
failure when an execution does not fit beside what already runs. Both drivers use it: the
discrete-event :class:`~gpu_request_router.simulation.Simulation` in virtual time, and the
asyncio ``simulated`` backend client in real time.

By default an execution takes the estimated duration on its GPU type and uses the memory the
router reserved for it; a backend whose ``service`` is ``shared`` also shares GPUs and loads
models on demand (:class:`SimulatedFleet`). A request's ``input`` may carry ``simulate`` to
override that::

    {"simulate": {"duration_s": 0.5, "peak_memory_mb": 2000,
                  "failure": "error" | "oom" | "hang", "fail_attempts": 1, "output": {...}}}

``duration_s`` may also be an object of durations by GPU type (``{"H100-80GB": 0.5,
"L4-24GB": 2.0}``: the one of the execution's GPU type, else the estimate).
``failure`` applies to the first ``fail_attempts`` attempts (default: all); ``hang`` never
finishes by itself; ``output`` is returned as the result.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpu_request_router.config.config_loader import BackendSettings, Settings
from gpu_request_router.core.events import Dispatch, ExecutionResult, Failure, FailureKind
from gpu_request_router.core.resource_estimator import ResourceEstimator
from gpu_request_router.core.service_model import ServiceModel
from gpu_request_router.models.gpu_state import GPUHealth, GPUReading, gpu_id_for
from gpu_request_router.models.gpu_types import gpu_type
from gpu_request_router.models.request import Request, Task

__all__ = ["FAILS_AFTER", "Plan", "SimulatedFleet", "openai_output", "plan_execution"]

# Share of its duration after which an execution set to fail reports its failure.
FAILS_AFTER = 0.1

# Board power (W) of the built-in types, for plausible power readings.
_POWER_W = {"H100-80GB": 700.0, "A100-80GB": 400.0, "H200-141GB": 700.0, "L4-24GB": 72.0}
_WORDS = (
    "the", "router", "placed", "this", "request", "on", "a", "GPU", "with", "room",
    "for", "it", "and", "backend", "answered", "in", "deterministic", "words",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Plan:
    """How one execution will go: its duration (``None``: hangs), memory, failure and output."""

    duration_s: float | None
    peak_memory_mb: Mapping[str, int]
    failure: Failure | None
    output: Any


def _non_negative(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value >= 0
    )


def _simulate_spec(request: Request) -> dict[str, Any]:
    spec = request.input.get("simulate") if isinstance(request.input, Mapping) else None
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ValueError("input.simulate must be an object")
    allowed = {"duration_s", "peak_memory_mb", "failure", "fail_attempts", "output"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"input.simulate: unknown field(s) {', '.join(sorted(unknown))}")
    for name in ("duration_s", "peak_memory_mb", "fail_attempts"):
        value = spec.get(name)
        if name == "duration_s" and isinstance(value, Mapping):
            if not value or not all(_non_negative(v) for v in value.values()):
                raise ValueError(
                    "input.simulate.duration_s must be a non-negative number, or an object of "
                    "them by GPU type"
                )
        elif value is not None and not _non_negative(value):
            raise ValueError(f"input.simulate.{name} must be a non-negative number")
    if spec.get("failure") not in (None, "error", "oom", "hang"):
        raise ValueError("input.simulate.failure must be error, oom or hang")
    return dict(spec)


def plan_execution(
    dispatch: Dispatch, gpu_types: Mapping[str, str], *, shared: bool = False
) -> Plan:
    """Decide how ``dispatch`` will run on the simulated GPUs of types ``gpu_types`` (by id).

    Its duration is the one alone on its GPU type. Its peak memory per GPU is, by default, what
    the router reserved there (``shared``: the request's whole estimate, weights included,
    since a shared GPU accounts the weights apart).
    """
    request = dispatch.request
    try:
        spec = _simulate_spec(request)
    except ValueError as exc:
        return Plan(0.0, {}, Failure(FailureKind.CLIENT_ERROR, str(exc)), None)
    first_type = gpu_types[dispatch.placement.gpu_id]
    duration = spec.get("duration_s")
    if isinstance(duration, Mapping):
        duration = duration.get(first_type)
    if duration is None:
        duration = request.estimate.duration_on(first_type)
    peak_override = spec.get("peak_memory_mb")
    if peak_override is None and shared:
        peak_override = request.estimate.gpu_memory_mb
    peaks = {
        gpu_id: int(peak_override) if peak_override is not None else reserved
        for gpu_id, reserved in dispatch.reservations.items()
    }
    failure: Failure | None = None
    mode = spec.get("failure")
    fail_attempts = spec.get("fail_attempts")
    if mode is not None and (fail_attempts is None or dispatch.attempt <= fail_attempts):
        if mode == "hang":
            return Plan(None, peaks, None, None)
        if mode == "oom":
            needed = max(peaks.values(), default=0)
            failure = Failure(
                FailureKind.OUT_OF_MEMORY,
                f"CUDA out of memory: tried to allocate {needed} MiB (simulated)",
                peak_memory_mb=needed,
            )
        else:
            failure = Failure(FailureKind.BACKEND_ERROR, "simulated backend error")
    output = spec["output"] if "output" in spec else openai_output(request)
    return Plan(float(duration), peaks, failure, output)


def _words(seed: str, count: int) -> str:
    start = hashlib.sha256(seed.encode()).digest()[0]
    size = len(_WORDS)
    return " ".join([_WORDS[(start + i) % size] for i in range(count)])


def _embedding(seed: str, dimensions: int = 8) -> list[float]:
    digest = hashlib.sha256(seed.encode()).digest()
    raw = [(byte - 127.5) / 127.5 for byte in digest[:dimensions]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


_TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")


def openai_output(request: Request) -> Any:
    """A well-formed OpenAI-style answer for the request's task (deterministic).

    A chat or text answer ends for ``length`` when the call set a token limit (its words are
    that many), and for ``stop`` otherwise.
    """
    shape = request.shape
    limited = any(request.input.get(key) is not None for key in _TOKEN_LIMITS)
    finish = "length" if limited else "stop"
    created = int(request.created_at)
    usage_in = shape.batch_size * shape.input_tokens
    usage_out = shape.batch_size * shape.output_tokens
    usage = {
        "prompt_tokens": usage_in,
        "completion_tokens": usage_out,
        "total_tokens": usage_in + usage_out,
    }
    if request.task is Task.CHAT:
        return {
            "id": f"chatcmpl-{request.id}",
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": [
                {
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": _words(f"{request.id}:{index}", shape.output_tokens),
                    },
                    "finish_reason": finish,
                }
                for index in range(shape.batch_size)
            ],
            "usage": usage,
        }
    if request.task is Task.COMPLETION:
        return {
            "id": f"cmpl-{request.id}",
            "object": "text_completion",
            "created": created,
            "model": request.model,
            "choices": [
                {
                    "index": index,
                    "text": _words(f"{request.id}:{index}", shape.output_tokens),
                    "finish_reason": finish,
                    "logprobs": None,
                }
                for index in range(shape.batch_size)
            ],
            "usage": usage,
        }
    if request.task is Task.EMBEDDING:
        return {
            "object": "list",
            "model": request.model,
            "data": [
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": _embedding(f"{request.id}:{index}"),
                }
                for index in range(shape.batch_size)
            ],
            "usage": {"prompt_tokens": usage_in, "total_tokens": usage_in},
        }
    return {"status": "ok", "model": request.model}


@dataclass(slots=True)
class _SimGPU:
    worker: str
    index: int
    type: str
    backend: str
    memory_total_mb: int
    slots: int
    models: tuple[str, ...]
    pinned: tuple[str, ...]
    pinned_mb: int
    shared: bool
    # execution -> memory it holds: its whole peak (fixed), its peak without the weights (shared)
    running: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    # shared: weights resident beside the pinned ones, (model, MiB) -> MiB, least recently used
    # first; how many executions use each; when each one's load ends
    cached: dict[tuple[str, int], int] = field(default_factory=dict)
    users: dict[tuple[str, int], int] = field(default_factory=dict)
    ready: dict[tuple[str, int], float] = field(default_factory=dict)
    lost: bool = False
    ecc_uncorrected: int = 0

    @property
    def used_mb(self) -> int:
        """Memory counted as used: pinned weights, weights in use, what executions hold."""
        in_use = sum(self.cached[key] for key in self.users)
        return self.pinned_mb + in_use + sum(self.running.values())

    @property
    def held_mb(self) -> int:
        """Memory the device holds: the above and the cached weights nobody uses."""
        return self.pinned_mb + sum(self.cached.values()) + sum(self.running.values())

    def room_after_evicting(self, keep: tuple[str, int]) -> int:
        """Free memory once every cached model but ``keep`` that nobody uses is evicted."""
        idle = sum(mb for key, mb in self.cached.items() if key != keep and key not in self.users)
        return self.memory_total_mb - self.held_mb + idle

    def evict_for(self, needed_mb: int, keep: tuple[str, int]) -> None:
        """Evict unused cached models, least recently used first, until ``needed_mb`` is free."""
        for key in list(self.cached):
            if self.memory_total_mb - self.held_mb >= needed_mb:
                return
            if key != keep and key not in self.users:
                del self.cached[key]
                self.ready.pop(key, None)


@dataclass(slots=True)
class _Run:
    """An execution that runs to its end: its work left and its progress (shared GPUs)."""

    gpu_ids: tuple[str, ...]
    task: Task
    work_s: float  # seconds of work left at full speed
    ready_at: float  # its weights are loaded
    updated_at: float
    rate: float = 1.0
    due: float = 0.0


class SimulatedFleet:
    """The GPUs of the ``simulated`` backends of a configuration, with real memory accounting.

    Each backend is one worker named after it; its GPUs are ``<backend>:<index>``.
    ``weights_mb`` gives the weights of each model in ``models_loaded`` (resident on every GPU
    of that backend, counted as memory used by others).

    A backend's ``service`` says how its GPUs serve (``service`` the constants):

    - ``fixed``: an execution takes its planned duration whatever else runs, and holds its whole
      peak memory, weights included, while it runs; no load is ever waited for, so readings list
      every model of ``weights_mb`` the GPU serves and does not run as ``models_cached`` (ready
      without a cold start);
    - ``shared``: executions on one GPU share it (:class:`ServiceModel`: each runs
      ``1 + α·(n − 1)`` times slower among ``n``, re-evaluated whenever one starts or ends), and
      weights are loaded on demand and kept: an execution whose model's weights are not on the
      GPU first loads them (``weights ÷ load bandwidth``), evicting unused cached weights, least
      recently used first, where it needs the room; after the last execution of a model ends,
      its weights stay cached (readings list them in ``models_cached``, not counted as used)
      until evicted. An execution holds its peak without the weights (its request's per-GPU
      weights share), the weights once per GPU.

    :meth:`due` tells when an execution will end as things stand, :meth:`changed` which ends
    moved since it was last asked.
    """

    def __init__(
        self,
        backends: Sequence[BackendSettings],
        weights_mb: Mapping[str, int] | None = None,
        service: ServiceModel | None = None,
    ) -> None:
        self._gpus: dict[str, _SimGPU] = {}
        self._executions: dict[str, tuple[str, ...]] = {}
        self._runs: dict[str, _Run] = {}
        self._weights_of: dict[str, tuple[str, int]] = {}
        self._changed: set[str] = set()
        self._used_mb = 0  # memory counted as used on every GPU together, since _used_at
        self._used_at = 0.0
        self.memory_mb_seconds = 0.0  # that memory integrated over time
        self.loads = 0  # weights loaded onto a shared GPU (cold starts), ever
        self.service = service or ServiceModel.of()
        weights = weights_mb or {}
        self._catalog = tuple(sorted(weights))
        for backend in backends:
            if backend.kind != "simulated":
                continue
            resident = sum(weights.get(model, 0) for model in backend.models_loaded)
            index = 0
            for group in backend.gpus:
                kind = gpu_type(group.type, group.memory_mb)
                for _ in range(group.count):
                    gpu = _SimGPU(
                        worker=backend.name,
                        index=index,
                        type=kind.name,
                        backend=backend.name,
                        memory_total_mb=kind.memory_mb,
                        slots=backend.slots_per_gpu,
                        models=tuple(backend.models),
                        pinned=tuple(backend.models_loaded),
                        pinned_mb=resident,
                        shared=backend.service == "shared",
                    )
                    self._gpus[gpu_id_for(backend.name, index)] = gpu
                    index += 1
        self._types = {gpu_id: gpu.type for gpu_id, gpu in self._gpus.items()}

    @classmethod
    def for_engine(cls, settings: Settings, estimator: ResourceEstimator) -> SimulatedFleet:
        """The fleet of ``settings``' simulated backends, with model weights from ``estimator``."""
        weights = {
            name: -(-estimator.profile(name).weights_bytes // 2**20) for name in settings.models
        }
        return cls(settings.backends, weights, ServiceModel.of(settings.placement.service))

    @property
    def workers(self) -> list[str]:
        """The simulated workers (one per simulated backend)."""
        return sorted({gpu.worker for gpu in self._gpus.values()})

    @property
    def gpu_types(self) -> Mapping[str, str]:
        """The type of each simulated GPU, by id."""
        return self._types

    def readings(self, worker: str) -> list[GPUReading]:
        """What a monitor reading ``worker`` sees now (lost GPUs are missing)."""
        return [
            self._reading(gpu)
            for gpu in self._gpus.values()
            if gpu.worker == worker and not gpu.lost
        ]

    def _reading(self, gpu: _SimGPU) -> GPUReading:
        busy = len(gpu.running)
        utilization = 0.0 if busy == 0 else min(100.0, 40.0 + 60.0 * busy / gpu.slots)
        board = _POWER_W.get(gpu.type, 700.0)
        loaded = gpu.pinned + tuple(model for model, _ in gpu.users)
        return GPUReading(
            worker=gpu.worker,
            index=gpu.index,
            type=gpu.type,
            memory_total_mb=gpu.memory_total_mb,
            memory_used_mb=gpu.used_mb,
            memory_reserved_mb=sum(gpu.reserved.values()),
            backend=gpu.backend,
            name=f"Simulated {gpu.type}",
            uuid=f"GPU-sim-{gpu.worker}-{gpu.index}",
            utilization_pct=utilization,
            temperature_c=30.0 + 0.45 * utilization,
            power_w=round(board * (0.1 + 0.9 * utilization / 100.0), 1),
            health=GPUHealth.HEALTHY,
            ecc_uncorrected=gpu.ecc_uncorrected,
            slots=gpu.slots,
            models=gpu.models,
            models_loaded=loaded,
            models_cached=self._cached(gpu, loaded),
        )

    def _cached(self, gpu: _SimGPU, loaded: tuple[str, ...]) -> tuple[str, ...]:
        """Weights a GPU can run at once that no execution holds (class docstring)."""
        if gpu.shared:
            return tuple(key[0] for key in gpu.cached if key not in gpu.users)
        return tuple(
            model
            for model in self._catalog
            if model not in loaded and ("*" in gpu.models or model in gpu.models)
        )

    def plan(self, dispatch: Dispatch) -> Plan:
        """How ``dispatch`` will go (see :func:`plan_execution`)."""
        shared = self._gpus[dispatch.placement.gpu_id].shared
        return plan_execution(dispatch, self.gpu_types, shared=shared)

    def start(self, dispatch: Dispatch, plan: Plan, now: float = 0.0) -> Failure | None:
        """Begin an execution at ``now``: hold its memory and slots, or say why it cannot run.

        A GPU without room for the execution's peak memory answers out-of-memory (nothing is
        held); a lost GPU is unreachable; a repeated execution id is not started twice.
        """
        execution_id = dispatch.execution_id
        if execution_id in self._executions:
            return None
        if plan.failure is not None and plan.failure.kind is FailureKind.CLIENT_ERROR:
            return plan.failure
        gpu_ids = dispatch.placement.gpu_ids
        gpus = [self._gpus[gpu_id] for gpu_id in gpu_ids]
        for gpu in gpus:
            if gpu.lost:
                return Failure(FailureKind.UNREACHABLE, f"GPU {gpu.worker}:{gpu.index} is gone")
            if len(gpu.running) >= gpu.slots:
                return Failure(FailureKind.BACKEND_ERROR, "no free slot (simulated)")
        request = dispatch.request
        key = (request.model, request.estimate.weights_mb)
        needs: list[int] = []
        for gpu_id, gpu in zip(gpu_ids, gpus, strict=True):
            peak = plan.peak_memory_mb.get(gpu_id, 0)
            if not gpu.shared:
                need, free = peak, gpu.memory_total_mb - gpu.used_mb
            else:
                need = max(0, peak - key[1])
                if request.model not in gpu.pinned and key not in gpu.cached:
                    need += key[1]
                free = gpu.room_after_evicting(key)
            if need > free:
                return Failure(
                    FailureKind.OUT_OF_MEMORY,
                    f"CUDA out of memory: tried to allocate {need} MiB with "
                    f"{max(0, free)} MiB free (simulated)",
                    peak_memory_mb=peak,
                )
            needs.append(need)
        ready_at = now
        before = self._account(gpus, now)
        for gpu_id, gpu, need in zip(gpu_ids, gpus, needs, strict=True):
            gpu.reserved[execution_id] = dispatch.reservations.get(gpu_id, 0)
            if not gpu.shared:
                gpu.running[execution_id] = need
                continue
            gpu.evict_for(need, key)
            if request.model not in gpu.pinned:
                if key not in gpu.cached:
                    gpu.ready[key] = now + self.service.load_s(key[1])
                    self.loads += 1
                gpu.cached[key] = gpu.cached.pop(key, key[1])  # the most recently used now
                gpu.users[key] = gpu.users.get(key, 0) + 1
                ready_at = max(ready_at, gpu.ready[key])
            gpu.running[execution_id] = max(0, plan.peak_memory_mb.get(gpu_id, 0) - key[1])
        self._used_mb += sum(gpu.used_mb for gpu in gpus) - before
        self._executions[execution_id] = gpu_ids
        self._weights_of[execution_id] = key
        if plan.duration_s is not None and plan.failure is None:
            run = _Run(gpu_ids, request.task, plan.duration_s, ready_at, now)
            run.due = now + run.work_s
            self._runs[execution_id] = run
            self._changed.add(execution_id)
        self._reshare(gpu_ids, now)
        return None

    def _reshare(self, gpu_ids: Sequence[str], now: float) -> None:
        """Bring the runs on shared ``gpu_ids`` up to ``now``, at the speed of who shares now."""
        if not gpu_ids or not self._gpus[gpu_ids[0]].shared:
            return
        runs = self._runs
        touched = {e for gpu_id in gpu_ids for e in self._gpus[gpu_id].running if e in runs}
        service = self.service
        for execution_id in touched:
            run = runs[execution_id]
            began = max(run.updated_at, run.ready_at)
            if now > began:
                run.work_s = max(0.0, run.work_s - (now - began) * run.rate)
            run.updated_at = now
            sharing = max(len(self._gpus[gpu_id].running) for gpu_id in run.gpu_ids)
            run.rate = 1.0 / service.slowdown(run.task, sharing)
            due = max(now, run.ready_at) + run.work_s / run.rate
            if due != run.due:
                run.due = due
                self._changed.add(execution_id)

    def due(self, execution_id: str) -> float | None:
        """When the execution will end as things stand (``None``: it does not run to an end)."""
        run = self._runs.get(execution_id)
        return None if run is None else run.due

    def changed(self) -> dict[str, float]:
        """The executions whose end moved (or was set) since the last call, with their ends."""
        moved = {e: self._runs[e].due for e in self._changed if e in self._runs}
        self._changed.clear()
        return moved

    def running(self, execution_id: str) -> bool:
        """Whether the execution holds GPUs now."""
        return execution_id in self._executions

    def finish(
        self, execution_id: str, plan: Plan, duration_s: float, now: float = 0.0
    ) -> ExecutionResult:
        """End an execution that ran ``duration_s``: free its GPUs and report what it used."""
        run = self._runs.get(execution_id)
        load = 0.0 if run is None else max(0.0, run.ready_at - (now - duration_s))
        gpu_ids = self.stop(execution_id, now)
        peak = max((plan.peak_memory_mb.get(gpu_id, 0) for gpu_id in gpu_ids), default=0)
        return ExecutionResult(
            output=plan.output,
            gpu_seconds=duration_s * len(gpu_ids),
            peak_memory_mb=peak,
            load_s=min(load, duration_s),
        )

    def stop(self, execution_id: str, now: float = 0.0) -> tuple[str, ...]:
        """Free an execution's GPUs (finished, failed or cancelled) at ``now``; return them.

        Its model's weights stay cached on shared GPUs.
        """
        gpu_ids = self._executions.pop(execution_id, ())
        key = self._weights_of.pop(execution_id, None)
        self._runs.pop(execution_id, None)
        self._changed.discard(execution_id)
        gpus = [self._gpus[gpu_id] for gpu_id in gpu_ids]
        before = self._account(gpus, now)
        for gpu in gpus:
            gpu.running.pop(execution_id, None)
            gpu.reserved.pop(execution_id, None)
            if key is not None and key in gpu.users:
                gpu.users[key] -= 1
                if not gpu.users[key]:
                    del gpu.users[key]
        self._used_mb += sum(gpu.used_mb for gpu in gpus) - before
        self._reshare(gpu_ids, now)
        return gpu_ids

    def _account(self, gpus: Sequence[_SimGPU], now: float) -> int:
        """Integrate the memory used up to ``now``; return what ``gpus`` use before a change."""
        if now > self._used_at:
            self.memory_mb_seconds += self._used_mb * (now - self._used_at)
            self._used_at = now
        return sum(gpu.used_mb for gpu in gpus)

    def lose_gpu(self, gpu_id: str, now: float = 0.0) -> list[str]:
        """The GPU disappears (falls off the bus); return the executions that died with it."""
        gpu = self._gpus[gpu_id]
        gpu.lost = True
        dead = [
            execution_id for execution_id, gpu_ids in self._executions.items() if gpu_id in gpu_ids
        ]
        for execution_id in dead:
            self.stop(execution_id, now)
        gpu.cached.clear()
        gpu.ready.clear()
        return dead

    def restore_gpu(self, gpu_id: str) -> None:
        """A lost GPU comes back, empty."""
        self._gpus[gpu_id].lost = False

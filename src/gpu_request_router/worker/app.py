"""The worker agent's HTTP API (SPEC §6, router → worker), assembled in one place.

``gpurouter worker`` runs this application on a GPU host. It reports the host's GPUs, runs the
executions the router sends, stops them on request, and (with ``worker.router_url``) registers
with the router and heartbeats. Every ``/v1`` call needs ``Authorization: Bearer
<auth.worker_token>`` when a worker token is configured.

* ``GET /v1/gpus`` → ``{"items": [gpu, ...]}``, one reading per GPU; ``memory_reserved_mb`` and
  ``running`` are the worker's own accounting (the reservations of the executions it runs);
* ``POST /v1/executions`` runs one execution to its end: **200** ``{"output", "usage":
  {"gpu_seconds", "peak_memory_mb", "load_s"}}`` (``load_s``: the time spent loading weights),
  **507** ``{"error": "gpu_out_of_memory", "message",
  "peak_memory_mb"}``, 4xx problem details for bad input (422; 409 for GPUs of another worker,
  or an execution cancelled), 5xx ``{"error": <failure kind>, "message"}`` for failures (500
  backend error or no free slot, 502 unreachable, 503 worker shutting down, 504 timeout);
* ``DELETE /v1/executions/{id}`` → ``{"cancelled": true|false}``;
* ``GET /v1/executions/{id}[?wait=S]`` → what became of an execution (asked by a router after a
  restart): **404** when unknown, else **200** ``{"execution_id", "state"}`` with ``state``
  ``running``, ``succeeded`` (with ``output`` and ``usage``), or ``failed`` / ``cancelled``
  (with the ``status`` its POST answers, ``error``, ``message``, ``peak_memory_mb``); with
  ``wait`` (0 to :data:`MAX_LOOKUP_WAIT_S` seconds) a running one is waited on that long first;
* ``GET /healthz`` → 200.

An execution id is executed once: a second POST with the id while it runs waits for the same
outcome; one after it finished gets the stored outcome (the last :data:`KEEP_FINISHED`
outcomes, for :data:`KEEP_FINISHED_S` seconds).

Example::

    app = create_worker_app(load_settings(overrides={"worker": {"simulate": "2xH100-80GB"}}))
    uvicorn.run(app, host="127.0.0.1", port=9090)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import re
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Annotated, Any, cast

import httpx
import structlog
import uvicorn
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gpu_request_router import __version__
from gpu_request_router.config.config_loader import (
    BackendSettings,
    GpuGroup,
    ServiceSettings,
    Settings,
    WorkerSettings,
)
from gpu_request_router.core.events import ExecutionResult, Failure, FailureKind
from gpu_request_router.core.service_model import ServiceModel
from gpu_request_router.exceptions import ConfigError
from gpu_request_router.http.body_limit import BodyLimitMiddleware
from gpu_request_router.http.docs_page import install_docs_page
from gpu_request_router.http.keys import bearer_key
from gpu_request_router.http.problems import (
    install_error_handlers,
    problem_response,
)
from gpu_request_router.http.request_context import RequestContextMiddleware
from gpu_request_router.http.timestamps import iso
from gpu_request_router.models.gpu_state import GPUReading
from gpu_request_router.models.request import Task, duration_on
from gpu_request_router.services.simulator import SimulatedFleet
from gpu_request_router.utils.json_values import first_problem
from gpu_request_router.utils.serving import AnnouncingServer
from gpu_request_router.worker.executors import (
    CallableExecutor,
    Executor,
    Job,
    OpenAIExecutor,
    SimulatedExecutor,
)
from gpu_request_router.worker.readers import GpuReader

__all__ = [
    "KEEP_FINISHED",
    "KEEP_FINISHED_S",
    "MAX_LOOKUP_WAIT_S",
    "ExecutionIn",
    "SimulatedReader",
    "Worker",
    "WorkerServer",
    "create_worker_app",
    "simulated_fleet",
    "worker_name",
]

_log = structlog.get_logger(__name__)

KEEP_FINISHED = 4096  # finished outcomes kept for repeated POSTs, at most
KEEP_FINISHED_S = 900.0  # ... and for this long
MAX_LOOKUP_WAIT_S = 60.0  # the longest a GET of an execution may wait for it to end
_CANCEL_WAIT_S = 5.0
_MAX_HEARTBEAT_TIMEOUT_S = 10.0
_STATUS = {
    FailureKind.CLIENT_ERROR: 422,
    FailureKind.OUT_OF_MEMORY: 507,
    FailureKind.BACKEND_ERROR: 500,
    FailureKind.UNREACHABLE: 502,
    FailureKind.WORKER_LOST: 503,
    FailureKind.TIMEOUT: 504,
}


def worker_name(settings: WorkerSettings) -> str:
    """The worker's name: ``worker.name``, else ``<host>-<port>`` (made a valid name).

    The port tells apart the workers of one host, so their GPU ids (``<name>:<index>``) never
    collide; ``<host>`` is this host's short name (``worker`` when it has none usable).
    """
    if settings.name:
        return settings.name
    suffix = f"-{settings.port}"
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])
    host = host.lstrip("._-")[: 128 - len(suffix)]
    return f"{host or 'worker'}{suffix}"


def simulated_fleet(
    name: str, settings: WorkerSettings, service: ServiceSettings | None = None
) -> SimulatedFleet:
    """The simulated GPUs ``worker.simulate`` describes (``4xH100-80GB[,2xL4-24GB]``).

    They serve as ``worker.simulate_service`` says, with ``service``'s constants (the
    ``placement.service`` section).

    Raises:
        ConfigError: ``simulate`` is unset or names a GPU type that is not built in.
    """
    if not settings.simulate:
        raise ConfigError("worker.simulate", "no simulated GPUs are configured")
    groups = []
    for part in settings.simulate.split(","):
        count, _, kind = part.partition("x")
        try:
            groups.append(GpuGroup(type=kind, count=int(count)))
        except ValueError as exc:
            raise ConfigError(
                "worker.simulate", str(exc).splitlines()[-1].strip().removeprefix("Value error, ")
            ) from exc
    backend = BackendSettings(
        name=name,
        kind="simulated",
        gpus=groups,
        slots_per_gpu=settings.slots,
        service=settings.simulate_service,
    )
    return SimulatedFleet([backend], service=ServiceModel.of(service))


class SimulatedReader:
    """Readings of one worker of a :class:`SimulatedFleet` (cheap; read on the event loop)."""

    blocking = False

    def __init__(self, fleet: SimulatedFleet, worker: str) -> None:
        self.fleet = fleet
        self.worker = worker

    def read(self) -> list[GPUReading]:
        """Every simulated GPU of the worker now."""
        return self.fleet.readings(self.worker)


def _nvml_reader(name: str, slots: int) -> GpuReader:
    """The NVML reader of this host (imported only when not simulating)."""
    try:
        module = importlib.import_module("gpu_request_router.worker.nvml")
    except ImportError as exc:
        raise ConfigError(
            "worker.simulate", f"cannot read GPUs with NVML ({exc}); give --simulate to simulate"
        ) from exc
    return cast(GpuReader, module.NvmlReader(name, slots=slots))


class _EstimateIn(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    gpu_memory_mb: int = Field(ge=0)
    weights_mb: int = Field(0, ge=0)  # the per-GPU share of the weights within gpu_memory_mb
    # Seconds, or seconds by GPU type (as the router's estimate holds them).
    duration_s: Annotated[float, Field(ge=0)] | dict[str, Annotated[float, Field(ge=0)]]

    def duration_on(self, gpu_type: str) -> float:
        """The estimated duration on ``gpu_type`` (the slowest listed type when it is not)."""
        if isinstance(self.duration_s, float | int):
            return float(self.duration_s)
        return duration_on(self.duration_s, gpu_type)


class ExecutionIn(BaseModel):
    """The body of ``POST /v1/executions``: one attempt of a request, placed on this worker."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    execution_id: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._:-]+$")
    request_id: str = Field(min_length=1, max_length=256)
    attempt: int = Field(ge=1)
    model: str = Field(min_length=1, max_length=200)
    task: Task
    input: dict[str, Any] = Field(default_factory=dict)
    gpu_ids: list[str] = Field(min_length=1, max_length=64)
    reservations: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    estimate: _EstimateIn
    deadline: float


class _Refused(Exception):
    """A POST refused before anything ran (problem details, nothing stored)."""

    def __init__(self, status: int, detail: str, kind: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind


@dataclass(frozen=True, slots=True)
class _Cancelled:
    """The outcome of an execution stopped by ``DELETE``."""


_CANCELLED = _Cancelled()
_Outcome = ExecutionResult | Failure | _Cancelled


@dataclass(frozen=True, slots=True)
class _Running:
    """What ``GET /v1/executions/{id}`` says of an execution that has not ended."""


_RUNNING = _Running()


@dataclass(slots=True)
class _Execution:
    job: Job
    task: asyncio.Task[ExecutionResult | Failure]
    stopped: _Outcome | None = None

    def outcome(self) -> _Outcome:
        if self.task.cancelled():
            return self.stopped or _CANCELLED
        return self.task.result()


class Worker:
    """The worker's state: its GPUs, the executions it runs, and their memory accounting.

    Single-threaded on the event loop (no locks): a POST checks and records an execution id
    without awaiting in between, so two POSTs of one id cannot both start it.
    """

    def __init__(
        self, settings: Settings, name: str, reader: GpuReader, executor: Executor
    ) -> None:
        self.settings = settings
        self.name = name
        self.reader = reader
        self.executor = executor
        section = settings.worker
        self.url = (
            section.advertise_url or f"http://{_advertised_host(section.host)}:{section.port}"
        )
        self._running: dict[str, _Execution] = {}
        self._finished: OrderedDict[str, tuple[float, _Outcome]] = OrderedDict()
        # gpu id -> {execution id: reserved MiB}
        self._accounting: dict[str, dict[str, int]] = {}
        self._known: dict[str, GPUReading] = {}
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_lock = asyncio.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the event loop the worker runs on (for :meth:`drain_threadsafe`)."""
        self._loop = loop

    def drain_threadsafe(self, grace_s: float) -> None:
        """Start draining, from any thread or a signal handler.

        The worker takes no new executions and stops those still running after ``grace_s``
        seconds (their callers get 503, worker lost).
        """
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._drain, grace_s)

    def _drain(self, grace_s: float) -> None:
        self._closing = True
        assert self._loop is not None
        self._loop.call_later(grace_s, self._stop_all)

    def _stop_all(self) -> list[_Execution]:
        """Cancel every running execution; its callers get 503 (worker lost)."""
        executions = list(self._running.values())
        for execution in executions:
            if not execution.task.done():
                execution.stopped = Failure(
                    FailureKind.WORKER_LOST, f"worker {self.name} shut down"
                )
                execution.task.cancel()
        return executions

    async def read(self) -> list[GPUReading]:
        """A complete reading of the host's GPUs (NVML in a thread, so the loop is not held).

        Blocking readers are read one call at a time (the heartbeat and ``GET /v1/gpus`` may
        overlap).
        """
        if getattr(self.reader, "blocking", True):
            async with self._read_lock:
                readings = await asyncio.to_thread(self.reader.read)
        else:
            readings = self.reader.read()
        self._known = {reading.gpu_id: reading for reading in readings}
        return readings

    def gpu_dict(self, reading: GPUReading, now: float) -> dict[str, Any]:
        """The wire form of one GPU reading, with the worker's accounting."""
        running = self._accounting.get(reading.gpu_id, {})
        return {
            "id": reading.gpu_id,
            "worker": reading.worker,
            "index": reading.index,
            "name": reading.name or reading.type,
            "type": reading.type,
            "uuid": reading.uuid,
            "memory_total_mb": reading.memory_total_mb,
            "memory_used_mb": reading.memory_used_mb,
            "memory_reserved_mb": sum(running.values()),
            "utilization_pct": reading.utilization_pct,
            "temperature_c": reading.temperature_c,
            "power_w": reading.power_w,
            "health": reading.health.value,
            "ecc_uncorrected": reading.ecc_uncorrected,
            "slots": reading.slots,
            "models_loaded": list(reading.models_loaded),
            "models_cached": list(reading.models_cached),
            "running": sorted(running),
            "last_seen": iso(now),
        }

    async def gpus(self) -> list[dict[str, Any]]:
        """Every GPU of the host now, in wire form."""
        readings = await self.read()
        now = time.time()
        return [self.gpu_dict(reading, now) for reading in readings]

    async def submit(self, body: ExecutionIn) -> _Outcome:
        """Run an execution to its end, or join the one of that id; return its outcome.

        Raises:
            _Refused: the body names GPUs that are not this worker's, or is inconsistent.
        """
        if any(gpu_id not in self._known for gpu_id in body.gpu_ids):
            await self.read()
        # No await from here until the execution is recorded: one id, one execution.
        running = self._running.get(body.execution_id)
        if running is not None:
            return await self._wait(running)
        self._prune(time.monotonic())
        finished = self._finished.get(body.execution_id)
        if finished is not None:
            return finished[1]
        job, indexes = self._job(body)
        refused = self._admit(job)
        if refused is not None:
            return refused
        for gpu_id, mb in job.reservations.items():
            self._accounting.setdefault(gpu_id, {})[job.execution_id] = mb
        task = asyncio.create_task(self._run(job, indexes), name=f"execution {job.execution_id}")
        execution = _Execution(job, task)
        self._running[job.execution_id] = execution
        task.add_done_callback(lambda _: self._done(execution))
        return await self._wait(execution)

    async def _wait(self, execution: _Execution) -> _Outcome:
        # Not the task itself: a caller that goes away must not cancel the execution.
        await asyncio.wait({execution.task})
        return execution.outcome()

    def _job(self, body: ExecutionIn) -> tuple[Job, list[int]]:
        if len(set(body.gpu_ids)) != len(body.gpu_ids):
            raise _Refused(422, "gpu_ids: a GPU is named twice", "validation-error")
        foreign = [gpu_id for gpu_id in body.gpu_ids if gpu_id not in self._known]
        if foreign:
            raise _Refused(
                409,
                f"GPU(s) {', '.join(foreign)} are not GPUs of worker {self.name}",
                "not-this-worker",
            )
        stray = sorted(set(body.reservations) - set(body.gpu_ids))
        if stray:
            raise _Refused(
                422, f"reservations: {', '.join(stray)} not in gpu_ids", "validation-error"
            )
        reservations = {
            gpu_id: body.reservations.get(gpu_id, body.estimate.gpu_memory_mb)
            for gpu_id in body.gpu_ids
        }
        job = Job(
            execution_id=body.execution_id,
            request_id=body.request_id,
            attempt=body.attempt,
            model=body.model,
            task=body.task,
            input=body.input,
            gpu_ids=tuple(body.gpu_ids),
            reservations=reservations,
            estimate_memory_mb=body.estimate.gpu_memory_mb,
            estimate_weights_mb=min(body.estimate.weights_mb, body.estimate.gpu_memory_mb),
            estimate_duration_s=body.estimate.duration_on(self._known[body.gpu_ids[0]].type),
            deadline=body.deadline,
            worker=self.name,
        )
        return job, [self._known[gpu_id].index for gpu_id in body.gpu_ids]

    def _admit(self, job: Job) -> Failure | None:
        """Why the job cannot start now (nothing is stored then), or ``None``."""
        if self._closing:
            return Failure(FailureKind.WORKER_LOST, f"worker {self.name} is shutting down")
        for gpu_id in job.gpu_ids:
            if len(self._accounting.get(gpu_id, {})) >= self._known[gpu_id].slots:
                return Failure(FailureKind.BACKEND_ERROR, f"no free slot on GPU {gpu_id}")
        return None

    async def _run(self, job: Job, indexes: Sequence[int]) -> ExecutionResult | Failure:
        """The executor's outcome; an output that cannot be sent as JSON is a failure.

        (A lone surrogate or a number that is not finite would make the answer itself fail,
        an opaque 500; nesting past the router's limit would be refused there.)
        """
        try:
            async with asyncio.timeout(job.deadline - time.time()):
                outcome = await self.executor.execute(job, indexes)
        except TimeoutError:
            return Failure(FailureKind.TIMEOUT, "the deadline passed before the execution ended")
        except Exception as exc:
            _log.exception("executor_failed", execution_id=job.execution_id)
            return Failure(FailureKind.BACKEND_ERROR, f"the executor failed: {exc!r}")
        if isinstance(outcome, ExecutionResult):
            problem = first_problem(outcome.output)
            if problem is not None:
                message = f"the executor's output cannot be sent as JSON: {problem.at('output')}"
                return Failure(FailureKind.BACKEND_ERROR, message)
        return outcome

    def _done(self, execution: _Execution) -> None:
        """Release the execution's accounting and store its outcome.

        The first done-callback of its task, so this runs before any waiter resumes.
        """
        job = execution.job
        for gpu_id in job.reservations:
            held = self._accounting.get(gpu_id)
            if held is not None:
                held.pop(job.execution_id, None)
                if not held:
                    del self._accounting[gpu_id]
        self._running.pop(job.execution_id, None)
        now = time.monotonic()
        self._finished[job.execution_id] = (now, execution.outcome())
        self._finished.move_to_end(job.execution_id)
        self._prune(now)

    def _prune(self, now: float) -> None:
        finished = self._finished
        while finished and (
            len(finished) > KEEP_FINISHED
            or next(iter(finished.values()))[0] < now - KEEP_FINISHED_S
        ):
            finished.popitem(last=False)

    async def look_up(self, execution_id: str, wait_s: float = 0.0) -> _Outcome | _Running | None:
        """What became of an execution: its outcome, still running, or ``None`` (unknown).

        A running one is waited on for up to ``wait_s`` seconds first (not cancelled when the
        caller goes away).
        """
        running = self._running.get(execution_id)
        if running is not None:
            if wait_s > 0:
                await asyncio.wait({running.task}, timeout=wait_s)
            return running.outcome() if running.task.done() else _RUNNING
        self._prune(time.monotonic())
        finished = self._finished.get(execution_id)
        return None if finished is None else finished[1]

    async def cancel(self, execution_id: str) -> bool:
        """Stop a running execution (its task is cancelled, its memory freed); ``False``: none."""
        execution = self._running.get(execution_id)
        if execution is None or execution.task.done():
            return False
        execution.stopped = _CANCELLED
        execution.task.cancel()
        await asyncio.wait({execution.task}, timeout=_CANCEL_WAIT_S)
        return True

    async def close(self) -> None:
        """Stop every execution (their callers get 503 worker lost) and the executor."""
        self._closing = True
        executions = self._stop_all()
        if executions:
            await asyncio.wait({execution.task for execution in executions}, timeout=_CANCEL_WAIT_S)
        close = getattr(self.executor, "aclose", None)
        if close is not None:
            await close()

    async def heartbeat(self, router_url: str, token: str | None, every_s: float) -> None:
        """Register with the router and heartbeat every ``every_s`` seconds, until cancelled.

        Each beat POSTs ``{name, url, gpus}`` to ``{router_url}/v1/workers``; failures are
        logged (the first of a run as a warning) and the worker keeps trying.
        """
        endpoint = router_url.rstrip("/") + "/v1/workers"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        timeout = httpx.Timeout(min(_MAX_HEARTBEAT_TIMEOUT_S, max(1.0, 2 * every_s)))
        failing = False
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
            while True:
                try:
                    body = {"name": self.name, "url": self.url, "gpus": await self.gpus()}
                    response = await client.post(endpoint, json=body)
                    response.raise_for_status()
                except Exception as exc:
                    log = _log.debug if failing else _log.warning
                    log("heartbeat_failed", router_url=endpoint, error=repr(exc))
                    failing = True
                else:
                    if failing:
                        _log.info("heartbeat_restored", router_url=endpoint)
                    failing = False
                await asyncio.sleep(every_s)


def _advertised_host(host: str) -> str:
    """A host name the router can call back (a wildcard address means this host's name)."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return socket.getfqdn()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _WorkerAuth:
    """Requires ``Authorization: Bearer <worker token>`` on ``/v1/`` calls (constant time)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if self.token is not None and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            key = bearer_key(scope)
            presented = key.encode("utf-8", "surrogateescape") if key else b""
            if not hmac.compare_digest(presented, self.token):
                response = problem_response(
                    Request(scope),
                    401,
                    "a valid worker token is required: Authorization: Bearer <auth.worker_token>",
                    kind="unauthenticated",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _usage(result: ExecutionResult) -> dict[str, Any]:
    """What a finished execution used, as the router reads it."""
    return {
        "gpu_seconds": result.gpu_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "load_s": result.load_s,
    }


def _render(request: Request, outcome: _Outcome) -> JSONResponse:
    """The answer of ``POST /v1/executions`` for an outcome."""
    if isinstance(outcome, ExecutionResult):
        return JSONResponse({"output": outcome.output, "usage": _usage(outcome)})
    if isinstance(outcome, _Cancelled):
        return problem_response(
            request,
            409,
            "the execution was cancelled",
            kind="execution-cancelled",
            error="cancelled",
            message="the execution was cancelled",
        )
    status = _STATUS.get(outcome.kind, 500)
    if outcome.kind is FailureKind.CLIENT_ERROR:
        return problem_response(
            request,
            status,
            outcome.message,
            kind="client-error",
            error=outcome.kind.value,
            message=outcome.message,
        )
    body: dict[str, Any] = {"error": outcome.kind.value, "message": outcome.message}
    if outcome.kind is FailureKind.OUT_OF_MEMORY:
        body["peak_memory_mb"] = outcome.peak_memory_mb
    return JSONResponse(body, status_code=status)


def _state(execution_id: str, known: _Outcome | _Running) -> dict[str, Any]:
    """The answer of ``GET /v1/executions/{id}`` for an execution the worker knows."""
    if isinstance(known, _Running):
        return {"execution_id": execution_id, "state": "running"}
    if isinstance(known, ExecutionResult):
        return {
            "execution_id": execution_id,
            "state": "succeeded",
            "output": known.output,
            "usage": _usage(known),
        }
    if isinstance(known, _Cancelled):
        return {
            "execution_id": execution_id,
            "state": "cancelled",
            "status": 409,
            "error": "cancelled",
            "message": "the execution was cancelled",
            "peak_memory_mb": None,
        }
    return {
        "execution_id": execution_id,
        "state": "failed",
        "status": _STATUS.get(known.kind, 500),
        "error": known.kind.value,
        "message": known.message,
        "peak_memory_mb": known.peak_memory_mb,
    }


def create_worker_app(
    settings: Settings,
    *,
    reader: GpuReader | None = None,
    executor: Executor | None = None,
) -> FastAPI:
    """Build the worker agent's HTTP application for ``settings`` (its ``worker`` section).

    With ``worker.simulate`` the GPUs are a :class:`SimulatedFleet` of one backend named after the
    worker, else they are read with NVML. ``reader`` and ``executor`` replace the ones the
    settings name (``worker.executor``: ``simulated`` needs ``worker.simulate``). With
    ``worker.router_url`` the lifespan registers the worker with the router and heartbeats.

    Raises:
        ConfigError: the settings ask for something this host cannot do (see above).
    """
    section = settings.worker
    name = worker_name(section)
    fleet = simulated_fleet(name, section, settings.placement.service) if section.simulate else None
    if reader is None:
        reader = (
            SimulatedReader(fleet, name) if fleet is not None else _nvml_reader(name, section.slots)
        )
    if executor is None:
        executor = _executor(section, fleet)
    worker = Worker(settings, name, reader, executor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.bind(asyncio.get_running_loop())
        heartbeat = None
        if section.router_url:
            heartbeat = asyncio.create_task(
                worker.heartbeat(
                    section.router_url, settings.auth.worker_token, section.heartbeat_s
                ),
                name="worker heartbeat",
            )
        try:
            yield
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            await worker.close()

    app = FastAPI(
        title="gpu-request-router worker",
        version=__version__,
        description="The worker agent on a GPU host: its GPUs, and the executions it runs.",
        lifespan=lifespan,
        docs_url=None,
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    install_docs_page(app)
    app.state.worker = worker
    install_error_handlers(app)
    # Added innermost first: request context, then the worker token, then the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes)
    app.add_middleware(_WorkerAuth, token=settings.auth.worker_token)
    app.add_middleware(RequestContextMiddleware)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The worker is up."""
        return {"status": "ok", "worker": worker.name}

    @app.get("/v1/gpus", tags=["gpus"])
    async def gpus(request: Request) -> Any:
        """Every GPU of this host: a reading each, with the worker's memory accounting."""
        try:
            items = await worker.gpus()
        except Exception as exc:
            _log.exception("gpu_read_failed")
            return problem_response(request, 503, f"cannot read the GPUs: {exc}")
        return {"items": items}

    @app.post("/v1/executions", tags=["executions"])
    async def execute(body: ExecutionIn, request: Request) -> Any:
        """Run one execution to its end (or join the one of that id) and answer its outcome."""
        try:
            outcome = await worker.submit(body)
        except _Refused as refused:
            return problem_response(request, refused.status, refused.detail, kind=refused.kind)
        return _render(request, outcome)

    @app.get("/v1/executions/{execution_id}", tags=["executions"])
    async def look_up(
        execution_id: str,
        request: Request,
        wait: Annotated[
            float,
            Query(
                ge=0,
                le=MAX_LOOKUP_WAIT_S,
                allow_inf_nan=False,
                description="Wait up to this many seconds for a running execution to end.",
            ),
        ] = 0.0,
    ) -> Any:
        """What became of an execution: running, or its outcome; 404 when unknown."""
        known = await worker.look_up(execution_id, wait)
        if known is None:
            return problem_response(
                request,
                404,
                f"execution {execution_id} is not known to worker {worker.name}",
                kind="execution-not-found",
            )
        return _state(execution_id, known)

    @app.delete("/v1/executions/{execution_id}", tags=["executions"])
    async def cancel(execution_id: str) -> dict[str, bool]:
        """Stop an execution; ``cancelled`` is false for one that is not running."""
        return {"cancelled": await worker.cancel(execution_id)}

    return app


class WorkerServer(AnnouncingServer):
    """A uvicorn server for the worker app that drains executions on SIGTERM / SIGINT.

    uvicorn waits for open connections before the application's shutdown; a hanging execution
    would hold its POST open until that wait times out and then answer 500. Here, on the signal,
    the worker takes no new executions, lets running ones finish for ``grace_s`` seconds, then
    stops them, so their callers get 503 ``worker_lost`` (the router retries elsewhere). Give
    uvicorn a ``timeout_graceful_shutdown`` longer than ``grace_s``. ``announce`` is called once
    the server accepts connections.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        worker: Worker,
        announce: Callable[[], None],
        grace_s: float = 5.0,
    ) -> None:
        super().__init__(config, announce)
        self.worker = worker
        self.grace_s = grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Start draining the worker, then exit as uvicorn does."""
        if not self.should_exit:
            self.worker.drain_threadsafe(self.grace_s)
        super().handle_exit(sig, frame)


def _executor(section: WorkerSettings, fleet: SimulatedFleet | None) -> Executor:
    if section.executor == "callable":
        assert section.callable is not None  # the settings' validator ensures it
        return CallableExecutor(section.callable)
    if section.executor == "openai":
        assert section.openai_url is not None
        return OpenAIExecutor(section.openai_url)
    if fleet is None:
        raise ConfigError(
            "worker.executor",
            "the simulated executor needs simulated GPUs (worker.simulate, e.g. 4xH100-80GB); "
            "use executor callable or openai on real GPUs",
        )
    return SimulatedExecutor(fleet)

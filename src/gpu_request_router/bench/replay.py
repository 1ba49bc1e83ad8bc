"""``gpurouter bench replay``: a real trace through the real engine, in virtual time, per policy.

Each trace row becomes one submission to a :class:`~gpu_request_router.simulation.Simulation`
(the real receiver, queue, estimator, load balancer and router over a simulated fleet), at
``timestamp_s / load_scale``. Every placement policy runs the same arrivals on a fresh engine.

**Truth versus estimate.** The router sees what a client sends: the prompt (its token count
is exact) and no ``max_tokens``, so it assumes the model's default ``max_output_tokens`` (256 for
the built-in catalog) — it cannot know how long the answer will be. The simulated GPU runs the
row's *true* shape: ``input.simulate`` carries the true peak memory per GPU and the true
duration, both computed before the run, with a fresh estimator (no learning yet), from
``ResourceEstimator.estimate(model, Shape(1, input_tokens, output_tokens))`` — weights plus the KV
cache of every token actually held, and the duration alone on each GPU type of the fleet (the
row's ``gpu_memory_mb`` / ``duration_s`` win where the trace gives them). An answer longer than
256 tokens therefore needs more memory than was reserved; where a GPU is packed tightly, the
simulated device runs out of memory, the router grows the estimate and retries: real
out-of-memory events, as in production. Prompt plus output beyond the model's context is clipped
(the output first) and the clipped rows counted.

**The service model** (``--service``): ``shared`` (the default) runs the simulated GPUs by
:class:`~gpu_request_router.core.service_model.ServiceModel` — executions sharing a GPU slow each
other down, and a model's weights are loaded on demand and cached (``SimulatedFleet``) — so an
execution takes its true duration alone on its GPU's type, slowed by what shares the GPU, plus
the load of its weights where the GPU held no copy; ``fixed`` is the earlier model, each
execution taking its true duration on its GPU's type whatever else runs.

**Models.** Rows that name no model take ``--model``, or with ``--models a,b,...`` a Zipf(1) draw
over that list, the first the most asked for, keyed by ``blake2b("model:<seed>:<i>")``
(:func:`assign_models`).

**Users.** A row that names a user keeps it. Otherwise row *i* (0-based, in file order) goes to
user ``u01`` … ``uNN`` (``--users``, default 16) by a Zipf(1) draw: ``x = blake2b("<seed>:<i>")``
read as a uniform number in [0, 1), then the first user *k* whose cumulative weight
``(1/1 + … + 1/k) / (1/1 + … + 1/N)`` exceeds ``x``. The assignment depends only on the row's
index, ``--users`` and ``--seed``: the same for every policy, every load scale and any
``--limit``. With 16 users, ``u01`` sends about 30% of the rows and ``u16`` about 2%.

**Metrics** (per policy and load scale, from the simulation's records):

- ``p50_queue_wait_s``, ``p90_queue_wait_s``, ``p99_queue_wait_s``, ``p999_queue_wait_s``
  (99.9th), ``mean_queue_wait_s``: time spent queued (every attempt's wait), over all accepted
  requests; percentiles interpolate linearly;
- ``p50_latency_s``, ``p99_latency_s``: end to end, ``finished − created``, over completed ones;
- ``slo_attainment``: completed within ``--slo-s`` (default 30 s) end to end, over all submitted
  rows (a request that failed, expired or was rejected missed its objective);
- ``gpu_memory_utilization``: time-weighted mean of the true peak memory of the running
  executions over the fleet's total memory, ``Σ peak × GPUs × (finished − started) / (fleet
  memory × makespan)`` (on shared GPUs, which hold a model's weights once however many
  executions use them: the memory the fleet counted as used, integrated over the makespan);
  ``gpu_memory_reserved_utilization`` is the same with the router's (final) estimate instead of
  the true peak;
- ``oom_events``: out-of-memory failures (retried and final);
- ``jain_fairness``: Jain's index ``(Σx)² / (n·Σx²)`` over users of ``x_u`` = the user's mean
  *bounded slowdown*, ``latency / max(service, τ)`` with ``service = finished − started`` and
  ``τ`` = 1 s (:data:`SLOWDOWN_FLOOR_S`), over completed requests: 1 when every user's requests
  are slowed down alike, 1/n when one user takes all the waiting;
- ``throughput_rps``: completed / makespan, the makespan running from the first arrival to the
  last request's end;
- ``completed`` (succeeded), ``failed``, ``expired``, ``cancelled``, ``rejected``, ``submitted``,
  ``clipped_rows``, ``retries``, ``makespan_s``;
- ``cold_starts``: loads of a model's weights onto a GPU (shared GPUs only; 0 on fixed ones);
  ``completed_by_gpu_type``: completed requests by the type of GPU they ran on;
- ``duration_error_by_tenth``: the estimator's duration error, ten figures, one per tenth of the
  trace's rows (in file order): the median over the tenth's completed requests of
  ``|estimated / true − 1|``, the estimate being the duration the router issued at admission on
  the GPU type the request ran on (``None`` for a tenth with none completed).

**A wrong catalog on purpose.** ``catalog_duration_scale`` S (``--catalog-duration-scale``) gives
the router a catalog whose durations are S× the truth: for every model, its prefill and decode
throughput on every GPU type of the fleet (as the true catalog gives them, scaled or roofline
included) divided by S, and ``default_duration_s`` times S. The true durations and memory are
computed from the true catalog as above, so the router's duration learning has S to find. With
``known_output`` (``--known-output``) a chat or completion row's input carries ``max_tokens`` = its
true answer length (when at least 1), so the router estimates the shape that runs and a duration
error is the catalog's alone; without it, the error also holds the unknown answer length.

Requests never time out during a replay (their timeout is ``server.max_timeout_s``), quotas and
the router's bound on waiting requests are unlimited, and there is one simulated worker holding
every GPU of ``--gpus``.
"""

from __future__ import annotations

import hashlib
import math
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.table import Table

from gpu_request_router.bench.provenance import capture
from gpu_request_router.bench.report import write_json
from gpu_request_router.bench.traces import (
    FORMATS,
    TraceError,
    TraceRow,
    detect_format,
    read_trace,
)
from gpu_request_router.config.config_loader import Settings, Throughput, load_settings
from gpu_request_router.core.engine import fleet_gpu_types
from gpu_request_router.core.load_balancer import POLICIES
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.core.resource_estimator import ResourceEstimator
from gpu_request_router.exceptions import ConfigError
from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES
from gpu_request_router.models.request import (
    Request,
    RequestStatus,
    ResourceHints,
    Shape,
    Task,
    Transition,
)
from gpu_request_router.simulation import Simulation, SimulationReport
from gpu_request_router.testing import UNLIMITED_QUOTA

__all__ = [
    "DEFAULT_POLICIES",
    "DEFAULT_SWEEP",
    "ETA_TOLERANCE_S",
    "GENERIC_MODEL",
    "REQUIRED_METRICS",
    "SERVICES",
    "SLOWDOWN_FLOOR_S",
    "EtaProbe",
    "Fleet",
    "PlannedRow",
    "PolicyResult",
    "assign_models",
    "assign_users",
    "command",
    "duration_errors",
    "jain_index",
    "parse_gpus",
    "percentile",
    "plan_rows",
    "replay",
    "replay_settings",
    "run_all",
    "scaled_catalog",
    "summarize",
    "user_of",
    "write_plot",
]

DEFAULT_POLICIES: Final = tuple(POLICIES)
DEFAULT_SWEEP: Final = (0.5, 0.75, 1.0, 1.5, 2.0)
REQUIRED_METRICS: Final = (
    "p50_queue_wait_s",
    "p99_queue_wait_s",
    "p99_latency_s",
    "slo_attainment",
    "gpu_memory_utilization",
    "oom_events",
    "jain_fairness",
    "throughput_rps",
    "completed",
)
SLOWDOWN_FLOOR_S: Final = 1.0
SERVICES: Final = ("shared", "fixed")
GENERIC_MODEL: Final = "generic"
# A catalog entry for trace rows that are jobs rather than LLM calls (Alibaba pods).
_GENERIC_SPEC: Final[Mapping[str, Any]] = {"task": "generic", "weights_mb": 0}
_OOM: Final = "gpu_out_of_memory"
# A chat message costs its text plus these tokens (role, separators, the reply's header).
_CHAT_OVERHEAD_TOKENS: Final = 6
_DIGITS: Final = 6
_TENTHS: Final = 10


# The fleet -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fleet:
    """GPUs to simulate: groups of (type, count), all on one simulated worker."""

    groups: tuple[tuple[str, int], ...]

    @property
    def gpu_count(self) -> int:
        """How many GPUs in all."""
        return sum(count for _, count in self.groups)

    @property
    def memory_mb(self) -> int:
        """Total memory of the fleet (MiB)."""
        return sum(BUILTIN_GPU_TYPES[kind].memory_mb * count for kind, count in self.groups)

    @property
    def first_type(self) -> str:
        """The type of the first group: true durations are taken on it."""
        return self.groups[0][0]

    def __str__(self) -> str:
        return ",".join(f"{count}x{kind}" for kind, count in self.groups)


def parse_gpus(spec: str) -> Fleet:
    """Parse ``NxTYPE[,NxTYPE...]`` (e.g. ``8xH100-80GB,4xA100-80GB``) of built-in GPU types.

    Raises:
        ValueError: malformed, a count below 1, or a type that is not built in.
    """
    groups: list[tuple[str, int]] = []
    known = ", ".join(BUILTIN_GPU_TYPES)
    for part in spec.split(","):
        text = part.strip()
        count, sep, kind = text.partition("x")
        if not sep or not count.strip().isdigit() or not kind.strip():
            raise ValueError(f"{text!r} is not NxTYPE, e.g. 8xH100-80GB")
        if int(count) < 1:
            raise ValueError(f"{text!r}: the count must be at least 1")
        kind = kind.strip()
        if kind not in BUILTIN_GPU_TYPES:
            raise ValueError(f"{text!r}: unknown GPU type {kind!r} (known: {known})")
        groups.append((kind, int(count)))
    return Fleet(tuple(groups))


# Users -----------------------------------------------------------------------------------------


def _zipf_cumulative(users: int) -> list[float]:
    weights = [1.0 / rank for rank in range(1, users + 1)]
    total = sum(weights)
    cumulative, running = [], 0.0
    for weight in weights:
        running += weight
        cumulative.append(running / total)
    return cumulative


def _user_name(rank: int, users: int) -> str:
    return f"u{rank:0{max(2, len(str(users)))}d}"


def user_of(index: int, *, users: int = 16, seed: int = 0) -> str:
    """The user of row ``index`` (0-based) among ``users``, a Zipf(1) draw keyed by the seed."""
    return assign_users([TraceRow(0.0)], users=users, seed=seed, start=index)[0]


def _zipf_rank(cumulative: Sequence[float], key: str) -> int:
    """A Zipf draw (1-based rank) keyed by ``key``: ``blake2b(key)`` as a uniform number."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2.0**64
    return min(bisect_right(cumulative, draw), len(cumulative) - 1) + 1


def assign_users(
    rows: Sequence[TraceRow], *, users: int = 16, seed: int = 0, start: int = 0
) -> list[str]:
    """The user of every row: its own, else a deterministic Zipf(1) draw (module docstring)."""
    if users < 1:
        raise ValueError("users must be at least 1")
    cumulative = _zipf_cumulative(users)
    result = []
    for offset, row in enumerate(rows):
        if row.user is not None:
            result.append(row.user)
            continue
        rank = _zipf_rank(cumulative, f"{seed}:{start + offset}")
        result.append(_user_name(rank, users))
    return result


def assign_models(rows: Sequence[TraceRow], models: Sequence[str], *, seed: int = 0) -> list[str]:
    """The model of every row: its own, else a Zipf(1) draw over ``models``.

    The first model is the most asked for; the draw is keyed by ``model:<seed>:<row index>``,
    independent of the users' draw.
    """
    if not models:
        raise ValueError("give at least one model")
    cumulative = _zipf_cumulative(len(models))
    return [
        row.model or models[_zipf_rank(cumulative, f"model:{seed}:{index}") - 1]
        for index, row in enumerate(rows)
    ]


# Settings and submissions ----------------------------------------------------------------------


def replay_settings(
    fleet: Fleet,
    policy: str,
    *,
    seed: int = 0,
    slots: int = 8,
    config: str | Path | None = None,
    starvation_bound_s: float | None = None,
    service: str = "shared",
) -> Settings:
    """Settings of a replay: ``config`` (or the defaults), with the replay's fleet and policy.

    Memory store, no auth, unlimited quotas and queue, one simulated worker ``sim`` with every
    GPU of ``fleet``, ``slots`` executions per GPU and the ``service`` model (``shared`` or
    ``fixed``), ``placement.policy`` = ``policy`` seeded with ``seed`` (and
    ``placement.starvation_bound_s`` when given), and a ``generic`` catalog model (no weights)
    for job traces.
    """
    base = load_settings(config)
    models: dict[str, Any] = {}
    if GENERIC_MODEL not in base.models:
        models[GENERIC_MODEL] = dict(_GENERIC_SPEC)
    placement: dict[str, Any] = {"policy": policy, "seed": seed}
    if starvation_bound_s is not None:
        placement["starvation_bound_s"] = starvation_bound_s
    overrides: dict[str, Any] = {
        "auth": {"enabled": False},
        "state": {"backend": "memory"},
        "quotas": {"default": dict(UNLIMITED_QUOTA), "users": {}, "max_queued_total": None},
        "placement": placement,
        "backends": [
            {
                "name": "sim",
                "kind": "simulated",
                "gpus": [{"type": kind, "count": count} for kind, count in fleet.groups],
                "slots_per_gpu": slots,
                "service": service,
            }
        ],
        "models": models,
    }
    return load_settings(config, overrides=overrides)


def scaled_catalog(settings: Settings, fleet: Fleet, scale: float) -> Settings:
    """``settings`` with every model's durations ``scale``× the truth (module docstring)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError("the catalog duration scale must be positive")
    if scale == 1.0:
        return settings
    truth = ResourceEstimator(settings.models, fleet_gpu_types(settings))
    models = {}
    for name, spec in settings.models.items():
        throughput = {}
        for kind, _ in fleet.groups:
            prefill, decode = truth.throughput(name, kind)
            throughput[kind] = Throughput(
                prefill_tokens_per_s=prefill / scale, decode_tokens_per_s=decode / scale
            )
        models[name] = spec.model_copy(
            update={"throughput": throughput, "default_duration_s": spec.default_duration_s * scale}
        )
    return settings.model_copy(update={"models": models})


@dataclass(frozen=True, slots=True)
class PlannedRow:
    """A trace row made ready to submit: when, as what, and the truth the GPU will see."""

    index: int
    at: float
    submission: Submission
    caller: Caller
    peak_memory_mb: int  # true peak per GPU
    gpu_count: int
    duration_s: float  # true duration alone on the fleet's first GPU type
    clipped: bool
    durations: Mapping[str, float] = field(default_factory=dict)  # alone, per fleet GPU type


class _Texts:
    """Message texts of a given token count, shared between requests of equal prompts."""

    def __init__(self) -> None:
        self._cache: dict[int, str] = {}

    def chat(self, tokens: int) -> str:
        """A text the estimator counts as ``tokens`` − the chat overhead tokens."""
        chars = 4 * max(0, tokens - _CHAT_OVERHEAD_TOKENS)
        text = self._cache.get(chars)
        if text is None:
            text = self._cache[chars] = "x" * chars
        return text


def _input_for(task: Task, prompt: int, texts: _Texts) -> dict[str, Any]:
    """An OpenAI-style input whose counted prompt is ``prompt`` tokens (and no max_tokens)."""
    if task is Task.CHAT:
        return {"messages": [{"role": "user", "content": texts.chat(prompt)}]}
    if task is Task.COMPLETION:
        return {"prompt": [0] * prompt if prompt else ""}
    if task is Task.EMBEDDING:
        return {"input": [0] * prompt if prompt else ""}
    return {}


def plan_rows(
    rows: Sequence[TraceRow],
    settings: Settings,
    fleet: Fleet,
    *,
    model: str | Sequence[str] = "llama-3-8b",
    users: int = 16,
    seed: int = 0,
    load_scale: float = 1.0,
    known_output: bool = False,
) -> list[PlannedRow]:
    """Turn trace rows into submissions carrying their truth (see the module docstring).

    ``model``: the model of rows that name none, or several, drawn by :func:`assign_models`.
    ``known_output``: chat and completion inputs carry ``max_tokens`` = the true answer length.

    Raises:
        TraceError: a row names a model or priority class that the configuration does not know.
    """
    if not load_scale > 0:
        raise ValueError("load_scale must be positive")
    estimator = ResourceEstimator(settings.models, fleet_gpu_types(settings))  # as the engine's
    classes = set(settings.priorities.classes)
    timeout = settings.server.max_timeout_s
    texts = _Texts()
    names = assign_users(rows, users=users, seed=seed)
    mix = assign_models(rows, [model] if isinstance(model, str) else model, seed=seed)
    planned = []
    for index, (row, user, name) in enumerate(zip(rows, names, mix, strict=True)):
        if name not in settings.models:
            known = ", ".join(settings.models)
            raise TraceError(f"row {index + 1}: unknown model {name!r} (known: {known})")
        if row.priority is not None and row.priority not in classes:
            raise TraceError(
                f"row {index + 1}: priority {row.priority!r} is not a class "
                f"({', '.join(settings.priorities.classes)})"
            )
        profile = estimator.profile(name)
        task = profile.task
        prompt = row.input_tokens or 0
        if task is Task.CHAT:
            prompt = max(prompt, _CHAT_OVERHEAD_TOKENS)
        if task is Task.GENERIC:
            prompt, output, clipped = 0, 0, False
        else:
            wanted = row.output_tokens
            clipped = prompt > profile.max_context
            prompt = min(prompt, profile.max_context)
            room = profile.max_context - prompt
            if task is Task.EMBEDDING:
                output = 0
            elif wanted is None:
                output = min(profile.max_output_tokens, room)
            else:
                output = min(wanted, room)
                clipped = clipped or output < wanted
        hint = row.gpu_memory_mb if task is Task.GENERIC else None
        hints = ResourceHints(gpu_memory_mb=hint, gpu_count=row.gpu_count)
        truth = estimator.estimate(name, Shape(1, prompt, output), hints)
        peak = row.gpu_memory_mb if row.gpu_memory_mb is not None else truth.gpu_memory_mb
        durations = {kind: truth.duration_on(kind) for kind, _ in fleet.groups}
        if row.duration_s is not None:
            durations = dict.fromkeys(durations, row.duration_s)
        duration = durations[fleet.first_type]
        body = _input_for(task, prompt, texts)
        if known_output and task in (Task.CHAT, Task.COMPLETION) and output >= 1:
            body["max_tokens"] = output
        # No generated answer: nobody reads it, and making one costs more than the placement.
        body["simulate"] = {"duration_s": durations, "peak_memory_mb": peak, "output": None}
        submission = Submission(
            model=name,
            task=task,
            input=body,
            priority=row.priority,
            resources=hints,
            timeout_s=timeout,
            metadata={"row": str(index)},
        )
        planned.append(
            PlannedRow(
                index=index,
                at=row.timestamp_s / load_scale,
                submission=submission,
                caller=Caller(user),
                peak_memory_mb=peak,
                gpu_count=row.gpu_count,
                duration_s=duration,
                clipped=clipped,
                durations=durations,
            )
        )
    return planned


# Metrics ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolated linearly; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index ``(Σx)² / (n·Σx²)``: 1 for equal shares; 1 when there is nothing."""
    xs = list(values)
    squares = sum(x * x for x in xs)
    if not xs or squares == 0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * squares)


def summarize(
    report: SimulationReport,
    held_mb: Mapping[str, int],
    *,
    fleet_memory_mb: int,
    slo_s: float,
    submitted: int | None = None,
    clipped: int = 0,
) -> tuple[dict[str, Any], list[float]]:
    """The metrics of one run (module docstring) and every accepted request's queue wait.

    ``held_mb`` is the true memory each request held while it ran, over all its GPUs, by request
    id (requests missing from it count as holding their estimate).
    """
    records = report.records
    total = submitted if submitted is not None else len(records) + len(report.rejections)
    status = report.by_status()
    waits = [record.queue_wait_s for record in records]
    done = [record for record in records if record.status == "succeeded"]
    latencies: list[float] = []
    per_user: dict[str, list[float]] = {}
    held = reserved = 0.0
    for record in done:
        assert record.finished_at is not None
        latency = record.finished_at - record.created_at
        latencies.append(latency)
        started = record.started_at if record.started_at is not None else record.finished_at
        service = record.finished_at - started
        per_user.setdefault(record.user, []).append(latency / max(service, SLOWDOWN_FLOOR_S))
        gpus = max(1, len(record.gpu_ids))
        held += held_mb.get(record.id, record.gpu_memory_mb * gpus) * service
        reserved += record.gpu_memory_mb * gpus * service
    ooms = sum(record.retried_after.count(_OOM) for record in records)
    ooms += sum(1 for record in records if record.status == "failed" and record.error == _OOM)
    retries = sum(len(record.retried_after) for record in records)
    ends = [record.finished_at for record in records if record.finished_at is not None]
    first = min((record.created_at for record in records), default=0.0)
    first = min([first, *(rejection.at for rejection in report.rejections)])
    makespan = max(ends, default=first) - first
    capacity = fleet_memory_mb * makespan
    within = sum(1 for latency in latencies if latency <= slo_s)
    metrics: dict[str, Any] = {
        "p50_queue_wait_s": percentile(waits, 50),
        "p90_queue_wait_s": percentile(waits, 90),
        "p99_queue_wait_s": percentile(waits, 99),
        "p999_queue_wait_s": percentile(waits, 99.9),
        "mean_queue_wait_s": sum(waits) / len(waits) if waits else 0.0,
        "p50_latency_s": percentile(latencies, 50),
        "p99_latency_s": percentile(latencies, 99),
        "slo_attainment": within / total if total else 1.0,
        "gpu_memory_utilization": held / capacity if capacity > 0 else 0.0,
        "gpu_memory_reserved_utilization": reserved / capacity if capacity > 0 else 0.0,
        "oom_events": ooms,
        "jain_fairness": jain_index(sum(xs) / len(xs) for xs in per_user.values()),
        "throughput_rps": len(done) / makespan if makespan > 0 else 0.0,
        "completed": len(done),
        "failed": status.get("failed", 0),
        "expired": status.get("expired", 0),
        "cancelled": status.get("cancelled", 0),
        "rejected": len(report.rejections),
        "submitted": total,
        "clipped_rows": clipped,
        "retries": retries,
        "makespan_s": makespan,
        "users": len(per_user),
    }
    return _rounded(metrics), waits


def _rounded(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: round(value, _DIGITS) if isinstance(value, float) else value
        for key, value in metrics.items()
    }


def duration_errors(
    report: SimulationReport, planned: Sequence[PlannedRow], gpu_types: Mapping[str, str]
) -> list[float | None]:
    """Median ``|estimated / true − 1|`` of completed requests per tenth of the rows.

    ``gpu_types`` maps GPU ids to types; a request's estimate is the duration issued at
    admission on the type of its first GPU (module docstring).
    """
    tenths: list[list[float]] = [[] for _ in range(_TENTHS)]
    rows = len(planned)
    for record in report.records:
        if record.status != "succeeded" or not record.gpu_ids:
            continue
        item = planned[int(record.metadata["row"])]
        kind = gpu_types[record.gpu_ids[0]]
        estimated = record.duration_estimates.get(kind)
        true = item.durations.get(kind, item.duration_s)
        if estimated is None or true <= 0:
            continue
        tenths[item.index * _TENTHS // rows].append(abs(estimated / true - 1))
    return [round(percentile(errors, 50), _DIGITS) if errors else None for errors in tenths]


# Replaying -------------------------------------------------------------------------------------


ETA_TOLERANCE_S: Final = 1.0
"""An ETA within this many seconds of the wait that followed counts as right (also: 25 %)."""


class EtaProbe:
    """Asks ``explain`` for every request at the moment it queues; compares with its wait.

    A request queues when it is admitted and does not start at once, or when a failed attempt
    puts it back for a retry. Its ETA (``waiting.eta_s``) is compared with the time until its
    next dispatch. Requests that end without starting again (cancelled, expired, failed) have no
    wait to compare and are counted apart.
    """

    def __init__(self, simulation: Simulation) -> None:
        self._simulation = simulation
        self._pending: dict[str, tuple[float, float | None, str]] = {}
        self.samples: list[tuple[float | None, float, str]] = []
        self.unstarted = 0
        simulation.admission_listeners.append(self._admitted)
        simulation.listeners.append(self._changed)

    def _ask(self, request_id: str) -> None:
        router = self._simulation.router
        live = router.get(request_id)
        if live is None or live.status is not RequestStatus.QUEUED:
            return
        now = self._simulation.clock.now()
        waiting = router.explain(live, now).waiting
        assert waiting is not None
        self._pending[request_id] = (now, waiting.eta_s, waiting.blocked_by)

    def _admitted(self, request: Request) -> None:
        self._ask(request.id)

    def _changed(self, request: Request, change: Transition) -> None:
        if change.to_status is RequestStatus.QUEUED:
            self._ask(request.id)
            return
        asked = self._pending.pop(request.id, None)
        if asked is None:
            return
        if change.to_status is RequestStatus.DISPATCHING:
            at, eta, blocked_by = asked
            self.samples.append((eta, change.at - at, blocked_by))
        else:
            self.unstarted += 1

    def metrics(self) -> dict[str, Any]:
        """The ETA's error over the samples: absolute error percentiles and shares within bounds.

        ``asked``: requests explained as they queued (and that started later); ``with_eta``: of
        them, those given an ETA; errors are over those, ``eta − actual wait`` (positive: too
        late a forecast); ``early_share_of_misses``: of the errors beyond
        :data:`ETA_TOLERANCE_S`, the share that were too early; ``zero_eta``: what the forecast
        "it starts at once" would score on the same requests, a baseline; ``blocked_by``: how
        many were explained with each cause.
        """
        timed = [(eta, actual) for eta, actual, _ in self.samples if eta is not None]
        errors = [eta - actual for eta, actual in timed]
        absolute = [abs(error) for error in errors]
        waits = [actual for _, actual in timed]
        misses = [error for error in errors if abs(error) > ETA_TOLERANCE_S]
        causes = Counter(blocked_by for _, _, blocked_by in self.samples)

        def share(count: int, of: int) -> float | None:
            return round(count / of, _DIGITS) if of else None

        return {
            "asked": len(self.samples),
            "with_eta": len(timed),
            "unstarted": self.unstarted,
            "median_abs_error_s": round(percentile(absolute, 50), _DIGITS),
            "p90_abs_error_s": round(percentile(absolute, 90), _DIGITS),
            "median_error_s": round(percentile(errors, 50), _DIGITS),
            "median_actual_wait_s": round(percentile(waits, 50), _DIGITS),
            "p90_actual_wait_s": round(percentile(waits, 90), _DIGITS),
            "within_1s": share(sum(error <= ETA_TOLERANCE_S for error in absolute), len(timed)),
            "within_25pct": share(
                sum(error <= 0.25 * wait for error, wait in zip(absolute, waits, strict=True)),
                len(timed),
            ),
            "early_share_of_misses": share(sum(error < 0 for error in misses), len(misses)),
            "zero_eta": {
                "median_abs_error_s": round(percentile(waits, 50), _DIGITS),
                "p90_abs_error_s": round(percentile(waits, 90), _DIGITS),
                "within_1s": share(sum(wait <= ETA_TOLERANCE_S for wait in waits), len(waits)),
            },
            "blocked_by": dict(sorted(causes.items())),
        }


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """One policy at one load scale: its metrics, every queue wait, and the run's wall time."""

    policy: str
    load_scale: float
    metrics: dict[str, Any]
    queue_waits: list[float] = field(repr=False)
    wall_s: float = 0.0


def replay(
    rows: Sequence[TraceRow],
    *,
    gpus: Fleet | str,
    policy: str = "balanced",
    load_scale: float = 1.0,
    seed: int = 0,
    users: int = 16,
    model: str | Sequence[str] = "llama-3-8b",
    slo_s: float = 30.0,
    slots: int = 8,
    config: str | Path | None = None,
    starvation_bound_s: float | None = None,
    catalog_duration_scale: float = 1.0,
    known_output: bool = False,
    service: str = "shared",
    eta: bool = False,
) -> PolicyResult:
    """Replay ``rows`` through the real engine in virtual time with one placement policy.

    ``model``: the model of rows that name none, or several to draw from (:func:`plan_rows`).
    ``catalog_duration_scale`` and ``known_output``: the module docstring's "A wrong catalog on
    purpose". ``service``: the simulated fleet's service model, ``shared`` or ``fixed``.
    ``eta``: measure the ETA of ``explain`` against the waits that followed (:class:`EtaProbe`;
    the metrics' ``eta``).
    """
    started = time.perf_counter()
    fleet = parse_gpus(gpus) if isinstance(gpus, str) else gpus
    settings = replay_settings(
        fleet,
        policy,
        seed=seed,
        slots=slots,
        config=config,
        starvation_bound_s=starvation_bound_s,
        service=service,
    )
    planned = plan_rows(
        rows,
        settings,
        fleet,
        model=model,
        users=users,
        seed=seed,
        load_scale=load_scale,
        known_output=known_output,
    )
    simulation = Simulation(scaled_catalog(settings, fleet, catalog_duration_scale), seed=seed)
    probe = EtaProbe(simulation) if eta else None
    for item in planned:
        simulation.submit(item.at, item.submission, item.caller)
    report = simulation.run()
    held: dict[str, int] = {}
    for record in report.records:
        item = planned[int(record.metadata["row"])]
        held[record.id] = item.peak_memory_mb * item.gpu_count
    metrics, waits = summarize(
        report,
        held,
        fleet_memory_mb=fleet.memory_mb,
        slo_s=slo_s,
        submitted=len(planned),
        clipped=sum(1 for item in planned if item.clipped),
    )
    if service == "shared" and metrics["makespan_s"] > 0:
        # Weights are held once per GPU, not per execution: the fleet's own account.
        used = simulation.fleet.memory_mb_seconds / (fleet.memory_mb * metrics["makespan_s"])
        metrics["gpu_memory_utilization"] = round(used, _DIGITS)
    gpu_types = {gpu_id: gpu.type for gpu_id, gpu in simulation.router.monitor.gpus.items()}
    metrics["cold_starts"] = simulation.fleet.loads
    metrics["completed_by_gpu_type"] = dict(
        sorted(
            Counter(
                gpu_types[record.gpu_ids[0]]
                for record in report.records
                if record.status == "succeeded" and record.gpu_ids
            ).items()
        )
    )
    metrics["duration_error_by_tenth"] = duration_errors(report, planned, gpu_types)
    if probe is not None:
        metrics["eta"] = probe.metrics()
    return PolicyResult(policy, load_scale, metrics, waits, time.perf_counter() - started)


def _replay_job(job: tuple[Sequence[TraceRow], dict[str, Any]]) -> PolicyResult:
    rows, options = job
    return replay(rows, **options)


def run_all(
    rows: Sequence[TraceRow],
    *,
    policies: Sequence[str],
    scales: Sequence[float],
    jobs: int = 1,
    **options: Any,
) -> dict[tuple[str, float], PolicyResult]:
    """Replay every (policy, scale); ``jobs`` > 1 runs them in that many processes."""
    keys = [(policy, scale) for policy in policies for scale in scales]
    work = [(rows, {**options, "policy": p, "load_scale": s}) for p, s in keys]
    if jobs <= 1 or len(work) <= 1:
        results = [_replay_job(job) for job in work]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_replay_job, work))
    return dict(zip(keys, results, strict=True))


# Output ----------------------------------------------------------------------------------------


def write_plot(
    path: Path,
    results: Mapping[tuple[str, float], PolicyResult],
    *,
    policies: Sequence[str],
    base_scale: float,
    title: str,
) -> None:
    """PNG: p99 queue wait against load scale per policy, and the queue-wait CDF at the base."""
    from matplotlib.figure import Figure

    scales = sorted({scale for _, scale in results})
    figure = Figure(figsize=(13, 5), layout="constrained")
    sweep_axes, cdf_axes = figure.subplots(1, 2)
    for policy in policies:
        points = [(s, results[(policy, s)].metrics["p99_queue_wait_s"]) for s in scales]
        sweep_axes.plot([s for s, _ in points], [w for _, w in points], marker="o", label=policy)
        waits = sorted(results[(policy, base_scale)].queue_waits)
        if waits:
            share = [(i + 1) / len(waits) for i in range(len(waits))]
            cdf_axes.step(waits, share, where="post", label=policy)
    sweep_axes.set_xlabel("load scale (× the trace's arrival rate)")
    sweep_axes.set_ylabel("p99 queue wait (s)")
    sweep_axes.set_yscale("symlog", linthresh=0.1)
    sweep_axes.set_title("p99 queue wait under load")
    sweep_axes.grid(True, alpha=0.3)
    sweep_axes.legend()
    cdf_axes.set_xscale("symlog", linthresh=0.01)
    cdf_axes.set_xlabel("queue wait (s)")
    cdf_axes.set_ylabel("share of requests")
    cdf_axes.set_title(f"queue wait CDF at ×{base_scale:g}")
    cdf_axes.grid(True, alpha=0.3)
    cdf_axes.legend(loc="lower right")
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _scale_key(scale: float) -> str:
    return f"{scale:g}"


def _base_table(results: Mapping[str, PolicyResult], title: str) -> Table:
    table = Table(title=title)
    for column in (
        "policy",
        "p50 wait s",
        "p90 wait s",
        "p99 wait s",
        "p99 latency s",
        "SLO",
        "mem util",
        "OOM",
        "Jain",
        "req/s",
        "completed",
        "failed",
        "wall s",
    ):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for policy, result in results.items():
        m = result.metrics
        table.add_row(
            policy,
            f"{m['p50_queue_wait_s']:.3f}",
            f"{m['p90_queue_wait_s']:.3f}",
            f"{m['p99_queue_wait_s']:.2f}",
            f"{m['p99_latency_s']:.2f}",
            f"{m['slo_attainment']:.2%}",
            f"{m['gpu_memory_utilization']:.1%}",
            str(m["oom_events"]),
            f"{m['jain_fairness']:.3f}",
            f"{m['throughput_rps']:.2f}",
            str(m["completed"]),
            str(m["failed"] + m["expired"] + m["rejected"]),
            f"{result.wall_s:.1f}",
        )
    return table


def _error_table(results: Mapping[str, PolicyResult]) -> Table:
    table = Table(
        title="estimator duration error: median |estimated / true − 1| per tenth of the trace"
    )
    table.add_column("policy")
    for tenth in range(1, _TENTHS + 1):
        table.add_column(f"{tenth}/{_TENTHS}", justify="right")
    for policy, result in results.items():
        errors = result.metrics["duration_error_by_tenth"]
        table.add_row(policy, *("–" if e is None else f"{e:.1%}" for e in errors))
    return table


def _eta_table(results: Mapping[str, PolicyResult]) -> Table:
    table = Table(title="explain's ETA against the wait that followed (requests that queued)")
    for column in (
        "policy",
        "asked",
        "with ETA",
        "median |err| s",
        "p90 |err| s",
        "median err s",
        "median wait s",
        "within 1 s",
        "within 25 %",
        "ETA 0: within 1 s",
    ):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for policy, result in results.items():
        m = result.metrics["eta"]
        table.add_row(
            policy,
            str(m["asked"]),
            str(m["with_eta"]),
            f"{m['median_abs_error_s']:.3f}",
            f"{m['p90_abs_error_s']:.3f}",
            f"{m['median_error_s']:+.3f}",
            f"{m['median_actual_wait_s']:.3f}",
            "–" if m["within_1s"] is None else f"{m['within_1s']:.1%}",
            "–" if m["within_25pct"] is None else f"{m['within_25pct']:.1%}",
            "–" if m["zero_eta"]["within_1s"] is None else f"{m['zero_eta']['within_1s']:.1%}",
        )
    return table


def _sweep_table(
    results: Mapping[tuple[str, float], PolicyResult],
    policies: Sequence[str],
    scales: Sequence[float],
) -> Table:
    table = Table(title="load sweep: p99 queue wait s / OOM events / memory utilisation")
    table.add_column("policy")
    for scale in scales:
        table.add_column(f"×{scale:g}", justify="right")
    for policy in policies:
        cells = []
        for scale in scales:
            m = results[(policy, scale)].metrics
            cells.append(
                f"{m['p99_queue_wait_s']:.1f} / {m['oom_events']} / "
                f"{m['gpu_memory_utilization']:.0%}"
            )
        table.add_row(policy, *cells)
    return table


def _parse_scales(text: str) -> list[float]:
    scales = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise typer.BadParameter(
                f"{part.strip()!r} is not a number", param_hint="--sweep"
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise typer.BadParameter(f"{part.strip()!r} must be positive", param_hint="--sweep")
        scales.append(value)
    return sorted(set(scales))


def command(
    trace: Annotated[
        Path, typer.Option("--trace", help="The trace file.", exists=True, dir_okay=False)
    ],
    format: Annotated[
        str, typer.Option("--format", help="auto | azure | alibaba | generic.")
    ] = "auto",
    gpus: Annotated[
        str, typer.Option("--gpus", help="The fleet, NxTYPE[,NxTYPE...], e.g. 8xH100-80GB.")
    ] = "8xH100-80GB",
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", help="A placement policy (repeat; default: all six)."),
    ] = None,
    load_scale: Annotated[
        float, typer.Option("--load-scale", help="Arrival-rate multiplier (time ÷ X).", min=0.0)
    ] = 1.0,
    sweep: Annotated[
        str, typer.Option("--sweep", help="Load scales to sweep, comma-separated; '' for none.")
    ] = "0.5,0.75,1,1.5,2",
    users: Annotated[
        int, typer.Option("--users", help="Users rows are assigned to (Zipf).", min=1)
    ] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of users, ids and policies.")] = 0,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Replay only the first N rows.", min=1)
    ] = None,
    model: Annotated[
        str, typer.Option("--model", help="Catalog model of rows that name none.")
    ] = "llama-3-8b",
    models: Annotated[
        str | None,
        typer.Option(
            "--models",
            help="Several catalog models, comma-separated, drawn Zipf(1) for rows that name "
            "none, the first the most asked for (instead of --model).",
        ),
    ] = None,
    service: Annotated[
        str,
        typer.Option(
            "--service",
            help="shared: GPUs shared by their executions, models loaded on demand; "
            "fixed: every execution takes its duration alone (the earlier model).",
        ),
    ] = "shared",
    slo_s: Annotated[
        float, typer.Option("--slo-s", help="End-to-end latency objective (s).", min=0.0)
    ] = 30.0,
    slots: Annotated[int, typer.Option("--slots", help="Executions per GPU at once.", min=1)] = 8,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A YAML config for the model catalog (defaults: built in)."),
    ] = None,
    starvation_bound_s: Annotated[
        float | None,
        typer.Option(
            "--starvation-bound-s",
            help="placement.starvation_bound_s for this replay (default: the config's).",
            min=0.0,
        ),
    ] = None,
    catalog_duration_scale: Annotated[
        float,
        typer.Option(
            "--catalog-duration-scale",
            help="Give the router a catalog whose durations are X× the truth (default 1).",
        ),
    ] = 1.0,
    known_output: Annotated[
        bool,
        typer.Option(
            "--known-output",
            help="Clients send max_tokens = the true answer length (the router knows shapes).",
        ),
    ] = False,
    eta: Annotated[
        bool,
        typer.Option(
            "--eta",
            help="Measure explain's ETA against the wait that followed, per policy (slower).",
        ),
    ] = False,
    jobs: Annotated[
        int, typer.Option("--jobs", help="Replays to run in parallel processes.", min=1)
    ] = 1,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every metric per policy here.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write wait-time curves here (PNG).")
    ] = None,
) -> None:
    """Replay a trace in virtual time through the real engine, every placement policy side by side.

    Prints p50/p99 queue wait, p99 latency, SLO attainment, GPU memory utilisation, OOM events,
    Jain's fairness between users and throughput per policy, then a load sweep.
    """
    provenance = capture()
    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, 160))
    err = Console(stderr=True)
    if format not in FORMATS:
        raise typer.BadParameter(f"expected one of {', '.join(FORMATS)}", param_hint="--format")
    if service not in SERVICES:
        raise typer.BadParameter(f"expected one of {', '.join(SERVICES)}", param_hint="--service")
    mix: str | list[str] = model
    if models is not None:
        mix = [name.strip() for name in models.split(",") if name.strip()]
        if not mix:
            raise typer.BadParameter("name at least one model", param_hint="--models")
    if load_scale <= 0:
        raise typer.BadParameter("must be positive", param_hint="--load-scale")
    if not (math.isfinite(catalog_duration_scale) and catalog_duration_scale > 0):
        raise typer.BadParameter("must be positive", param_hint="--catalog-duration-scale")
    try:
        fleet = parse_gpus(gpus)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--gpus") from None
    names = list(dict.fromkeys(policy or DEFAULT_POLICIES))
    unknown = [name for name in names if name not in DEFAULT_POLICIES]
    if unknown:
        raise typer.BadParameter(
            f"unknown policy {unknown[0]!r} (known: {', '.join(DEFAULT_POLICIES)})",
            param_hint="--policy",
        )
    scales = _parse_scales(sweep)
    try:
        settings = replay_settings(
            fleet,
            names[0],
            seed=seed,
            slots=slots,
            config=config,
            starvation_bound_s=starvation_bound_s,
            service=service,
        )
        margin = settings.placement.memory_safety_margin_mb
        placeable = BUILTIN_GPU_TYPES[fleet.first_type].memory_mb - margin
        rows = read_trace(trace, format, gpu_memory_mb=placeable)  # type: ignore[arg-type]
        if limit is not None:
            rows = rows[:limit]
        if not rows:
            raise TraceError(f"{trace}: no rows to replay")
        plan_rows(rows, settings, fleet, model=mix, users=users, seed=seed)  # validates
    except (TraceError, ConfigError) as exc:
        err.print(f"[red]cannot replay[/red] {exc}")
        raise typer.Exit(2) from exc
    kind = format if format != "auto" else detect_format(trace)
    span = max(row.timestamp_s for row in rows)
    err.print(
        f"replaying {len(rows):,} rows ({kind}, {span:,.0f} s) on {fleet} "
        f"({fleet.gpu_count} GPUs): {len(names)} policies × "
        f"{len(set(scales) | {load_scale})} load scales"
    )
    options: dict[str, Any] = {
        "gpus": fleet,
        "seed": seed,
        "users": users,
        "model": mix,
        "slo_s": slo_s,
        "slots": slots,
        "config": config,
        "starvation_bound_s": starvation_bound_s,
        "catalog_duration_scale": catalog_duration_scale,
        "known_output": known_output,
        "service": service,
        "eta": eta,
    }
    all_scales = sorted(set(scales) | {load_scale})
    started = time.perf_counter()
    results = run_all(rows, policies=names, scales=all_scales, jobs=jobs, **options)
    elapsed = time.perf_counter() - started
    base = {name: results[(name, load_scale)] for name in names}
    out.print(_base_table(base, f"{trace.name} on {fleet}, load ×{load_scale:g}, SLO {slo_s:g} s"))
    out.print(_error_table(base))
    if eta:
        out.print(_eta_table(base))
    if scales:
        out.print(_sweep_table(results, names, scales))
    runs = len(results)
    out.print(f"{runs} replays in {elapsed:.1f} s ({elapsed / runs:.1f} s each on average)")
    if json_path is not None:
        document = {
            "trace": {
                "path": str(trace),
                "format": kind,
                "rows": len(rows),
                "span_s": round(span, _DIGITS),
                "rate_rps": round(len(rows) / span, _DIGITS) if span > 0 else None,
            },
            "fleet": {
                "gpus": str(fleet),
                "gpu_count": fleet.gpu_count,
                "memory_mb": fleet.memory_mb,
                "slots_per_gpu": slots,
            },
            "settings": {
                "model": mix,
                "service": service,
                "load_scale": load_scale,
                "slo_s": slo_s,
                "users": users,
                "seed": seed,
                "limit": limit,
                "starvation_bound_s": settings.placement.starvation_bound_s,
                "catalog_duration_scale": catalog_duration_scale,
                "known_output": known_output,
                "eta": eta,
            },
            "policies": {name: result.metrics for name, result in base.items()},
            "sweep": {
                "scales": scales,
                "policies": {
                    name: {_scale_key(s): results[(name, s)].metrics for s in scales}
                    for name in names
                },
            },
        }
        write_json(json_path, document, provenance)
        out.print(f"wrote {json_path}")
    if plot is not None:
        write_plot(
            plot,
            results,
            policies=names,
            base_scale=load_scale,
            title=f"{trace.name}: {len(rows):,} requests on {fleet}",
        )
        out.print(f"wrote {plot}")

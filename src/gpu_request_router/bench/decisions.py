"""``gpurouter bench decisions``: what one decision costs as the fleet and the queue grow.

Three measurements, each on the real core code:

- **placement**: one :meth:`LoadBalancer.place` call per policy over fleets of 10 to 10,000 GPUs
  (8 per worker, three GPU types, a third of them with the model loaded, random work already
  placed so that room and load differ), for a one-GPU and a two-GPU request;
- **admission**: one submission through the assembled :class:`Engine` (validation, estimate,
  quota, queue, dispatch pass, placement, the in-memory store) on the same fleet sizes;
- **queue**: the :class:`PriorityManager` operations (push, the first candidate of a dispatch
  pass, dispatch of the head, removal of a random entry) at depths of 10 to 1,000,000 requests
  from 1,000 users in three priority classes.

Each figure is the median of many timed repetitions (``time.perf_counter``); the growth columns
compare each row with the one before, so that the shape of the curve shows however noisy the
machine. A one-GPU placement by a policy that searches the placement index (``balanced``,
``best_fit``, ``least_loaded``) should grow no faster than the logarithm of the fleet, and take
under 1 ms over 10,000 GPUs; the scans (the other policies, and every multi-GPU request) no faster
than the fleet (linear); queue operations no faster than the logarithm of the depth.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from gpu_request_router.bench.provenance import capture
from gpu_request_router.bench.report import parse_counts, print_table, write_json
from gpu_request_router.core.engine import Engine
from gpu_request_router.core.gpu_state_monitor import GPUStateMonitor
from gpu_request_router.core.load_balancer import (
    POLICIES,
    IndexedPolicy,
    LoadBalancer,
    Need,
    make_policy,
)
from gpu_request_router.core.priority_manager import PriorityManager
from gpu_request_router.core.request_receiver import Caller, Submission
from gpu_request_router.models.gpu_state import GPUReading
from gpu_request_router.models.gpu_types import gpu_type
from gpu_request_router.models.request import Estimate, Request, Task
from gpu_request_router.testing import make_settings, readings_for

__all__ = [
    "DEFAULT_DEPTHS",
    "DEFAULT_FLEETS",
    "DecisionsReport",
    "growth_exponent",
    "run_decisions",
]

DEFAULT_FLEETS = (10, 100, 1_000, 10_000)
DEFAULT_DEPTHS = (10, 100, 1_000, 10_000, 100_000, 1_000_000)

_TYPES = ("H100-80GB", "A100-80GB", "H200-141GB")
_MODEL = "llama-3-8b"
_GPUS_PER_WORKER = 8
_CLASSES = ("high", "normal", "batch")
_USERS = 1_000
_MB_PER_GIB = 1024


@dataclass(frozen=True, slots=True)
class PlacementRow:
    """Median and 90th percentile of one ``place()`` call, in microseconds."""

    gpus: int
    policy: str
    gpu_count: int
    median_us: float
    p90_us: float


@dataclass(frozen=True, slots=True)
class AdmissionRow:
    """Median and 90th percentile of one submission through the engine, in microseconds."""

    gpus: int
    median_us: float
    p90_us: float


@dataclass(frozen=True, slots=True)
class QueueRow:
    """Median cost of each queue operation at one depth, in microseconds."""

    depth: int
    push_us: float
    first_candidate_us: float
    dispatch_head_us: float
    remove_us: float


@dataclass(frozen=True, slots=True)
class DecisionsReport:
    """Everything ``bench decisions`` measured, with the fitted growth."""

    placement: list[PlacementRow]
    admission: list[AdmissionRow]
    queue: list[QueueRow]
    placement_exponent: float
    indexed_growth: dict[str, float]
    fleet_log_growth: float
    queue_growth: float
    log_growth: float

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "benchmark": "decisions",
            "placement": [asdict(row) for row in self.placement],
            "admission": [asdict(row) for row in self.admission],
            "queue": [asdict(row) for row in self.queue],
            "growth": {
                "placement_exponent": self.placement_exponent,
                "indexed_growth": self.indexed_growth,
                "fleet_log_growth": self.fleet_log_growth,
                "queue_growth": self.queue_growth,
                "log_growth": self.log_growth,
            },
        }


def _timed(operation: Callable[[], object], repeat: int) -> list[float]:
    """Microseconds taken by each of ``repeat`` calls of ``operation``."""
    samples = []
    clock = time.perf_counter
    for _ in range(repeat):
        started = clock()
        operation()
        samples.append((clock() - started) * 1e6)
    return samples


def _p90(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def _repeats(size: int, budget: int) -> int:
    """Repetitions for one size: about ``budget`` units of work, never fewer than 5."""
    return max(5, budget // max(size, 1))


# Placement ---------------------------------------------------------------------------------------


def _fleet(gpus: int, rng: random.Random) -> GPUStateMonitor:
    """A monitor holding ``gpus`` GPUs with work already placed on many of them."""
    monitor = GPUStateMonitor(stale_after_s=60.0, safety_margin_mb=1024)
    readings = []
    for index in range(gpus):
        kind = _TYPES[(index // _GPUS_PER_WORKER) % len(_TYPES)]
        readings.append(
            GPUReading(
                worker=f"w{index // _GPUS_PER_WORKER:05d}",
                index=index % _GPUS_PER_WORKER,
                type=kind,
                memory_total_mb=gpu_type(kind).memory_mb,
                slots=8,
                models_loaded=(_MODEL,) if rng.random() < 1 / 3 else (),
            )
        )
    monitor.apply(readings, now=0.0)
    for state in list(monitor.schedulable.values()):
        for slot in range(rng.randint(0, 7)):
            monitor.reserve(state.id, f"{state.id}/{slot}", rng.randint(1, 10) * _MB_PER_GIB)
    return monitor


def _placement(fleets: Sequence[int], budget: int, seed: int) -> list[PlacementRow]:
    rows = []
    needs = (
        Need(model=_MODEL, memory_mb=20 * _MB_PER_GIB, weights_mb=15 * _MB_PER_GIB),
        Need(model=_MODEL, memory_mb=30 * _MB_PER_GIB, weights_mb=8 * _MB_PER_GIB, gpu_count=2),
    )
    for gpus in fleets:
        fleet = _fleet(gpus, random.Random(seed)).index
        for name in POLICIES:
            balancer = LoadBalancer(make_policy(name, seed))
            for need in needs:
                samples = _timed(
                    functools.partial(balancer.place, need, fleet), _repeats(gpus, budget)
                )
                rows.append(
                    PlacementRow(
                        gpus=gpus,
                        policy=name,
                        gpu_count=need.gpu_count,
                        median_us=statistics.median(samples),
                        p90_us=_p90(samples),
                    )
                )
    return rows


# Admission through the engine --------------------------------------------------------------------


def _admission(gpus: int, budget: int, seed: int) -> AdmissionRow:
    workers = max(1, gpus // _GPUS_PER_WORKER)
    settings = make_settings(
        backends=[
            {
                "name": f"w{worker:05d}",
                "kind": "simulated",
                "gpus": [
                    {"type": _TYPES[worker % len(_TYPES)], "count": min(_GPUS_PER_WORKER, gpus)}
                ],
                "slots_per_gpu": 8,
            }
            for worker in range(workers)
        ]
    )
    engine = Engine.build(settings, seed=seed)
    engine.router.readings(readings_for(settings), 0.0)
    submission = Submission(model=_MODEL, input={"messages": [{"role": "user", "content": "Hi"}]})
    callers = itertools.cycle([Caller(f"user{user}") for user in range(16)])

    def submit() -> None:
        engine.receiver.submit(submission, next(callers), 1.0)

    # Every submission is placed at once: the fleet has a slot for each of them.
    samples = _timed(submit, min(_repeats(gpus, budget), 8 * gpus - 1))
    return AdmissionRow(gpus=gpus, median_us=statistics.median(samples), p90_us=_p90(samples))


# The queue ---------------------------------------------------------------------------------------


_ESTIMATE = Estimate(
    gpu_memory_mb=20 * _MB_PER_GIB,
    weights_mb=15 * _MB_PER_GIB,
    kv_cache_mb=4 * _MB_PER_GIB,
    activations_mb=_MB_PER_GIB,
    duration_s={"H100-80GB": 1.0},
)


def _request(number: int, rng: random.Random) -> Request:
    return Request(
        id=f"req_{number:08d}",
        user=f"user{rng.randrange(_USERS)}",
        model=_MODEL,
        task=Task.CHAT,
        priority=rng.choice(_CLASSES),
        estimate=_ESTIMATE,
        created_at=rng.uniform(0.0, 3_600.0),
    )


def _queue(depth: int, operations: int, seed: int) -> QueueRow:
    rng = random.Random(seed)
    queue = PriorityManager(_CLASSES, aging_s=60.0)
    for number in range(depth):
        queue.push(_request(number, rng), cost=rng.uniform(1.0, 10.0))
    extra = [_request(depth + number, rng) for number in range(operations)]
    pushes = iter(extra)
    push = _timed(lambda: queue.push(next(pushes), cost=5.0), operations)
    first = _timed(lambda: next(queue.candidates(3_600.0)), operations)

    def dispatch_head() -> None:
        queue.dispatched(next(queue.candidates(3_600.0)).id)

    # Dispatch and removal each take half of the pushed requests' number out again, so every
    # operation runs at (about) the nominal depth.
    dispatched = _timed(dispatch_head, operations // 2)
    ids = [request.id for request in extra]
    rng.shuffle(ids)
    victims = iter(ids)

    def remove() -> None:
        while queue.remove(next(victims)) is None:
            pass

    removed = _timed(remove, operations // 2)
    return QueueRow(
        depth=depth,
        push_us=statistics.median(push),
        first_candidate_us=statistics.median(first),
        dispatch_head_us=statistics.median(dispatched),
        remove_us=statistics.median(removed),
    )


# Growth ------------------------------------------------------------------------------------------


def growth_exponent(sizes: Sequence[int], times: Sequence[float]) -> float:
    """The least-squares slope of log(time) against log(size): 1.0 is linear growth."""
    if len(sizes) < 2:
        return 0.0
    xs = [math.log(size) for size in sizes]
    ys = [math.log(max(value, 1e-9)) for value in times]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def run_decisions(
    fleets: Sequence[int] = DEFAULT_FLEETS,
    depths: Sequence[int] = DEFAULT_DEPTHS,
    *,
    budget: int = 200_000,
    operations: int = 2_000,
    seed: int = 1,
) -> DecisionsReport:
    """Measure placement, admission and the queue at every size; ``budget`` bounds repetitions."""
    if not fleets or not depths:
        raise ValueError("give at least one fleet size and one queue depth")
    if min(fleets) < 1 or min(depths) < 1:
        raise ValueError("fleet sizes and queue depths must be positive")
    if operations < 2:
        raise ValueError("operations must be at least 2")
    placement = _placement(fleets, budget, seed)
    admission = [_admission(gpus, budget // 20, seed) for gpus in fleets]
    queue = [_queue(depth, operations, seed) for depth in depths]
    # The default policy's multi-GPU request: a scan, whose growth should stay linear.
    default = [row for row in placement if row.policy == "balanced" and row.gpu_count == 2]
    costs = [row.push_us + row.dispatch_head_us for row in queue]
    single = {(row.policy, row.gpus): row.median_us for row in placement if row.gpu_count == 1}
    smallest, largest = min(fleets), max(fleets)
    return DecisionsReport(
        placement=placement,
        admission=admission,
        queue=queue,
        placement_exponent=growth_exponent(
            [row.gpus for row in default], [row.median_us for row in default]
        ),
        indexed_growth={
            name: single[name, largest] / single[name, smallest]
            for name in POLICIES
            if isinstance(make_policy(name), IndexedPolicy)
        },
        fleet_log_growth=math.log(max(largest, 2)) / math.log(max(smallest, 2)),
        queue_growth=costs[-1] / costs[0],
        log_growth=math.log(max(depths[-1], 2)) / math.log(max(depths[0], 2)),
    )


def print_decisions(report: DecisionsReport) -> None:
    """Print the three tables and the growth verdict."""
    fleets = sorted({row.gpus for row in report.placement})
    policies = list(dict.fromkeys(row.policy for row in report.placement))
    by_key = {(row.gpus, row.policy, row.gpu_count): row for row in report.placement}
    print_table(
        "Placement: one place() call, median µs (1 GPU / 2 GPUs)",
        ["policy", *[f"{gpus:,} GPUs" for gpus in fleets]],
        [
            [
                policy,
                *[
                    f"{by_key[gpus, policy, 1].median_us:,.1f} / "
                    f"{by_key[gpus, policy, 2].median_us:,.1f}"
                    for gpus in fleets
                ],
            ]
            for policy in policies
        ],
    )
    previous: AdmissionRow | None = None
    admission_rows = []
    for row in report.admission:
        growth = "" if previous is None else f"×{row.median_us / previous.median_us:.2f}"
        admission_rows.append(
            [f"{row.gpus:,}", f"{row.median_us:,.1f}", f"{row.p90_us:,.1f}", growth]
        )
        previous = row
    print_table(
        "Admission: one submission through the engine, µs",
        ["GPUs", "median", "p90", "growth"],
        admission_rows,
    )
    print_table(
        "Queue operations, median µs",
        ["depth", "push", "first candidate", "dispatch head", "remove"],
        [
            [
                f"{row.depth:,}",
                f"{row.push_us:.2f}",
                f"{row.first_candidate_us:.2f}",
                f"{row.dispatch_head_us:.2f}",
                f"{row.remove_us:.2f}",
            ]
            for row in report.queue
        ],
    )
    logarithmic = (
        "no worse than logarithmic"
        if report.queue_growth <= report.log_growth
        else "WORSE than logarithmic"
    )
    print(
        f"queue push+dispatch grows ×{report.queue_growth:.2f} over the depths "
        f"(log growth would be ×{report.log_growth:.2f}): {logarithmic}"
    )
    largest = max(fleets)
    for name, ratio in report.indexed_growth.items():
        shape = (
            "no worse than logarithmic"
            if ratio <= report.fleet_log_growth
            else "WORSE than logarithmic"
        )
        cost = by_key[largest, name, 1].median_us
        verdict = "under" if cost < 1_000 else "OVER"
        print(
            f"{name} (indexed, 1 GPU): ×{ratio:.2f} from {min(fleets):,} to {largest:,} GPUs "
            f"(log growth would be ×{report.fleet_log_growth:.2f}): {shape}; "
            f"{cost:,.1f} µs over {largest:,} GPUs, {verdict} 1 ms"
        )
    linear = "no worse than linear" if report.placement_exponent <= 1.1 else "WORSE than linear"
    print(
        f"placement scan (balanced, 2 GPUs) grows as GPUs^{report.placement_exponent:.2f}: {linear}"
    )


def write_decisions(report: DecisionsReport, path: Path, provenance: dict[str, Any]) -> None:
    """Write the report as JSON with the provenance captured when the run started."""
    write_json(path, report.to_json(), provenance)


def command(
    gpus: Annotated[str, typer.Option("--gpus", help="Fleet sizes, comma-separated.")] = ",".join(
        map(str, DEFAULT_FLEETS)
    ),
    depths: Annotated[
        str, typer.Option("--depths", help="Queue depths, comma-separated.")
    ] = ",".join(map(str, DEFAULT_DEPTHS)),
    budget: Annotated[
        int, typer.Option("--budget", help="GPU-visits per placement measurement.", min=100)
    ] = 200_000,
    operations: Annotated[
        int, typer.Option("--operations", help="Timed queue operations per depth.", min=2)
    ] = 2_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the fleet and the queue.")] = 1,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every measurement here.")
    ] = None,
) -> None:
    """Time one placement decision, one admission and the queue operations as they grow.

    Placement and admission over 10 to 10,000 GPUs; the queue at 10 to 1,000,000 requests. Prints
    the medians and whether the growth stays logarithmic in GPUs for the indexed policies (and
    their cost over the largest fleet under 1 ms), linear for the scans, logarithmic in depth.
    """
    provenance = capture()
    report = run_decisions(
        parse_counts(gpus, "--gpus"),
        parse_counts(depths, "--depths"),
        budget=budget,
        operations=operations,
        seed=seed,
    )
    print_decisions(report)
    if json_path is not None:
        write_decisions(report, json_path, provenance)

"""``gpurouter bench store``: what the state store costs per request, without HTTP or scheduling.

Each store runs, in this process, the changes one request makes on its way through the router,
as the core hands them over: the request created (with its rate admission), the claim with its
GPU-seconds charge, the start, and the end with its settled charge and a chat answer as its
result. Each change is written on its own (one commit each: the worst case, a router that sees
one request at a time; under load the writer puts many in one commit). Reported per store: the
time of each of the four writes (mean, µs), and the wall and CPU time of a whole request (µs;
CPU = user + system of this process); ``batched`` is a whole request's wall time when the changes
of :data:`BATCH` requests go in one commit. ``memory`` is the floor; ``sqlite`` commits with
``synchronous = normal`` (a killed process loses nothing) and ``sqlite-full`` also syncs the WAL
on every commit (a power loss loses nothing either).
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from gpu_request_router.bench.provenance import capture
from gpu_request_router.bench.report import print_table, write_json
from gpu_request_router.core.request_router import transition_of
from gpu_request_router.core.state_store import Charge, StateChange, StateStore
from gpu_request_router.models.request import (
    Estimate,
    Placement,
    Request,
    RequestStatus,
    Shape,
    Task,
)
from gpu_request_router.store import MemoryStore, SQLiteStore

__all__ = ["BATCH", "STORES", "StoreRow", "command", "run_store"]

BATCH = 64
"""Requests whose changes share one commit in the ``batched`` measurement."""

STORES: dict[str, Callable[[Path], StateStore]] = {
    "memory": lambda folder: MemoryStore(),
    "sqlite": lambda folder: SQLiteStore(folder / "state.db"),
    "sqlite-full": lambda folder: SQLiteStore(folder / "state.db", synchronous="full"),
}
"""The stores measured, by name: each made in an empty folder."""

_WRITES = ("add", "claim", "start", "end")
_S = RequestStatus
_ESTIMATE = Estimate(
    gpu_memory_mb=17_000,
    weights_mb=16_000,
    kv_cache_mb=800,
    activations_mb=200,
    duration_s={"H100-80GB": 0.5, "A100-80GB": 0.9},
)
_PLACEMENT = Placement("bench", ("bench:0",), "balanced: model loaded; leaves 60.0 GiB")
_PROMPT = {"messages": [{"role": "user", "content": "Say something about GPUs. " * 20}]}
_ANSWER = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "model": "llama-3-8b",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "GPUs " * 60},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 130, "completion_tokens": 60, "total_tokens": 190},
}


@dataclass(frozen=True, slots=True)
class StoreRow:
    """One store: the mean time of each write, and a whole request's wall and CPU time (µs)."""

    store: str
    requests: int
    add_us: float
    claim_us: float
    start_us: float
    end_us: float
    request_wall_us: float
    request_cpu_us: float
    batched_us: float


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _changes(number: int) -> list[StateChange]:
    """The four changes of request ``number``, as the core hands them over."""
    now = 1_000.0 + number / 1_000
    request = Request(
        id=f"req_bench_{number:09d}",
        user=f"user{number % 16}",
        model="llama-3-8b",
        task=Task.CHAT,
        priority="normal",
        estimate=_ESTIMATE,
        created_at=now,
        input=_PROMPT,
        shape=Shape(1, 130, 256),
    )
    user = request.user
    changes = [StateChange(request.snapshot(), transition_of(request, None, user, now))]
    request.transition(_S.DISPATCHING, now, placement=_PLACEMENT)
    charge = Charge(user, request.execution_id, now, 0.5)
    entry = transition_of(request, _S.QUEUED, "router", now)
    changes.append(StateChange(request.snapshot(), entry, charge))
    request.transition(_S.RUNNING, now)
    entry = transition_of(request, _S.DISPATCHING, "w", now)
    changes.append(StateChange(request.snapshot(), entry))
    request.transition(_S.SUCCEEDED, now, result=_ANSWER)
    entry = transition_of(request, _S.RUNNING, "w", now)
    charge = Charge(user, request.execution_id, now, 0.4)
    changes.append(StateChange(request.snapshot(), entry, charge))
    return changes


def _lifecycles(store: StateStore, requests: int) -> StoreRow:
    """Run ``requests`` requests' writes through ``store``; the row without its name."""
    spent = dict.fromkeys(_WRITES, 0.0)
    clock = time.perf_counter
    wall, cpu = clock(), _cpu_s()
    for number in range(requests):
        changes = _changes(number)
        for name, change in zip(_WRITES, changes, strict=True):
            began = clock()
            store.write([change])
            spent[name] += clock() - began
    wall, cpu = clock() - wall, _cpu_s() - cpu
    batched = clock()
    for first in range(requests, 2 * requests, BATCH):
        store.write(
            [c for n in range(first, min(first + BATCH, 2 * requests)) for c in _changes(n)]
        )
    batched = clock() - batched
    per = 1e6 / requests
    return StoreRow(
        store="",
        requests=requests,
        add_us=spent["add"] * per,
        claim_us=spent["claim"] * per,
        start_us=spent["start"] * per,
        end_us=spent["end"] * per,
        request_wall_us=wall * per,
        request_cpu_us=cpu * per,
        batched_us=batched * per,
    )


def run_store(stores: Sequence[str] = tuple(STORES), requests: int = 3_000) -> list[StoreRow]:
    """Measure each named store on ``requests`` requests, each in a fresh folder."""
    if not stores:
        raise ValueError(f"name at least one store: {', '.join(STORES)}")
    unknown = [name for name in stores if name not in STORES]
    if unknown:
        raise ValueError(f"stores are among {', '.join(STORES)}, not {', '.join(unknown)}")
    if requests < 1:
        raise ValueError("at least one request")
    rows = []
    for name in stores:
        with tempfile.TemporaryDirectory(prefix="gpurouter-bench-store-") as folder:
            store = STORES[name](Path(folder))
            try:
                row = _lifecycles(store, requests)
            finally:
                store.close()
        rows.append(StoreRow(**{**asdict(row), "store": name}))
    return rows


def command(
    store: Annotated[
        list[str] | None, typer.Option(help=f"A store to measure (repeat): {', '.join(STORES)}.")
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests per store.")] = 3_000,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every row here.")] = None,
) -> None:
    """What the state store costs per request: its four writes, alone and batched."""
    provenance = capture()
    try:
        rows = run_store(store or tuple(STORES), requests)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    print_table(
        "State store: one request's writes (µs)",
        ["store", "add", "claim", "start", "end", "request wall", "request CPU", "batched"],
        [
            [
                row.store,
                *(
                    f"{value:,.0f}"
                    for value in (
                        row.add_us,
                        row.claim_us,
                        row.start_us,
                        row.end_us,
                        row.request_wall_us,
                        row.request_cpu_us,
                        row.batched_us,
                    )
                ),
            ]
            for row in rows
        ],
    )
    if json_path is not None:
        data: dict[str, Any] = {
            "benchmark": "store",
            "rows": [asdict(row) for row in rows],
        }
        write_json(json_path, data, provenance)

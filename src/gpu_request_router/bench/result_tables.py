"""Markdown tables rendered from benchmark result JSON, one per table of the benchmarks document.

:data:`TABLES` names each table, the files of ``benchmarks/results/`` it is made from and how;
:func:`render` makes its lines. Numbers are written as people round them (halves up), with the
units and precision the document uses; a table that averages replays refuses files that differ
in more than what it compares (the seed, the starvation bound).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

__all__ = ["TABLES", "Table", "TablesError", "load", "render"]

Document = Mapping[str, Any]


class TablesError(ValueError):
    """The markdown's markers or a result file do not allow the tables to be rendered."""


@dataclass(frozen=True, slots=True)
class Table:
    """One generated table: the result files it is made from, and how."""

    sources: tuple[str, ...]
    render: Callable[[Sequence[Document]], list[str]]


# Cells ------------------------------------------------------------------------------------------


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _head(*columns: str, left: Sequence[int] = (0,)) -> list[str]:
    """The header and the alignment line: the columns numbered in ``left`` left, the rest right."""
    return [_row(columns), _row("---" if n in left else "---:" for n in range(len(columns)))]


def _fixed(value: float | None, digits: int) -> str:
    """``value`` to ``digits`` decimals, halves up as written (17.25 → 17.3); None: empty."""
    if value is None:
        return ""
    exact = Decimal(repr(value)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{exact:,.{digits}f}"


def _signed(value: float) -> str:
    return f"+{_fixed(value, 2)}" if value >= 0 else f"−{_fixed(-value, 2)}"


def _percent(ratio: float, digits: int) -> str:
    return f"{_fixed(ratio * 100, digits)} %"


def _code(name: str) -> str:
    return f"`{name}`"


def _placement_us(value: float) -> str:
    """Tenths of a microsecond below a millisecond, whole microseconds above."""
    return _fixed(value, 0 if value >= 1_000 else 1)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


# Tables -----------------------------------------------------------------------------------------


def _overhead(documents: Sequence[Document]) -> list[str]:
    (document,) = documents
    lines = _head(
        "target", "clients", "req/s", "p50", "p90", "p99", "added p50", "CPU ms/req of the middle"
    )
    lines += [
        _row(
            [
                row["target"],
                str(row["concurrency"]),
                _fixed(row["requests_per_s"], 0),
                *(_fixed(row[key], 2) for key in ("p50_ms", "p90_ms", "p99_ms")),
                _fixed(row["added_p50_ms"], 2),
                _fixed(row["router_cpu_ms_per_request"], 2),
            ]
        )
        for row in document["rows"]
    ]
    return lines


def _overhead_stores(documents: Sequence[Document]) -> list[str]:
    (document,) = documents
    lines = _head(
        "target", "clients", "req/s", "p50", "added p50", "CPU ms/req", "Redis scripts/req"
    )
    lines += [
        _row(
            [
                row["target"],
                str(row["concurrency"]),
                _fixed(row["requests_per_s"], 0),
                _fixed(row["p50_ms"], 2),
                _fixed(row["added_p50_ms"], 2),
                _fixed(row["router_cpu_ms_per_request"], 2),
                _fixed(row.get("redis_scripts_per_request"), 2),
            ]
        )
        for row in document["rows"]
    ]
    return lines


def _store(documents: Sequence[Document]) -> list[str]:
    (document,) = documents
    keys = (
        "add_us",
        "claim_us",
        "start_us",
        "end_us",
        "request_wall_us",
        "request_cpu_us",
        "batched_us",
    )
    lines = _head(
        "store", "add", "claim", "start", "end", "request wall", "request CPU", "batched wall"
    )
    lines += [
        _row([_code(row["store"]), *(_fixed(row[key], 0) for key in keys)])
        for row in document["rows"]
    ]
    return lines


def _decisions_placement(documents: Sequence[Document]) -> list[str]:
    (document,) = documents
    rows = document["placement"]
    fleets = sorted({row["gpus"] for row in rows})
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    median = {(row["gpus"], row["policy"], row["gpu_count"]): row["median_us"] for row in rows}
    lines = _head("policy (1 GPU / 2 GPUs)", *(f"{gpus:,} GPUs" for gpus in fleets))
    lines += [
        _row(
            [
                _code(policy),
                *(
                    f"{_placement_us(median[gpus, policy, 1])} / "
                    f"{_placement_us(median[gpus, policy, 2])}"
                    for gpus in fleets
                ),
            ]
        )
        for policy in policies
    ]
    return lines


def _decisions_admission(documents: Sequence[Document]) -> list[str]:
    (document,) = documents
    lines = _head("GPUs", "admission, median µs")
    lines += [
        _row([f"{row['gpus']:,}", _fixed(row["median_us"], 0)]) for row in document["admission"]
    ]
    return lines


def _decisions_queue(documents: Sequence[Document]) -> list[str]:
    (document,) = documents
    keys = ("push_us", "first_candidate_us", "dispatch_head_us", "remove_us")
    lines = _head("queue depth", "push", "first candidate", "dispatch head", "remove")
    lines += [
        _row([f"{row['depth']:,}", *(_fixed(row[key], 2) for key in keys)])
        for row in document["queue"]
    ]
    return lines


def _replay(documents: Sequence[Document]) -> list[str]:
    (document,) = documents
    lines = _head(
        "policy",
        *("p50 wait s", "p90 wait s", "p99 wait s", "mean wait s", "p99 latency s"),
        *("SLO", "memory", "OOM events", "Jain"),
    )
    lines += [
        _row(
            [
                _code(policy),
                _fixed(metrics["p50_queue_wait_s"], 3),
                _fixed(metrics["p90_queue_wait_s"], 2),
                _fixed(metrics["p99_queue_wait_s"], 2),
                _fixed(metrics["mean_queue_wait_s"], 3),
                _fixed(metrics["p99_latency_s"], 2),
                _percent(metrics["slo_attainment"], 2),
                _percent(metrics["gpu_memory_utilization"], 1),
                str(metrics["oom_events"]),
                _fixed(metrics["jain_fairness"], 3),
            ]
        )
        for policy, metrics in document["policies"].items()
    ]
    return lines


def _replay_sweep(documents: Sequence[Document]) -> list[str]:
    (document,) = documents
    sweep = document["sweep"]
    keys = list(next(iter(sweep["policies"].values())))
    lines = _head("policy", *(f"×{float(key):g}" for key in keys))
    lines += [
        _row(
            [
                _code(policy),
                *(
                    f"{_fixed(by_scale[key]['p99_queue_wait_s'], 1)} / "
                    f"{by_scale[key]['oom_events']} / "
                    f"{_percent(by_scale[key]['gpu_memory_utilization'], 0)}"
                    for key in keys
                ),
            ]
        )
        for policy, by_scale in sweep["policies"].items()
    ]
    return lines


def _like_for_like(documents: Sequence[Document], *varying: str) -> None:
    """Replays to be compared share trace, fleet and settings but ``varying``, each its own."""

    def fixed(document: Document) -> tuple[str, str]:
        settings = {k: v for k, v in document["settings"].items() if k not in varying}
        return json.dumps([document["trace"], document["fleet"]]), json.dumps(settings)

    if len({fixed(document) for document in documents}) > 1:
        raise TablesError(f"the replays differ in more than {', '.join(varying)}")
    compared = {tuple(document["settings"][key] for key in varying) for document in documents}
    if len(compared) < len(documents):
        raise TablesError(f"two replays have the same {', '.join(varying)}")


def _shared_policies(documents: Sequence[Document]) -> list[str]:
    """The policies every replay ran, in the order of the first."""
    return [
        policy
        for policy in documents[0]["policies"]
        if all(policy in document["policies"] for document in documents)
    ]


def _replay_seeds(documents: Sequence[Document]) -> list[str]:
    _like_for_like(documents, "seed")
    policies = _shared_policies(documents)
    metrics = {
        policy: [document["policies"][policy] for document in documents] for policy in policies
    }
    fewest = min(_mean([m["oom_events"] for m in metrics[policy]]) for policy in policies)
    lines = _head("policy", "p99 wait s", "mean wait s", "OOM events")
    for policy in policies:
        p99 = [m["p99_queue_wait_s"] for m in metrics[policy]]
        oom = [m["oom_events"] for m in metrics[policy]]
        oom_mean = _fixed(_mean(oom), 1)
        lines.append(
            _row(
                [
                    _code(policy),
                    f"{_fixed(_mean(p99), 2)} ({_fixed(min(p99), 2)}–{_fixed(max(p99), 2)})",
                    _fixed(_mean([m["mean_queue_wait_s"] for m in metrics[policy]]), 3),
                    f"{f'**{oom_mean}**' if _mean(oom) == fewest else oom_mean} "
                    f"({min(oom)}–{max(oom)})",
                ]
            )
        )
    return lines


def _service_seeds(documents: Sequence[Document]) -> list[str]:
    """Seeds of one replay on the service model: each policy's p99 latency against balanced's."""
    _like_for_like(documents, "seed")
    policies = _shared_policies(documents)
    metrics = {
        policy: [document["policies"][policy] for document in documents] for policy in policies
    }

    def mean(policy: str, key: str) -> float:
        return _mean([m[key] for m in metrics[policy]])

    lines = _head(
        "policy",
        "p99 latency s",
        "balanced's p99 lower by",
        "p50 latency s",
        "p99 wait s",
        "req/s",
        "OOM events",
    )
    for policy in policies:
        p99 = [m["p99_latency_s"] for m in metrics[policy]]
        gain = 1 - mean("balanced", "p99_latency_s") / mean(policy, "p99_latency_s")
        lines.append(
            _row(
                [
                    _code(policy),
                    f"{_fixed(_mean(p99), 2)} ({_fixed(min(p99), 2)}–{_fixed(max(p99), 2)})",
                    "—" if policy == "balanced" else _percent(gain, 1),
                    _fixed(mean(policy, "p50_latency_s"), 2),
                    _fixed(mean(policy, "p99_queue_wait_s"), 2),
                    _fixed(mean(policy, "throughput_rps"), 2),
                    _fixed(mean(policy, "oom_events"), 1),
                ]
            )
        )
    return lines


def _service_where(documents: Sequence[Document]) -> list[str]:
    """Per fleet and policy: the share of the work each GPU type ran, loads and memory in use."""
    fleets: dict[str, list[Document]] = {}
    for document in documents:
        fleets.setdefault(document["fleet"]["gpus"], []).append(document)
    kinds = sorted(
        {
            kind
            for d in documents
            for m in d["policies"].values()
            for kind in m["completed_by_gpu_type"]
        }
    )
    lines = _head(
        "fleet",
        "policy",
        *(f"on {kind}" for kind in kinds),
        "cold starts",
        "memory in use",
        left=(0, 1),
    )
    for fleet, group in fleets.items():
        _like_for_like(group, "seed")
        for policy in _shared_policies(group):
            metrics = [document["policies"][policy] for document in group]
            done = _mean([sum(m["completed_by_gpu_type"].values()) for m in metrics])
            shares = [
                _mean([m["completed_by_gpu_type"].get(kind, 0) for m in metrics]) / done
                for kind in kinds
            ]
            lines.append(
                _row(
                    [
                        fleet,
                        _code(policy),
                        *(_percent(share, 1) if share else "" for share in shares),
                        _fixed(_mean([m["cold_starts"] for m in metrics]), 0),
                        _percent(_mean([m["gpu_memory_utilization"] for m in metrics]), 0),
                    ]
                )
            )
    return lines


def _replay_bounds(documents: Sequence[Document]) -> list[str]:
    _like_for_like(documents, "seed", "starvation_bound_s")
    policies = _shared_policies(documents)
    by_bound: dict[float, list[Document]] = {}
    for document in documents:
        by_bound.setdefault(document["settings"]["starvation_bound_s"], []).append(document)
    seeds = {tuple(sorted(d["settings"]["seed"] for d in group)) for group in by_bound.values()}
    if len(seeds) > 1:
        raise TablesError("the starvation bounds were not replayed on the same seeds")
    keys = ("p90_queue_wait_s", "p99_queue_wait_s", "p999_queue_wait_s")
    lines = _head(
        *("bound s", "policy", "p90 wait s", "p99 wait s", "p99.9 wait s", "mean wait s"),
        "OOM events",
        left=(1,),
    )
    for bound in sorted(by_bound):
        for policy in policies:
            metrics = [document["policies"][policy] for document in by_bound[bound]]
            lines.append(
                _row(
                    [
                        f"{bound:,g}",
                        _code(policy),
                        *(_fixed(_mean([m[key] for m in metrics]), 2) for key in keys),
                        _fixed(_mean([m["mean_queue_wait_s"] for m in metrics]), 3),
                        _fixed(_mean([m["oom_events"] for m in metrics]), 1),
                    ]
                )
            )
    return lines


def _learning(documents: Sequence[Document]) -> list[str]:
    """The estimator's duration error per tenth of the trace, one replay per catalog and view."""
    _like_for_like(documents, "catalog_duration_scale", "known_output")
    (policy,) = _shared_policies(documents)
    lines = _head(
        "catalog durations",
        "answer length",
        "policy",
        *(f"{tenth}/10" for tenth in range(1, 11)),
        left=(1, 2),
    )
    for document in documents:
        settings = document["settings"]
        errors = document["policies"][policy]["duration_error_by_tenth"]
        lines.append(
            _row(
                [
                    f"×{settings['catalog_duration_scale']:g}",
                    "known" if settings["known_output"] else "unknown",
                    _code(policy),
                    *("" if error is None else _percent(error, 1) for error in errors),
                ]
            )
        )
    return lines


def _against_fgd(at: Mapping[str, Any]) -> str:
    """Ours against the paper's FGD, and against ``fgd`` as measured in the same run."""
    text = f"{_signed(at['vs_fgd_pct'])} against FGD"
    measured = at.get("vs_fgd_measured_pct")
    return text if measured is None else f"{text}, {_signed(measured)} against `fgd`"


def _packing(documents: Sequence[Document]) -> list[str]:
    (document,) = documents
    lines = _head(
        "policy", "GPU allocation %", "the paper", "difference", "fragmentation %", "the paper"
    )
    for policy, result in document["policies"].items():
        at = result["at_100"]
        paper = at["paper_policy"]
        lines.append(
            _row(
                [
                    _code(policy),
                    f"{_fixed(at['allocation_pct'], 2)} ± {_fixed(at['allocation_sd'], 2)}",
                    "—" if paper is None else f"{paper} {_fixed(at['paper_allocation_pct'], 2)}",
                    (_against_fgd(at) if paper is None else _signed(at["difference_pct"])),
                    f"{_fixed(at['fragmentation_pct'], 2)} ± {_fixed(at['fragmentation_sd'], 2)}",
                    "—" if paper is None else _fixed(at["paper_fragmentation_pct"], 2),
                ]
            )
        )
    return lines


_PAPER_POLICIES = ("Random", "DotProd", "GpuClustering", "GpuPacking", "BestFit", "FGD")
_PACKING = ("packing.json", "packing_gpushare100.json", "packing_multigpu50.json")


def _packing_workloads(documents: Sequence[Document]) -> list[str]:
    """Per workload: GPU allocation % at 100 %, ours and fgd measured, and the paper's six."""
    lines = _head(
        "workload",
        "`ours`",
        "`fgd`",
        "`ours` − `fgd`",
        *(f"paper {name}" for name in _PAPER_POLICIES),
    )
    for document in documents:
        policies, reference = document["policies"], document["reference"]
        ours = policies["ours"]["at_100"]["allocation_pct"]
        fgd = policies["fgd"]["at_100"]["allocation_pct"]
        lines.append(
            _row(
                [
                    _code(document["protocol"]["workload"]),
                    _fixed(ours, 2),
                    _fixed(fgd, 2),
                    _signed(ours - fgd),
                    *(
                        _fixed(reference[name]["allocation_at_100"], 2) if name in reference else ""
                        for name in _PAPER_POLICIES
                    ),
                ]
            )
        )
    return lines


_SEEDS = tuple(f"replay_seed{seed}.json" for seed in range(4))

TABLES: Mapping[str, Table] = {
    "overhead": Table(("overhead.json",), _overhead),
    "overhead-before": Table(("overhead_before.json",), _overhead),
    "overhead-shared": Table(("overhead_shared.json",), _overhead_stores),
    "store": Table(("store.json",), _store),
    "decisions-placement": Table(("decisions.json",), _decisions_placement),
    "decisions-admission": Table(("decisions.json",), _decisions_admission),
    "decisions-queue": Table(("decisions.json",), _decisions_queue),
    "replay": Table(("replay.json",), _replay),
    "replay-seeds": Table(_SEEDS, _replay_seeds),
    "replay-sweep": Table(("replay.json",), _replay_sweep),
    "replay-bounds": Table(
        (
            *_SEEDS[:2],
            *(f"replay_bound{bound}_seed{seed}.json" for bound in (5, 10, 1000) for seed in (0, 1)),
        ),
        _replay_bounds,
    ),
    "service-mixed": Table(
        tuple(f"service_mixed_seed{seed}.json" for seed in range(4)), _service_seeds
    ),
    "service-single": Table(
        tuple(f"service_single_seed{seed}.json" for seed in range(4)), _service_seeds
    ),
    "service-where": Table(
        tuple(
            f"service_{fleet}_seed{seed}.json" for fleet in ("mixed", "single") for seed in range(4)
        ),
        _service_where,
    ),
    "packing": Table(("packing.json",), _packing),
    "packing-gpushare100": Table(("packing_gpushare100.json",), _packing),
    "packing-multigpu50": Table(("packing_multigpu50.json",), _packing),
    "packing-workloads": Table(_PACKING, _packing_workloads),
    "learning": Table(
        (
            "learning_x2.json",
            "learning_x0.5.json",
            "learning_x2_unknown_output.json",
            "learning_x1_unknown_output.json",
        ),
        _learning,
    ),
}
"""Every generated table of the document, by the name its markers give it."""


def load(results: Path, name: str) -> Document:
    """The JSON object in file ``name`` of ``results``.

    Raises:
        TablesError: the file cannot be read, is not JSON, or not an object.
    """
    path = results / name
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise TablesError(f"{path}: cannot read it ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise TablesError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise TablesError(f"{path}: not a JSON object")
    return document


def render(name: str, results: Path) -> list[str]:
    """The lines of table ``name``, made from its result files in ``results``.

    Raises:
        TablesError: no such table, a file is missing or not JSON, or lacks a field it needs.
    """
    if name not in TABLES:
        raise TablesError(f"no table named {name!r} (known: {', '.join(TABLES)})")
    table = TABLES[name]
    documents = [load(results, source) for source in table.sources]
    try:
        return table.render(documents)
    except (KeyError, TypeError, ValueError) as exc:
        raise TablesError(
            f"table {name!r}: {', '.join(table.sources)} lack what it needs ({exc!r})"
        ) from exc

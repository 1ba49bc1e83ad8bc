"""Trace readers for ``gpurouter bench replay``: Azure LLM 2023, Alibaba openb pods, generic.

Every reader returns :class:`TraceRow` objects in file order, with ``timestamp_s`` counted from
the earliest row of the file. A malformed row raises :class:`TraceError` naming the file, the
line and the column.

Formats (``read_trace(path, format="auto")`` tells them apart by the header):

- **azure** — the Azure LLM inference trace 2023 (Splitwise): CSV ``TIMESTAMP,ContextTokens,
  GeneratedTokens``; ``TIMESTAMP`` is a wall-clock time such as ``2023-11-16 18:15:46.6805900``.
  Prompt and output tokens come from the trace; nothing else is in it.
- **alibaba** — the Alibaba ``cluster-trace-gpu-v2023`` pod list (``openb_pod_list_*.csv``):
  ``name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,
  deletion_time,scheduled_time``. A pod becomes a ``generic`` job: arrival at
  ``creation_time``; duration ``deletion_time − creation_time`` bounded to
  [:data:`ALIBABA_MIN_DURATION_S`, :data:`ALIBABA_MAX_DURATION_S`] (pods that never ended get the
  upper bound); ``num_gpu`` GPUs (pods without GPUs are skipped); on each GPU,
  ``gpu_milli / 1000`` of ``gpu_memory_mb`` (the caller passes the placeable memory of one GPU of
  the fleet, by default an H100's less the router's safety margin), at least 1 MiB; ``qos`` maps
  to a priority class (:data:`ALIBABA_PRIORITIES`; others: none, the configured default).
- **generic** — CSV (``.csv``) or JSON Lines (``.jsonl``, ``.ndjson``, one object a line, blank
  lines skipped). ``timestamp_s`` (seconds, any origin) is required; every other field is
  optional and defaults as :class:`TraceRow` documents.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from gpu_request_router.models.gpu_types import BUILTIN_GPU_TYPES

__all__ = [
    "ALIBABA_MAX_DURATION_S",
    "ALIBABA_MIN_DURATION_S",
    "ALIBABA_PRIORITIES",
    "FORMATS",
    "GENERIC_FIELDS",
    "TraceError",
    "TraceFormat",
    "TraceRow",
    "detect_format",
    "read_alibaba_pods",
    "read_azure",
    "read_generic",
    "read_trace",
]

TraceFormat = Literal["auto", "azure", "alibaba", "generic"]
FORMATS: Final = ("auto", "azure", "alibaba", "generic")

ALIBABA_MIN_DURATION_S: Final = 1.0
ALIBABA_MAX_DURATION_S: Final = 12 * 3600.0
ALIBABA_PRIORITIES: Final[Mapping[str, str]] = {
    "LS": "high",  # latency-sensitive
    "Guaranteed": "high",
    "Burstable": "normal",
    "BE": "batch",  # best effort
}
# The placeable memory of an H100 with the default 1,024 MiB safety margin.
_DEFAULT_POD_GPU_MEMORY_MB: Final = BUILTIN_GPU_TYPES["H100-80GB"].memory_mb - 1024

_AZURE_COLUMNS: Final = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_ALIBABA_COLUMNS: Final = ("name", "num_gpu", "gpu_milli", "creation_time", "deletion_time")
GENERIC_FIELDS: Final = (
    "timestamp_s",
    "user",
    "model",
    "priority",
    "input_tokens",
    "output_tokens",
    "duration_s",
    "gpu_memory_mb",
    "gpu_count",
)
_JSONL_SUFFIXES: Final = (".jsonl", ".ndjson")


class TraceError(ValueError):
    """A trace file that cannot be read: names the file, the line and the column at fault."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace, as the replay submits it.

    ``None`` means "not in the trace"; the replay then fills in a documented default:
    ``user`` — assigned deterministically (see ``bench/replay.py``); ``model`` — ``--model``;
    ``priority`` — the configured default class; ``input_tokens`` — 0; ``output_tokens`` — the
    model's ``max_output_tokens`` (what the router assumes, so the estimate is exact);
    ``duration_s`` and ``gpu_memory_mb`` (per GPU, the *true* figures) — computed by the router's
    estimator from the true token counts; ``gpu_count`` — 1.
    """

    timestamp_s: float
    user: str | None = None
    model: str | None = None
    priority: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    duration_s: float | None = None
    gpu_memory_mb: int | None = None
    gpu_count: int = 1


# Field parsing ---------------------------------------------------------------------------------


def _fail(path: Path, line: int, column: str, problem: str) -> TraceError:
    return TraceError(f"{path}: line {line}: column {column!r}: {problem}")


def _number(value: object, path: Path, line: int, column: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or value is None or value == "":
        raise _fail(path, line, column, f"expected a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _fail(path, line, column, f"expected a number, got {value!r}") from None
    if not math.isfinite(number) or number < minimum:
        raise _fail(path, line, column, f"must be a finite number ≥ {minimum:g}, got {value!r}")
    return number


def _integer(value: object, path: Path, line: int, column: str, *, minimum: int = 0) -> int:
    number = _number(value, path, line, column, minimum=minimum)
    if number != int(number):
        raise _fail(path, line, column, f"expected a whole number, got {value!r}")
    return int(number)


def _text(value: object, path: Path, line: int, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, line, column, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file whose header must hold ``required``."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [name for name in required if name not in header]
        if missing:
            raise _fail(path, 1, missing[0], f"missing from the header {header}")
        for row in reader:
            line = reader.line_num
            if None in row:
                raise TraceError(f"{path}: line {line}: more fields than the header has")
            yield line, row


def _rebase(rows: list[TraceRow]) -> list[TraceRow]:
    """The rows with timestamps counted from the earliest one."""
    if not rows:
        return rows
    start = min(row.timestamp_s for row in rows)
    if start == 0:
        return rows
    return [replace(row, timestamp_s=row.timestamp_s - start) for row in rows]


# Readers ---------------------------------------------------------------------------------------


def _azure_time(value: str, path: Path, line: int) -> float:
    """Seconds since the epoch (UTC) of ``2023-11-16 18:15:46.6805900`` (any fraction digits)."""
    text = value.strip()
    whole, _, fraction = text.partition(".")
    try:
        moment = datetime.fromisoformat(whole)
        seconds = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
        extra = float(f"0.{fraction}") if fraction else 0.0
    except ValueError:
        raise _fail(path, line, "TIMESTAMP", f"expected a date and time, got {value!r}") from None
    if fraction and not fraction.isdigit():
        raise _fail(path, line, "TIMESTAMP", f"expected a date and time, got {value!r}")
    return seconds + extra


def read_azure(path: str | Path) -> list[TraceRow]:
    """Read an Azure LLM inference trace 2023 CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    path = Path(path)
    rows = []
    for line, row in _csv_rows(path, _AZURE_COLUMNS):
        rows.append(
            TraceRow(
                timestamp_s=_azure_time(row["TIMESTAMP"], path, line),
                input_tokens=_integer(row["ContextTokens"], path, line, "ContextTokens"),
                output_tokens=_integer(row["GeneratedTokens"], path, line, "GeneratedTokens"),
            )
        )
    return _rebase(rows)


def read_alibaba_pods(
    path: str | Path, *, gpu_memory_mb: int = _DEFAULT_POD_GPU_MEMORY_MB
) -> list[TraceRow]:
    """Read an Alibaba openb pod list: one ``generic`` job per pod that asks for GPUs.

    ``gpu_memory_mb`` is the placeable memory of one GPU; a pod gets ``gpu_milli / 1000`` of it
    on each of its ``num_gpu`` GPUs (see the module docstring for every mapping).
    """
    path = Path(path)
    rows = []
    for line, row in _csv_rows(path, _ALIBABA_COLUMNS):
        gpus = _integer(row["num_gpu"], path, line, "num_gpu")
        if gpus == 0:
            continue
        milli = _integer(row["gpu_milli"], path, line, "gpu_milli")
        if not 0 < milli <= 1000:
            raise _fail(path, line, "gpu_milli", f"must be in 1..1000, got {row['gpu_milli']!r}")
        created = _number(row["creation_time"], path, line, "creation_time")
        deleted_text = row["deletion_time"]
        if _missing(deleted_text):
            duration = ALIBABA_MAX_DURATION_S
        else:
            deleted = _number(deleted_text, path, line, "deletion_time")
            if deleted < created:
                raise _fail(path, line, "deletion_time", "is before creation_time")
            duration = deleted - created
        duration = min(max(duration, ALIBABA_MIN_DURATION_S), ALIBABA_MAX_DURATION_S)
        qos = (row.get("qos") or "").strip()
        rows.append(
            TraceRow(
                timestamp_s=created,
                model="generic",
                priority=ALIBABA_PRIORITIES.get(qos),
                duration_s=duration,
                gpu_memory_mb=max(1, gpu_memory_mb * milli // 1000),
                gpu_count=gpus,
            )
        )
    return _rebase(rows)


def _generic_row(raw: Mapping[str, Any], path: Path, line: int) -> TraceRow:
    unknown = sorted(set(raw) - set(GENERIC_FIELDS))
    if unknown:
        known = ", ".join(GENERIC_FIELDS)
        raise _fail(path, line, unknown[0], f"unknown column (known: {known})")
    if _missing(raw.get("timestamp_s")):
        raise _fail(path, line, "timestamp_s", "is required")

    def optional(column: str, parse: Callable[[object, Path, int, str], Any]) -> Any:
        value = raw.get(column)
        return None if _missing(value) else parse(value, path, line, column)

    input_tokens = optional("input_tokens", _integer)
    output_tokens = optional("output_tokens", _integer)
    gpu_memory = optional("gpu_memory_mb", _integer)
    count = optional("gpu_count", lambda v, p, n, c: _integer(v, p, n, c, minimum=1))
    return TraceRow(
        timestamp_s=_number(raw["timestamp_s"], path, line, "timestamp_s", minimum=-math.inf),
        user=optional("user", _text),
        model=optional("model", _text),
        priority=optional("priority", _text),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        duration_s=optional("duration_s", _number),
        gpu_memory_mb=gpu_memory,
        gpu_count=1 if count is None else count,
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open: {exc.strerror or exc}") from None
    for line, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            raw = json.loads(content)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}: line {line}: not JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise TraceError(f"{path}: line {line}: expected a JSON object")
        yield line, raw


def read_generic(path: str | Path) -> list[TraceRow]:
    """Read a generic trace: JSON Lines (``.jsonl``/``.ndjson``) or else CSV, by extension."""
    path = Path(path)
    if path.suffix.lower() in _JSONL_SUFFIXES:
        source: Iterator[tuple[int, Mapping[str, Any]]] = _jsonl_rows(path)
    else:
        source = _csv_rows(path, ("timestamp_s",))
    return _rebase([_generic_row(raw, path, line) for line, raw in source])


def detect_format(path: str | Path) -> Literal["azure", "alibaba", "generic"]:
    """Tell the format of a trace from its first line (see the module docstring)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open: {exc.strerror or exc}") from None
    if first.lstrip().startswith("{"):
        return "generic"
    header = {name.strip() for name in next(csv.reader([first]), [])}
    if set(_AZURE_COLUMNS) <= header:
        return "azure"
    if set(_ALIBABA_COLUMNS) <= header:
        return "alibaba"
    if "timestamp_s" in header:
        return "generic"
    raise TraceError(
        f"{path}: line 1: cannot tell the trace format from the header {sorted(header)}; "
        "expected Azure (TIMESTAMP, ContextTokens, GeneratedTokens), Alibaba openb pods "
        "(creation_time, gpu_milli, ...) or generic (timestamp_s, ...)"
    )


def read_trace(
    path: str | Path,
    format: TraceFormat = "auto",
    *,
    gpu_memory_mb: int = _DEFAULT_POD_GPU_MEMORY_MB,
) -> list[TraceRow]:
    """Read a trace of ``format`` (``auto``: detected from the header).

    ``gpu_memory_mb`` is the placeable memory of one GPU, used for Alibaba pods' ``gpu_milli``.
    """
    kind = detect_format(path) if format == "auto" else format
    if kind == "azure":
        return read_azure(path)
    if kind == "alibaba":
        return read_alibaba_pods(path, gpu_memory_mb=gpu_memory_mb)
    if kind == "generic":
        return read_generic(path)
    raise TraceError(f"unknown trace format {format!r} (expected one of {', '.join(FORMATS)})")

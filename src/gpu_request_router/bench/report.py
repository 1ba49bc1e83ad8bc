"""What every benchmark shares: its option parsing, its tables, its JSON file with provenance."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_request_router.bench.provenance import finished

__all__ = ["parse_counts", "print_table", "write_json"]

_console = Console(width=200)


def parse_counts(text: str, option: str) -> list[int]:
    """Positive whole numbers from a comma-separated list such as ``1,16,64``.

    Raises:
        typer.BadParameter: an item is not a positive whole number, or there is none.
    """
    try:
        counts = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise typer.BadParameter("expected positive whole numbers, e.g. 1,16,64", param_hint=option)
    return counts


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print one result table; the first column is left-aligned, the rest right-aligned.

    Cells are text, never markup (a target such as ``router [redis]`` keeps its brackets).
    """
    table = Table(title=escape(title), title_justify="left")
    for number, column in enumerate(columns):
        table.add_column(escape(column), justify="left" if number == 0 else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    _console.print(table)


def write_json(path: Path, data: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` as indented JSON (creating its folder), provenance first.

    Args:
        path: the file.
        data: the result.
        provenance: what :func:`gpu_request_router.bench.provenance.capture` gave when the run
            started; it is written finished now, under the ``provenance`` key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"provenance": finished(provenance), **data}
    path.write_text(json.dumps(document, indent=2) + "\n")

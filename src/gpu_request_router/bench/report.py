"""What every benchmark shares: the machine it ran on, its tables, its JSON file."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from gpu_request_router import __version__

__all__ = ["machine", "parse_counts", "print_table", "write_json"]

_console = Console(width=200)


def machine() -> dict[str, Any]:
    """The machine and software a result was measured on."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


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
    """Print one result table; the first column is left-aligned, the rest right-aligned."""
    table = Table(title=title, title_justify="left")
    for number, column in enumerate(columns):
        table.add_column(column, justify="left" if number == 0 else "right")
    for row in rows:
        table.add_row(*row)
    _console.print(table)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` as indented JSON (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")

"""``gpurouter bench``: the benchmarks, each a command that prints a table and writes JSON."""

from __future__ import annotations

import typer

__all__ = ["bench_app"]

bench_app = typer.Typer(
    help="Benchmarks: router overhead, decision cost, placement quality on traces, packing.",
    no_args_is_help=True,
)

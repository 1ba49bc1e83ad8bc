"""``gpurouter bench``: the benchmarks, each a command that prints a table and writes JSON."""

from __future__ import annotations

import typer

from gpu_request_router.bench import decisions, doc_tables, overhead, packing, replay, store
from gpu_request_router.config.config_loader import LoggingSettings
from gpu_request_router.utils.logging import configure_logging

__all__ = ["bench_app"]

bench_app = typer.Typer(
    help=(
        "Benchmarks: router overhead, state-store cost, decision cost, placement quality on "
        "traces, packing; the tables of the benchmarks document from their JSON."
    ),
    no_args_is_help=True,
)


@bench_app.callback()
def _quiet() -> None:
    """Engine logs below warning would drown the tables; what is left goes to stderr."""
    configure_logging(LoggingSettings(level="warning", format="console"))


bench_app.command("overhead")(overhead.command)
bench_app.command("store")(store.command)
bench_app.command("decisions")(decisions.command)
bench_app.command("replay")(replay.command)
bench_app.command("packing")(packing.command)
bench_app.command("tables")(doc_tables.command)

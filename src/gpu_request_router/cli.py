"""The ``gpurouter`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_request_router.config.config_loader import load_settings
from gpu_request_router.demo import DEMO_BACKENDS, run_demo
from gpu_request_router.exceptions import ConfigError

__all__ = ["app"]

app = typer.Typer(
    name="gpurouter",
    help="gpu-request-router: a GPU-aware, fair and durable router in front of a GPU fleet.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _main() -> None:
    """gpu-request-router: a GPU-aware, fair and durable router in front of a GPU fleet."""


@app.command()
def demo(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A config file (default: a built-in demo fleet)."),
    ] = None,
    policy: Annotated[str | None, typer.Option(help="Placement policy to use.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulation.")] = 7,
) -> None:
    """Run a short simulated workload in virtual time and show where each request went and why."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))  # a pipe or log: keep rows whole
    overrides: dict[str, object] = {"auth": {"enabled": False}, "state": {"backend": "memory"}}
    if config is None:
        overrides["backends"] = DEMO_BACKENDS
    if policy is not None:
        overrides["placement"] = {"policy": policy}
    try:
        settings = load_settings(config, overrides=overrides)
    except ConfigError as exc:
        console.print(f"[red]invalid configuration[/red] {exc}")
        raise typer.Exit(2) from exc
    simulated = [backend for backend in settings.backends if backend.kind == "simulated"]
    if not simulated:
        console.print(
            "[red]invalid configuration[/red] backends: the demo runs on simulated backends "
            "and this configuration has none"
        )
        raise typer.Exit(2)
    report = run_demo(settings, seed=seed)
    fleet = ", ".join(
        f"{group.count}×{group.type}" for backend in simulated for group in backend.gpus
    )
    console.print(
        f"[bold]Simulated fleet[/bold]: {fleet}; policy [bold]{settings.placement.policy}"
        f"[/bold]; {len(report.records)} requests accepted, {len(report.rejections)} rejected "
        f"(virtual time, {report.end_time:.1f} s simulated)."
    )
    table = Table(show_lines=False)
    for column in (
        "request",
        "user",
        "model",
        "prio",
        "status",
        "GPU(s)",
        "tries",
        "wait s",
        "why",
    ):
        table.add_column(column, overflow="fold")
    for record in report.records:
        style = {"succeeded": "green", "failed": "red", "expired": "yellow"}.get(record.status, "")
        why = record.reason or "-"
        if record.retried_after:
            why = f"{why}; retried after {', '.join(record.retried_after)}"
        if record.error:
            why = f"{why} ({record.error})"
        table.add_row(
            record.id[-8:],
            record.user,
            record.model,
            record.priority,
            f"[{style}]{record.status}[/{style}]" if style else record.status,
            ",".join(record.gpu_ids) or "-",
            str(record.attempts),
            f"{record.queue_wait_s:.2f}",
            escape(why),
        )
    console.print(table)
    for rejection in report.rejections:
        console.print(
            f"[red]rejected[/red] {rejection.user}: {rejection.reason}: {rejection.message}"
        )


if __name__ == "__main__":
    app()

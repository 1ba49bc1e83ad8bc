"""``gpurouter top``: a live view of the router in the terminal, polling its API.

Each refresh reads ``GET /v1/gpus``, the queued requests and the latest ones
(``GET /v1/requests``), ``GET /v1/metrics``, and the users' usage against their quotas
(``GET /v1/users`` for an admin; a user sees their own, ``GET /v1/quota``), then redraws:

- the GPU grid: memory as used / reserved / free (a bar: reserved by the router, used beyond
  that by others, free; and the figures), utilisation, health, cordon, running executions;
- the queue by priority class, with each request's position and age;
- the latest requests with their placement reason;
- throughput, queue wait and latency percentiles;
- usage against quota per user.

A user's key shows that user's requests only (the router's rule); the GPUs and the fleet-wide
figures are everyone's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gpu_request_router.client import ApiError, RouterClient

__all__ = ["Snapshot", "render", "run", "take"]

_BAR = 24
_QUEUED_SHOWN = 30
_RECENT = 12


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one refresh read from the router."""

    url: str
    gpus: list[dict[str, Any]]
    queued: list[dict[str, Any]]
    recent: list[dict[str, Any]]
    metrics: dict[str, Any]
    users: list[dict[str, Any]]
    at: float


def take(client: RouterClient) -> Snapshot:
    """Read everything the view shows (one call per endpoint)."""
    try:
        users = client.users()
    except ApiError as exc:
        if exc.status != 403:
            raise
        own = client.quota()
        users = [{"name": own["user"], "quota": own["limits"], "usage": own["usage"]}]
    return Snapshot(
        url=client.base_url,
        gpus=client.gpus(),
        queued=client.page(limit=500, status="queued"),
        recent=client.page(limit=_RECENT),
        metrics=client.metrics(),
        users=users,
        at=time.time(),
    )


def _memory_bar(gpu: dict[str, Any]) -> Text:
    """Reserved by the router (yellow), used beyond that by others (red), the rest (green)."""
    total = max(1, gpu["memory_total_mb"])
    reserved = min(_BAR, round(_BAR * gpu["memory_reserved_mb"] / total))
    beyond = max(0, gpu["memory_used_mb"] - gpu["memory_reserved_mb"])
    others = min(_BAR - reserved, round(_BAR * beyond / total))
    bar = Text()
    bar.append("█" * reserved, style="yellow")
    bar.append("█" * others, style="red")
    bar.append("░" * (_BAR - reserved - others), style="green")
    return bar


def _gib(mb: float) -> str:
    return f"{mb / 1024:.1f}"


def _gpu_table(gpus: list[dict[str, Any]]) -> Table:
    title = "GPUs (memory bar: reserved by the router, used by others, free; GiB)"
    table = Table(title=title, title_justify="left")
    for column in ("GPU", "type", "memory", "used", "resv", "free", "util %", "health", "run"):
        table.add_column(column, no_wrap=True)
    for gpu in gpus:
        health = gpu["health"]
        style = {"healthy": "green", "degraded": "yellow"}.get(health, "red")
        state = Text(health, style=style)
        if gpu["cordoned"]:
            state.append(" cordoned", style="magenta")
        util = gpu["utilization_pct"]
        table.add_row(
            gpu["id"],
            gpu["type"],
            _memory_bar(gpu),
            _gib(gpu["memory_used_mb"]),
            _gib(gpu["memory_reserved_mb"]),
            _gib(gpu["memory_free_mb"]),
            "-" if util is None else f"{util:.0f}",
            state,
            f"{len(gpu['running_requests'])}/{gpu['slots']}",
        )
    return table


def _age(created_at: str, now: float) -> str:
    created = datetime.fromisoformat(created_at.replace("Z", "+00:00")).timestamp()
    return f"{max(0.0, now - created):.0f}s"


def _queue_table(snapshot: Snapshot) -> Table:
    depths: dict[str, int] = snapshot.metrics.get("queue_depth", {})
    title = "queue: " + (", ".join(f"{name} {n}" for name, n in depths.items()) or "empty")
    table = Table(title=title, title_justify="left")
    for column in ("class", "pos", "id", "user", "model", "age"):
        table.add_column(column, no_wrap=True)
    order = {name: rank for rank, name in enumerate(depths)}

    def position(request: dict[str, Any]) -> tuple[int, int]:
        place = request.get("queue_position")
        return order.get(request["priority"], len(order)), place if place is not None else 1 << 30

    for request in sorted(snapshot.queued, key=position)[:_QUEUED_SHOWN]:
        place = request.get("queue_position")
        table.add_row(
            request["priority"],
            "-" if place is None else str(place),
            request["id"],
            request["user"],
            request["model"],
            _age(request["created_at"], snapshot.at),
        )
    return table


def _recent_table(recent: list[dict[str, Any]]) -> Table:
    table = Table(title="latest requests", title_justify="left")
    for column in ("id", "user", "model", "status", "GPU", "wait s", "placement reason"):
        table.add_column(column, no_wrap=column != "placement reason")
    for request in recent:
        placement = request.get("placement") or {}
        table.add_row(
            request["id"],
            request["user"],
            request["model"],
            request["status"],
            placement.get("gpu_id", "-"),
            f"{request['queue_wait_s']:.2f}",
            placement.get("reason", ""),
        )
    return table


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _figures(metrics: dict[str, Any]) -> Text:
    wait, latency = metrics["queue_wait_s"], metrics["latency_s"]
    gpus = metrics["gpus"]
    requests = metrics["requests"]
    util = gpus["utilization_pct"]
    return Text.assemble(
        ("throughput ", "bold"),
        f"{metrics['throughput_rps']:.2f} req/s   ",
        ("queue wait ", "bold"),
        f"p50 {_seconds(wait['p50'])} p90 {_seconds(wait['p90'])} p99 {_seconds(wait['p99'])} s   ",
        ("latency ", "bold"),
        f"p50 {_seconds(latency['p50'])} p99 {_seconds(latency['p99'])} s\n",
        ("requests ", "bold"),
        " ".join(f"{status} {n}" for status, n in requests.items()) or "none",
        "   ",
        ("GPUs ", "bold"),
        f"{gpus['schedulable']}/{gpus['count']} schedulable, "
        f"util {'-' if util is None else f'{util:.0f}%'}",
    )


def _limit(value: float | None) -> str:
    return "∞" if value is None else f"{value:g}"


def _quota_table(users: list[dict[str, Any]]) -> Table:
    table = Table(title="usage / quota", title_justify="left")
    for column in ("user", "running", "queued", "req/min", "GPU-s/h"):
        table.add_column(column, no_wrap=True)
    for user in users:
        quota, usage = user["quota"], user["usage"]
        table.add_row(
            user["name"],
            f"{usage['concurrent']}/{_limit(quota['max_concurrent'])}",
            f"{usage['queued']}/{_limit(quota['max_queued'])}",
            f"{usage['requests_last_minute']}/{_limit(quota['requests_per_minute'])}",
            f"{usage['gpu_seconds_last_hour']:.0f}/{_limit(quota['gpu_seconds_per_hour'])}",
        )
    return table


def render(snapshot: Snapshot) -> RenderableType:
    """The whole view of one snapshot."""
    clock = datetime.fromtimestamp(snapshot.at).strftime("%H:%M:%S")
    header = Text.assemble(("gpurouter top", "bold cyan"), f"  {snapshot.url}  {clock}")
    return Group(
        header,
        _figures(snapshot.metrics),
        _gpu_table(snapshot.gpus),
        _queue_table(snapshot),
        _recent_table(snapshot.recent),
        _quota_table(snapshot.users),
    )


def run(
    read: Callable[[], Snapshot],
    *,
    interval_s: float,
    iterations: int | None,
    console: Console,
) -> None:
    """Redraw every ``interval_s`` until ``iterations`` refreshes are shown (``None``: forever).

    Ctrl-C (``KeyboardInterrupt``) is the caller's to catch.
    """
    shown = 1
    with Live(render(read()), console=console, auto_refresh=False, transient=False) as live:
        while iterations is None or shown < iterations:
            time.sleep(interval_s)
            live.update(render(read()), refresh=True)
            shown += 1

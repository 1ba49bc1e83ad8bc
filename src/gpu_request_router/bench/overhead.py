"""``gpurouter bench overhead``: the latency and CPU the router adds in front of a backend.

It starts two real processes on loopback — the OpenAI-compatible stand-in backend
(:mod:`gpu_request_router.bench.openai_standin`, which answers at once) and ``gpurouter serve``
with that stand-in as its one ``openai`` backend — and drives each target with the closed-loop
load generator (:mod:`gpu_request_router.bench.loadgen`), itself a separate process, at every
concurrency asked for:

- ``direct``: chat completions straight to the stand-in (the floor);
- ``passthrough``: the same through a bare pass-through proxy on the router's HTTP stack
  (:mod:`gpu_request_router.bench.passthrough`: uvicorn and aiohttp, nothing else) — the floor
  of any router built on that stack, a third process;
- ``router``: the same chat completions through the router's OpenAI door — authentication,
  validation, the estimate, every quota check, the queue, placement, the audit trail in the
  state store, forwarding and the answer;
- ``submit``: the durable async API, ``POST /v1/requests`` (202 once stored);
- ``submit+wait``: ``POST /v1/requests`` then ``GET /v1/requests/{id}?wait=30``;
- ``peer``: chat completions to each ``--peer`` URL (another router, set up by hand in front of
  its own backend, with ``--peer-api-key`` if it wants one), measured by the same harness; its
  CPU is read when its process is visible in /proc.

The router runs with authentication on, a durable SQLite store (or ``--state``), and quotas that
are all checked but set high enough never to refuse. ``--state`` may name several stores,
comma-separated: a router is started on each, and its targets are named after it (``router
[redis]``), so that one run compares them side by side against one floor. ``redis-shared`` is
two routers sharing one Redis prefix (``gpurouter serve --workers 2``, ``state.shared``): their
figures are the two processes' together. Router CPU per request is the growth of the router
process's (or the pass-through's) user + system time (``/proc/PID/stat``, with its children's for
``--workers``) over the run, divided by the requests sent to it; the added p50 is its p50 minus
the direct p50 at the same concurrency, in the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import redis
import typer
import yaml

from gpu_request_router.bench.provenance import capture
from gpu_request_router.bench.report import parse_counts, print_table, write_json
from gpu_request_router.http.keys import hash_key
from gpu_request_router.testing import drop_redis_prefix, free_port

__all__ = ["OverheadReport", "Row", "print_overhead", "run_overhead", "write_overhead"]

_MODEL = "llama-3-8b"
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_STATES = ("sqlite", "sqlite-full", "memory", "redis", "redis-shared")


@dataclass(frozen=True, slots=True)
class Row:
    """One target at one concurrency."""

    target: str
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    errors: dict[str, int]
    router_cpu_ms_per_request: float | None = None
    backend_cpu_ms_per_request: float | None = None
    added_p50_ms: float | None = None
    # On the Redis store: the scripts (EVALSHA: commits, lease renewals, probes) the router ran
    # per request sent; group commit makes it less than one under load.
    redis_scripts_per_request: float | None = None


@dataclass(frozen=True, slots=True)
class OverheadReport:
    """Every row, and how the run was set up."""

    rows: list[Row]
    setup: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "benchmark": "overhead",
            "setup": self.setup,
            "rows": [asdict(row) for row in self.rows],
        }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and of its live children so far."""
    total = 0.0
    for proc in [Path(f"/proc/{pid}"), *_children(pid)]:
        with contextlib.suppress(OSError):
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def _children(pid: int) -> list[Path]:
    """The /proc entries of a process's live children (the routers of ``serve --workers``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(proc)
    return found


def _pid_listening_on(port: int) -> int | None:
    """The process listening on a loopback TCP ``port``, where /proc lets us see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
    return None


@contextlib.contextmanager
def _process(
    command: Sequence[str], ready_url: str, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, up once ``ready_url`` answers 200; stopped (SIGTERM, then KILL) after."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"}
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, timeout=1).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{command[2] if len(command) > 2 else command[0]} did not start; its "
                        f"output:\n{log.read_text()[-2000:]}"
                    )
                time.sleep(0.05)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _router_config(folder: Path, port: int, backend_url: str, key: str, state: str) -> Path:
    store: dict[str, Any] = {"backend": state.removesuffix("-full").removesuffix("-shared")}
    if state in ("sqlite", "sqlite-full"):
        store["sqlite_path"] = str(folder / f"state-{state}.db")
        store["sqlite_synchronous"] = "full" if state == "sqlite-full" else "normal"
    elif state in ("redis", "redis-shared"):
        store["redis_url"] = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
        store["redis_prefix"] = f"gpurouter-bench-{folder.name}-{state}"
        store["shared"] = state == "redis-shared"
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "auth": {
            "enabled": True,
            "users": [{"name": "bench", "role": "user", "api_key_sha256": hash_key(key)}],
        },
        "state": store,
        "logging": {"level": "warning"},
        # Every quota is checked; none is low enough to refuse during a run.
        "quotas": {
            "default": {
                "requests_per_minute": 100_000_000,
                "max_concurrent": 100_000,
                "max_queued": 100_000,
                "gpu_seconds_per_hour": 1e12,
                "max_priority": "high",
            }
        },
        "backends": [
            {
                "name": "standin",
                "kind": "openai",
                "url": backend_url,
                "gpu": {"type": "H100-80GB"},
                "models": [_MODEL],
                "slots_per_gpu": 1024,
            }
        ],
    }
    path = folder / f"router-{state}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _load(
    url: str, mode: str, concurrency: int, duration_s: float, warmup_s: float, key: str | None
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "gpu_request_router.bench.loadgen",
        "--url",
        url,
        "--mode",
        mode,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration_s),
        "--warmup",
        str(warmup_s),
        "--model",
        _MODEL,
    ]
    if key is not None:
        command += ["--api-key", key]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class _ScriptCounter:
    """The scripts a Redis server has run for its clients (``INFO commandstats``' EVALSHA)."""

    def __init__(self, url: str) -> None:
        # Any: redis-py types its sync commands as "a value or an awaitable".
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=5)

    def count(self) -> int:
        stats: dict[str, dict[str, Any]] = self._redis.info("commandstats")
        return sum(
            int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
        )

    def close(self) -> None:
        self._redis.close()


def _row(target: str, result: dict[str, Any], cpu: dict[str, float | None]) -> Row:
    sent = max(int(result["sent"]), 1)
    latency = result["latency_ms"]
    router, backend = cpu.get("router"), cpu.get("backend")
    return Row(
        target=target,
        concurrency=int(result["concurrency"]),
        requests_per_s=float(result["requests_per_s"]),
        p50_ms=float(latency["p50"]),
        p90_ms=float(latency["p90"]),
        p99_ms=float(latency["p99"]),
        requests=int(result["requests"]),
        errors=dict(result["errors"]),
        router_cpu_ms_per_request=None if router is None else router * 1000 / sent,
        backend_cpu_ms_per_request=None if backend is None else backend * 1000 / sent,
    )


def run_overhead(
    concurrencies: Sequence[int] = (1, 16, 64),
    *,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    state: str | Sequence[str] = "sqlite",
    peers: Sequence[str] = (),
    peer_api_key: str | None = None,
    async_api: bool = True,
) -> OverheadReport:
    """Start the stand-in and a router per state, drive every target at every concurrency."""
    states = [state] if isinstance(state, str) else list(state)
    if not concurrencies or min(concurrencies) < 1:
        raise ValueError("concurrencies must be positive")
    if duration_s <= 0 or warmup_s < 0:
        raise ValueError("the duration must be positive and the warm-up not negative")
    if not states or any(s not in _STATES for s in states) or len(set(states)) < len(states):
        raise ValueError(f"states are distinct, each one of {', '.join(_STATES)}")
    for peer in peers:
        if not peer.startswith(("http://", "https://")):
            raise ValueError(f"a peer is an http(s) URL, not {peer!r}")
    key = f"gpr_{secrets.token_urlsafe(24)}"
    rows: list[Row] = []
    redis_states: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="gpurouter-bench-") as tmp,
        contextlib.ExitStack() as up,
    ):
        folder = Path(tmp)
        backend_port, proxy_port = free_port(), free_port()
        backend_url = f"http://127.0.0.1:{backend_port}"
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        standin = [sys.executable, "-m", "gpu_request_router.bench.openai_standin"]
        proxy = [sys.executable, "-m", "gpu_request_router.bench.passthrough"]
        backend_process = up.enter_context(
            _process(
                [*standin, "--port", str(backend_port)],
                f"{backend_url}/health",
                folder / "standin.log",
            )
        )
        proxy_process = up.enter_context(
            _process(
                [*proxy, "--backend", backend_url, "--port", str(proxy_port)],
                f"{proxy_url}/health",
                folder / "passthrough.log",
            )
        )
        targets: list[tuple[str, str, str, str | None, int | None, str | None]] = [
            ("direct", backend_url, "chat", None, None, None),
            ("passthrough", proxy_url, "chat", None, proxy_process.pid, None),
        ]
        scripts: _ScriptCounter | None = None
        for each in states:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            config = _router_config(folder, port, backend_url, key, each)
            router = [sys.executable, "-m", "gpu_request_router.cli", "serve"]
            router += ["--config", str(config)]
            if each == "redis-shared":
                router += ["--workers", "2"]
            process = up.enter_context(_process(router, f"{url}/readyz", folder / f"{each}.log"))
            stored = yaml.safe_load(config.read_text())["state"]
            if each.startswith("redis"):
                redis_states.append(stored)
                scripts = scripts or _ScriptCounter(stored["redis_url"])
            label = "" if len(states) == 1 else f" [{each}]"
            targets.append((f"router{label}", url, "chat", key, process.pid, each))
            if async_api:
                targets += [
                    (f"submit{label}", url, "submit", key, process.pid, each),
                    (f"submit+wait{label}", url, "submit_wait", key, process.pid, each),
                ]
        peer_pids = {peer: _pid_listening_on(httpx.URL(peer).port or 80) for peer in peers}
        targets += [
            (f"peer {peer}", peer, "chat", peer_api_key, peer_pids[peer], None) for peer in peers
        ]
        for concurrency in concurrencies:
            direct_p50: float | None = None
            for target, url, mode, api_key, pid, of_state in targets:
                router_before = _cpu_s(pid) if pid else 0.0
                backend_before = _cpu_s(backend_process.pid)
                on_redis = scripts is not None and (of_state or "").startswith("redis")
                scripts_before = scripts.count() if scripts is not None and on_redis else 0
                result = _load(url, mode, concurrency, duration_s, warmup_s, api_key)
                cpu = {
                    "router": _cpu_s(pid) - router_before if pid else None,
                    # A peer may use another backend: the stand-in's CPU says nothing then.
                    "backend": None
                    if target.startswith("peer")
                    else _cpu_s(backend_process.pid) - backend_before,
                }
                row = _row(target, result, cpu)
                if scripts is not None and on_redis:
                    ran = scripts.count() - scripts_before
                    row = Row(
                        **{
                            **asdict(row),
                            "redis_scripts_per_request": ran / max(int(result["sent"]), 1),
                        }
                    )
                if target == "direct":
                    direct_p50 = row.p50_ms
                elif mode == "chat" and direct_p50 is not None and row.requests:
                    row = Row(**{**asdict(row), "added_p50_ms": row.p50_ms - direct_p50})
                rows.append(row)
        up.close()  # the routers stop before their keys go
        if scripts is not None:
            scripts.close()
        for stored in redis_states:
            drop_redis_prefix(stored["redis_url"], stored["redis_prefix"])
    setup = {
        "state": states[0] if len(states) == 1 else states,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "concurrencies": list(concurrencies),
        "peers": list(peers),
    }
    return OverheadReport(rows=rows, setup=setup)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def print_overhead(report: OverheadReport) -> None:
    """Print one table: every target at every concurrency."""
    print_table(
        f"Overhead (state: {report.setup.get('state')}): closed-loop clients, latency in ms",
        [
            "target",
            "conc.",
            "req/s",
            "p50",
            "p90",
            "p99",
            "added p50",
            "router CPU ms/req",
            "backend CPU ms/req",
            "Redis scripts/req",
            "errors",
        ],
        [
            [
                row.target,
                str(row.concurrency),
                f"{row.requests_per_s:,.0f}",
                _ms(row.p50_ms),
                _ms(row.p90_ms),
                _ms(row.p99_ms),
                _ms(row.added_p50_ms),
                _ms(row.router_cpu_ms_per_request),
                _ms(row.backend_cpu_ms_per_request),
                _ms(row.redis_scripts_per_request),
                ", ".join(f"{k}: {v}" for k, v in row.errors.items()) or "0",
            ]
            for row in report.rows
        ],
    )


def write_overhead(report: OverheadReport, path: Path, provenance: dict[str, Any]) -> None:
    """Write the report as JSON with the provenance captured when the run started."""
    write_json(path, report.to_json(), provenance)


def command(
    concurrency: Annotated[
        str, typer.Option("--concurrency", help="Client counts, comma-separated.")
    ] = "1,16,64",
    duration: Annotated[
        float, typer.Option("--duration", help="Measured seconds per target and concurrency.")
    ] = 5.0,
    warmup: Annotated[
        float, typer.Option("--warmup", help="Unmeasured seconds before each measurement.")
    ] = 1.0,
    state: Annotated[
        str,
        typer.Option(
            "--state",
            help="The router's state store: sqlite | sqlite-full | memory | redis | "
            "redis-shared (two routers, serve --workers 2), or several, comma-separated, each "
            "its own router measured in the same run.",
        ),
    ] = "sqlite",
    peer: Annotated[
        list[str] | None,
        typer.Option("--peer", help="Another router's base URL to measure alike (repeat)."),
    ] = None,
    peer_api_key: Annotated[
        str | None, typer.Option("--peer-api-key", help="Bearer key the peers want.")
    ] = None,
    async_api: Annotated[
        bool, typer.Option("--async-api/--no-async-api", help="Also measure POST /v1/requests.")
    ] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every row here.")] = None,
) -> None:
    """Latency, requests/s and router CPU per request, direct to a backend and through the router.

    A stand-in OpenAI-compatible backend and the router run as real processes on loopback; a
    load generator process drives each at every concurrency.
    """
    if duration <= 0:
        raise typer.BadParameter("must be positive", param_hint="--duration")
    if warmup < 0:
        raise typer.BadParameter("must not be negative", param_hint="--warmup")
    states = [part.strip() for part in state.split(",") if part.strip()]
    if not states or any(part not in _STATES for part in states) or len(set(states)) < len(states):
        raise typer.BadParameter(
            f"expected distinct names among {', '.join(_STATES)}", param_hint="--state"
        )
    for url in peer or []:
        if not url.startswith(("http://", "https://")):
            raise typer.BadParameter(f"not an http(s) URL: {url!r}", param_hint="--peer")
    provenance = capture()
    report = run_overhead(
        parse_counts(concurrency, "--concurrency"),
        duration_s=duration,
        warmup_s=warmup,
        state=states,
        peers=peer or [],
        peer_api_key=peer_api_key,
        async_api=async_api,
    )
    print_overhead(report)
    if json_path is not None:
        write_overhead(report, json_path, provenance)

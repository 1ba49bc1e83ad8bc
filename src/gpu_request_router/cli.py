"""The ``gpurouter`` command line: the server, client commands, ``top``, keys and the demo.

Client commands call the router at ``--url`` and with ``--api-key`` (given after the command or
before it, ``gpurouter --url URL list``), else ``GPUROUTER_URL`` (default
``http://127.0.0.1:8080``) and ``GPUROUTER_API_KEY``. They print tables, or JSON with ``--json``;
an error from the router is printed with its problem details and exits 1; a router that cannot
be reached exits 2. ``submit --wait`` and ``wait`` also print the answer of a request that
succeeded. ``-h`` is ``--help`` everywhere.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import structlog
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpu_request_router import __version__
from gpu_request_router.bench.cli import bench_app
from gpu_request_router.client import ApiError, RouterClient
from gpu_request_router.config.config_loader import (
    AuthSettings,
    LoggingSettings,
    Settings,
    UserEntry,
    load_settings,
)
from gpu_request_router.demo import DEMO_BACKENDS, run_demo
from gpu_request_router.dev_key import (
    DevKeyUnusable,
    dev_key_path,
    development_key,
    new_api_key,
)
from gpu_request_router.exceptions import ConfigError, StoreInUse, StoreUnavailable
from gpu_request_router.top import run as run_top
from gpu_request_router.top import take as take_snapshot
from gpu_request_router.utils.logging import configure_logging

__all__ = ["app"]

app = typer.Typer(
    name="gpurouter",
    help="gpu-request-router: a GPU-aware, fair and durable router in front of a GPU fleet.",
    no_args_is_help=True,
    add_completion=False,
    # Inherited by every command and command group below.
    context_settings={"help_option_names": ["-h", "--help"]},
)


keys = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys, name="keys")
app.add_typer(bench_app, name="bench")

_out = Console()
if not _out.is_terminal:
    _out = Console(width=max(_out.width, 200))  # a pipe or a log: keep table rows whole
_err = Console(stderr=True)
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="A YAML config file (defaults: built in).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="The router's URL (default: $GPUROUTER_URL, else http://127.0.0.1:8080).",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key", help="The API key (default: $GPUROUTER_API_KEY).", show_default=False
    ),
]


def _print_version(value: bool) -> None:
    if value:
        _out.print(f"gpurouter {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """gpu-request-router: a GPU-aware, fair and durable router in front of a GPU fleet."""
    ctx.obj = {"url": url, "api_key": api_key}


def _load(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        _err.print(f"[red]invalid configuration[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc


def _refuse(reason: str, error: str, code: int = 1, **context: object) -> NoReturn:
    """Stop a start that cannot go on, with one log line (JSON under JSON logs) saying why."""
    structlog.get_logger().error("start_refused", reason=reason, error=error, **context)
    raise typer.Exit(code)


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.", min=1, max=65535)] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="Router processes on the port (state.shared on Redis when more than one); one "
            "that exits is started again.",
            min=1,
            max=64,
        ),
    ] = 1,
) -> None:
    """Run the router. Without --config: SQLite in this directory and a simulated 4-GPU fleet."""
    from gpu_request_router.utils.serving import Supervisor, listen

    settings = _load(config)
    server = settings.server.model_copy(
        update={"host": host or settings.server.host, "port": port or settings.server.port}
    )
    settings = settings.model_copy(update={"server": server})
    configure_logging(settings.logging, cache_loggers=True)
    if workers > 1:
        state = settings.state
        if not (state.backend == "redis" and state.shared):
            _refuse(
                "invalid_configuration",
                f"--workers {workers} runs {workers} routers on one state: that needs "
                f"state.backend redis with state.shared true (state.backend is "
                f"{state.backend}{', shared false' if state.backend == 'redis' else ''}; a "
                "SQLite file has one owner)",
                code=2,
            )
        url = f"http://{server.host}:{server.port}"
        try:
            settings, dev_key = _with_dev_key(settings)  # one key for every process
        except DevKeyUnusable as exc:
            _refuse("development_key_unusable", str(exc), path=str(exc.path))
        try:
            sock = listen(server.host, server.port, 2048)  # uvicorn's default backlog
        except OSError as exc:
            _refuse("cannot_listen", f"cannot listen on {url}: {exc.strerror or exc}", url=url)
        if dev_key is not None:
            _show_dev_key(settings, url, dev_key)
        raise typer.Exit(Supervisor(workers, lambda: _serve(settings, sock)).run())
    _serve(settings, None)


def _serve(settings: Settings, bound: socket.socket | None) -> None:
    """One router process: the store, recovery, then serving (on ``bound`` if given)."""
    import uvicorn

    from gpu_request_router.api import create_app
    from gpu_request_router.store import open_store
    from gpu_request_router.utils.serving import (
        EXIT_FENCED,
        AnnouncingServer,
        StandbyResponder,
        listen,
    )

    server = settings.server
    # The order of a start: the store (and the SQLite file's lock, before anything reads the
    # file), the development key (kept beside that file), the port, then recovery (the
    # application's lifespan), then "listening". A standby binds the port first and answers
    # the probes on it while it waits for the store.
    url = f"http://{server.host}:{server.port}"
    early: socket.socket | None = None
    if bound is None and settings.state.backend == "redis" and settings.state.standby:
        try:
            early = listen(server.host, server.port, 2048)  # uvicorn's default backlog
        except OSError as exc:
            _refuse("cannot_listen", f"cannot listen on {url}: {exc.strerror or exc}", url=url)
    try:
        if early is None:
            store = open_store(settings.state)
        else:
            waiting = (
                f"standby: another router holds Redis prefix {settings.state.redis_prefix!r}; "
                "this one takes over when it stops"
            )
            with StandbyResponder(early, waiting):
                store = open_store(settings.state)
    except ConfigError as exc:
        _refuse("invalid_configuration", f"invalid configuration {exc}", code=2)
    except StoreInUse as exc:
        _refuse("state_store_in_use", exc.message, path=exc.path, pid=exc.pid)
    except StoreUnavailable as exc:
        _refuse("state_store_unavailable", exc.message)
    try:
        settings, dev_key = _with_dev_key(settings)
    except DevKeyUnusable as exc:
        store.close()
        _refuse("development_key_unusable", str(exc), path=str(exc.path))
    try:
        application = create_app(settings, store=store)
    except ConfigError as exc:
        store.close()
        _refuse("invalid_configuration", f"invalid configuration {exc}", code=2)
    server_config = uvicorn.Config(
        application,
        host=server.host,
        port=server.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        # The router reads X-Forwarded-For itself, from server.trusted_proxies only.
        proxy_headers=False,
        timeout_graceful_shutdown=30,
    )
    if bound is not None or early is not None:
        sock = bound if bound is not None else early
        assert sock is not None
    else:
        try:
            sock = listen(server.host, server.port, server_config.backlog)
        except OSError as exc:
            store.close()
            _refuse("cannot_listen", f"cannot listen on {url}: {exc.strerror or exc}", url=url)

    def announce() -> None:
        structlog.get_logger().info("listening", url=url)
        _out.print(f"gpu-request-router listening on [bold]{url}[/bold] (API docs: {url}/docs)")
        if dev_key is not None:
            _show_dev_key(settings, url, dev_key)

    serving = AnnouncingServer(server_config, announce, stop_when=store.fenced)
    serving.run(sockets=[sock])
    if serving.stopped_because is not None:  # another router took over: restart to serve again
        raise typer.Exit(EXIT_FENCED)


def _with_dev_key(settings: Settings) -> tuple[Settings, str | None]:
    """With auth on and no users, the settings with a development admin, and its key.

    Raises:
        DevKeyUnusable: the key's file cannot be used.
    """
    if not (settings.auth.enabled and not settings.auth.users):
        return settings, None
    from gpu_request_router.http.keys import hash_key

    dev_key = development_key(settings.state)
    admin = UserEntry(name="admin", role="admin", api_key_sha256=hash_key(dev_key))
    auth = AuthSettings(enabled=True, users=[admin])
    return settings.model_copy(update={"auth": auth}), dev_key


def _show_dev_key(settings: Settings, url: str, dev_key: str) -> None:
    kept = dev_key_path(settings.state)
    where = f"kept in {kept}" if kept is not None else "for this run only"
    _out.print(
        f"No users are configured: a development admin key ({escape(where)}).\n"
        f"  export GPUROUTER_URL={url}\n  export GPUROUTER_API_KEY={dev_key}",
        highlight=False,
    )


@app.command()
def worker(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.", min=1, max=65535)] = None,
    slots: Annotated[
        int | None, typer.Option(help="Executions per GPU at once.", min=1, max=1024)
    ] = None,
    simulate: Annotated[
        str | None, typer.Option(help="Simulated GPUs instead of NVML, e.g. 4xH100-80GB.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="The worker's own name (its GPU ids <name>:<index>; default <host>-<port>, "
            "distinct per worker on one host). A router that lists the worker in its backends "
            "shows its GPUs under the backend's name instead."
        ),
    ] = None,
    router_url: Annotated[
        str | None, typer.Option(help="Register with this router and heartbeat.")
    ] = None,
) -> None:
    """Run the worker agent on a GPU host: report its GPUs and run what the router sends."""
    import uvicorn
    from pydantic import ValidationError

    from gpu_request_router.config.config_loader import WorkerSettings
    from gpu_request_router.utils.serving import listen
    from gpu_request_router.worker.app import WorkerServer, create_worker_app

    settings = _load(config)
    flags = {
        "host": host,
        "port": port,
        "slots": slots,
        "simulate": simulate,
        "name": name,
        "router_url": router_url,
    }
    given = {key: value for key, value in flags.items() if value is not None}
    try:
        section = WorkerSettings.model_validate({**settings.worker.model_dump(), **given})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(["worker", *(str(part) for part in first["loc"])])
        message = first["msg"].removeprefix("Value error, ")
        _err.print(f"[red]invalid configuration[/red] {escape(where)}: {escape(message)}")
        raise typer.Exit(2) from exc
    settings = settings.model_copy(update={"worker": section})
    configure_logging(settings.logging, cache_loggers=True)
    try:
        application = create_worker_app(settings)
    except ConfigError as exc:
        _refuse("invalid_configuration", f"invalid configuration {exc}", code=2)
    agent = application.state.worker
    server_config = uvicorn.Config(
        application,
        host=section.host,
        port=section.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    url = f"http://{section.host}:{section.port}"
    try:
        sock = listen(section.host, section.port, server_config.backlog)
    except OSError as exc:
        _refuse("cannot_listen", f"cannot listen on {url}: {exc.strerror or exc}", url=url)

    def announce() -> None:
        structlog.get_logger().info("listening", url=url, worker=agent.name)
        gpus = f"simulated {section.simulate}" if section.simulate else "NVML"
        _out.print(
            f"gpurouter worker [bold]{escape(agent.name)}[/bold] listening on "
            f"[bold]{url}[/bold] (GPUs: {escape(gpus)}, executor {section.executor})"
        )
        if section.router_url:
            _out.print(f"registering as {escape(agent.url)} with {escape(section.router_url)}")

    # On SIGTERM, running executions get 5 s to finish, then answer 503 (worker lost).
    WorkerServer(server_config, agent, announce, grace_s=5.0).run(sockets=[sock])


@keys.command("create")
def create_key(
    name: Annotated[str, typer.Option(help="The user the key belongs to.")] = "alice",
    role: Annotated[str, typer.Option(help="admin or user.")] = "user",
) -> None:
    """Make a new API key: print it once, and the config line that holds its hash."""
    from gpu_request_router.http.keys import hash_key

    try:
        entry = UserEntry.model_validate({"name": name, "role": role, "api_key_sha256": "0" * 64})
    except ValueError as exc:
        _err.print(f"[red]invalid user[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    key = new_api_key()
    _out.print(f"API key (shown once): {key}")
    _out.print("Add this user under auth.users in the config:")
    line = f"    - {{name: {entry.name}, role: {entry.role}, api_key_sha256: {hash_key(key)}}}"
    _out.print(line, highlight=False, soft_wrap=True)


@contextmanager
def _client(ctx: typer.Context, url: str | None, api_key: str | None) -> Iterator[RouterClient]:
    """A client for the router; errors become messages and exit codes.

    The command's own ``--url``/``--api-key`` come first, then those given before the command,
    then the environment (:class:`RouterClient`).
    """
    given = ctx.find_root().obj or {}
    client = RouterClient(url or given.get("url"), api_key or given.get("api_key"))
    try:
        yield client
    except ApiError as exc:
        problem = exc.problem
        _err.print(f"[red]error {exc.status}[/red] {escape(str(problem.get('detail', exc)))}")
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        _err.print(
            f"[red]cannot reach the router[/red] ({escape(str(exc))}); "
            "is --url (or GPUROUTER_URL) right?"
        )
        raise typer.Exit(2) from exc
    finally:
        client.close()


def _print_requests(requests: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _out.print_json(json.dumps(requests if len(requests) != 1 else requests[0]))
        return
    table = Table()
    for column in ("id", "user", "model", "priority", "status", "GPU(s)", "tries", "wait s"):
        table.add_column(column, overflow="fold")
    for request in requests:
        placement = request.get("placement") or {}
        table.add_row(
            request["id"],
            request["user"],
            request["model"],
            request["priority"],
            request["status"],
            ",".join(placement.get("gpu_ids", [])) or "-",
            str(request["attempts"]),
            f"{request['queue_wait_s']:.2f}",
        )
    _out.print(table)


def answer_text(request: dict[str, Any]) -> str | None:
    """What a finished request answered: a chat's or completion's text, else its result as JSON.

    ``None`` while it has no result (not finished, failed, cancelled or expired).
    """
    result = request.get("result")
    if request.get("status") != "succeeded" or result is None:
        return None
    choices = result.get("choices") if isinstance(result, dict) else None
    if isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
        texts = [
            choice["message"].get("content")
            if isinstance(choice.get("message"), dict)
            else choice.get("text")
            for choice in choices
        ]
        if all(isinstance(text, str) for text in texts):
            return "\n\n".join(texts)
    return json.dumps(result, indent=2, ensure_ascii=False)


def _print_answer(request: dict[str, Any]) -> None:
    """The answer below the table, or on stderr why there is none."""
    answer = answer_text(request)
    if answer is not None:
        _out.print(answer, markup=False, highlight=False, soft_wrap=True)
    elif request.get("error"):
        error = request["error"]
        _err.print(
            f"[red]{escape(request['status'])}[/red] {escape(error['type'])}: "
            f"{escape(error['message'])}"
        )


@app.command()
def submit(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="A model of the catalog.")],
    prompt: Annotated[str | None, typer.Option(help="A chat message to send.")] = None,
    input_json: Annotated[
        str | None, typer.Option("--input", help="The whole input object, as JSON.")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="New tokens at most.")] = None,
    priority: Annotated[str | None, typer.Option(help="Priority class.")] = None,
    task: Annotated[str | None, typer.Option(help="chat, completion, embedding, generic.")] = None,
    gpu_count: Annotated[int | None, typer.Option(help="GPUs taken together.")] = None,
    gpu_type: Annotated[str | None, typer.Option(help="Only GPUs of this type.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds until it expires.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe key.")] = None,
    wait: Annotated[
        float,
        typer.Option(help="Wait this many seconds for the end, then print the answer too."),
    ] = 0.0,
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Submit a request; with --wait, print its answer once it has succeeded."""
    body: dict[str, Any] = {"model": model}
    if input_json is not None:
        try:
            body["input"] = json.loads(input_json)
        except ValueError as exc:
            _err.print(f"[red]--input is not JSON[/red] {escape(str(exc))}")
            raise typer.Exit(2) from exc
    elif prompt is not None:
        body["input"] = {"messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body.setdefault("input", {})["max_tokens"] = max_tokens
    resources = {
        key: value
        for key, value in (("gpu_count", gpu_count), ("gpu_type", gpu_type))
        if value is not None
    }
    if resources:
        body["resources"] = resources
    options = {"priority": priority, "task": task, "timeout_s": timeout}
    body.update({key: value for key, value in options.items() if value is not None})
    with _client(ctx, url, api_key) as client:
        request = client.submit(body, idempotency_key=idempotency_key)
        if wait > 0:
            request = client.wait(request["id"], wait)
    _print_requests([request], as_json)
    if wait > 0 and not as_json:
        _print_answer(request)


@app.command()
def status(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The request id.")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a request."""
    with _client(ctx, url, api_key) as client:
        _print_requests([client.get(request_id)], as_json)


@app.command("wait")
def wait_for(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The request id.")],
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Wait until a request has finished, then show it and its answer."""
    with _client(ctx, url, api_key) as client:
        request = client.wait(request_id, timeout)
    _print_requests([request], as_json)
    if not as_json:
        _print_answer(request)


@app.command()
def cancel(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The request id.")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel a request."""
    with _client(ctx, url, api_key) as client:
        _print_requests([client.cancel(request_id)], as_json)


@app.command("list")
def list_requests(
    ctx: typer.Context,
    status_: Annotated[str | None, typer.Option("--status", help="Only this status.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 50,
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List your requests, newest first."""
    with _client(ctx, url, api_key) as client:
        items = []
        for request in client.requests(limit=min(limit, 500), status=status_, model=model):
            items.append(request)
            if len(items) >= limit:
                break
    _print_requests(items, as_json)


@app.command()
def gpus(
    ctx: typer.Context,
    as_json: JsonOption = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Show the GPU inventory."""
    with _client(ctx, url, api_key) as client:
        items = client.gpus()
    if as_json:
        _out.print_json(json.dumps(items))
        return
    table = Table()
    for column in (
        "id",
        "type",
        "health",
        "used MiB",
        "reserved MiB",
        "free MiB",
        "util %",
        "running",
    ):
        table.add_column(column)
    for gpu in items:
        state = gpu["health"] + (" (cordoned)" if gpu["cordoned"] else "")
        table.add_row(
            gpu["id"],
            gpu["type"],
            state,
            str(gpu["memory_used_mb"]),
            str(gpu["memory_reserved_mb"]),
            str(gpu["memory_free_mb"]),
            "-" if gpu["utilization_pct"] is None else f"{gpu['utilization_pct']:g}",
            str(len(gpu["running_requests"])),
        )
    _out.print(table)


def _print_explanation(explained: dict[str, Any]) -> None:
    """An explanation as a sentence, its placement or wait, and the candidates weighed."""
    _out.print(f"[bold]{escape(explained['id'])}[/bold] {explained['status']}")
    _out.print(escape(explained["summary"]))
    waiting = explained.get("waiting")
    if waiting is not None:
        eta = waiting["eta_s"]
        position = waiting["queue_position"]
        _out.print(
            f"blocked by [bold]{waiting['blocked_by']}[/bold]; queue position "
            f"{'-' if position is None else position}; ETA "
            f"{'unknown' if eta is None else f'{eta:.1f} s'}"
        )
    if explained.get("reason"):
        _out.print(f"reason: {escape(explained['reason'])}")
    candidates = explained.get("candidates") or []
    if not candidates:
        return
    table = Table(title=f"candidates weighed by {explained.get('policy') or '-'}, best first")
    for column in ("", "GPU", "worker", "type", "score", "note"):
        table.add_column(column, overflow="fold")
    for candidate in candidates:
        score = ", ".join(f"{name} {value:g}" for name, value in candidate["score"].items())
        table.add_row(
            "→" if candidate["chosen"] else "",
            candidate["gpu_id"],
            candidate["worker"],
            candidate["type"],
            score or "-",
            escape(candidate["note"]),
        )
    _out.print(table)


@app.command()
def explain(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The request id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Explain where a request was placed and why, or why it still waits (and its ETA)."""
    with _client(ctx, url, api_key) as client:
        explained = client.explain(request_id)
    if as_json:
        _out.print_json(json.dumps(explained))
        return
    _print_explanation(explained)


@app.command()
def top(
    ctx: typer.Context,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between refreshes.", min=0.05)
    ] = 2.0,
    iterations: Annotated[
        int | None,
        typer.Option(
            "--iterations", help="Stop after this many refreshes (default: Ctrl-C).", min=1
        ),
    ] = None,
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """A live view: GPUs, queue, latest requests, throughput and usage against quota."""
    with _client(ctx, url, api_key) as client:
        try:
            run_top(
                lambda: take_snapshot(client),
                interval_s=interval,
                iterations=iterations,
                console=_out,
            )
        except KeyboardInterrupt:
            return


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
    console = _out
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
    configure_logging(LoggingSettings(level="warning", format="console"))  # the table is the output
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

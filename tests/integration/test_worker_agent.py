"""`gpurouter worker` as a real process: the worker protocol (SPEC §6), auth and registration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gpu_request_router.config.config_loader import load_settings
from gpu_request_router.core.events import (
    Dispatch,
    ExecutionResult,
    Failure,
    FailureKind,
    NotKnown,
    StillRunning,
)
from gpu_request_router.exceptions import ConfigError
from gpu_request_router.models.gpu_state import GPUReading
from gpu_request_router.models.request import Estimate, Placement, Request, Task
from gpu_request_router.services.ai_orchestrator import AgentClient
from gpu_request_router.testing import free_port
from gpu_request_router.utils.clock import SystemClock
from gpu_request_router.worker.app import create_worker_app
from gpu_request_router.worker.executors import CallableExecutor

GPUROUTER = str(Path(sys.executable).parent / "gpurouter")
TOKEN = "worker-token-0123456789abcdef"
NAME = "w1"
H100_MB = 81559
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CALLABLES_DIR = Path(__file__).resolve().parents[1] / "unit" / "worker"  # worker_callables


@dataclass
class Registrations:
    """What a stand-in router received on ``POST /v1/workers``."""

    url: str
    calls: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)


@pytest.fixture(scope="module")
def router() -> Iterator[Registrations]:
    """A stand-in router on 127.0.0.1 that records every registration it is sent."""
    calls: list[tuple[dict[str, str], dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            if self.path == "/v1/workers":
                calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200 if self.path == "/v1/workers" else 404)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    seen = Registrations(f"http://127.0.0.1:{server.server_address[1]}", calls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def running_worker(workdir: Path, config: dict[str, Any], *options: str) -> Iterator[str]:
    """``gpurouter worker`` with ``config`` and ``options`` in ``workdir``, until it answers."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUROUTER_")}
    port = free_port()
    command = [GPUROUTER, "worker", "--config", str(workdir / "config.yaml")]
    command += ["--port", str(port), "--name", NAME, *options]
    log_path = workdir / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise


@pytest.fixture(scope="module")
def worker(router: Registrations, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``gpurouter worker --simulate 2xH100-80GB`` with a worker token, registering with router."""
    config = {"auth": {"worker_token": TOKEN}, "worker": {"heartbeat_s": 0.1}}
    options = ("--simulate", "2xH100-80GB", "--router-url", router.url)
    with running_worker(tmp_path_factory.mktemp("worker"), config, *options) as url:
        yield url


def execution(execution_id: str, gpu: int = 0, reserved: int = 2000, **spec: Any) -> dict[str, Any]:
    """A ``POST /v1/executions`` body on GPU ``w1:<gpu>`` with ``input.simulate`` = ``spec``."""
    gpu_id = f"{NAME}:{gpu}"
    return {
        "execution_id": execution_id,
        "request_id": f"req_{execution_id}",
        "attempt": 1,
        "model": "llama-3-8b",
        "task": "chat",
        "input": {
            "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 8,
            "simulate": spec,
        },
        "gpu_ids": [gpu_id],
        "reservations": {gpu_id: reserved},
        "estimate": {"gpu_memory_mb": reserved, "duration_s": {"H100-80GB": 5.0}},
        "deadline": time.time() + 60,
    }


def gpu(url: str, index: int) -> dict[str, Any]:
    """GPU ``w1:<index>`` as the worker reports it."""
    items = httpx.get(f"{url}/v1/gpus", headers=AUTH).json()["items"]
    return next(item for item in items if item["id"] == f"{NAME}:{index}")


async def started(client: httpx.AsyncClient, url: str, index: int, execution_id: str) -> None:
    """Wait until GPU ``w1:<index>`` runs exactly ``execution_id``."""
    deadline = time.monotonic() + 5
    while (await client.get(f"{url}/v1/gpus")).json()["items"][index]["running"] != [execution_id]:
        assert time.monotonic() < deadline, f"{execution_id} did not start"
        await asyncio.sleep(0.02)


def test_reports_its_gpus(worker: str) -> None:
    """Two simulated H100s with their real memory, ids <name>:<index>, idle."""
    response = httpx.get(f"{worker}/v1/gpus", headers=AUTH)
    assert response.status_code == 200
    items = response.json()["items"]
    assert [item["id"] for item in items] == [f"{NAME}:0", f"{NAME}:1"]
    for index, item in enumerate(items):
        assert item["worker"] == NAME and item["index"] == index
        assert item["type"] == "H100-80GB" and item["memory_total_mb"] == H100_MB
        assert item["memory_used_mb"] == 0 and item["memory_reserved_mb"] == 0
        assert item["health"] == "healthy" and item["running"] == []
        assert item["slots"] == 8 and item["last_seen"].endswith("Z")
        for key in ("name", "uuid", "utilization_pct", "temperature_c", "power_w"):
            assert item[key] is not None
        assert item["ecc_uncorrected"] == 0 and item["models_loaded"] == []


def test_an_execution_answers_openai_output_and_usage(worker: str) -> None:
    """A 0.2 s execution answers 200 with a chat completion and its GPU-seconds and peak."""
    began = time.monotonic()
    response = httpx.post(
        f"{worker}/v1/executions", json=execution("exe_ok", duration_s=0.2), headers=AUTH
    )
    assert response.status_code == 200, response.text
    assert time.monotonic() - began >= 0.19  # timers may fire a hair early
    body = response.json()
    output = body["output"]
    assert output["object"] == "chat.completion" and output["model"] == "llama-3-8b"
    assert output["choices"][0]["message"]["role"] == "assistant"
    assert output["usage"]["completion_tokens"] == 8
    assert body["usage"]["peak_memory_mb"] == 2000
    assert 0.19 <= body["usage"]["gpu_seconds"] < 2.0


async def test_one_execution_id_runs_once(worker: str) -> None:
    """Two concurrent POSTs of one id hold memory once and get the same answer; so does a third."""
    body = execution("exe_twice", gpu=1, reserved=3000, duration_s=0.6)
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
        first = asyncio.create_task(client.post(f"{worker}/v1/executions", json=body))
        second = asyncio.create_task(client.post(f"{worker}/v1/executions", json=body))
        await started(client, worker, 1, "exe_twice")
        await asyncio.sleep(0.05)  # both POSTs are in by now
        during = (await client.get(f"{worker}/v1/gpus")).json()["items"][1]
        answers = await asyncio.gather(first, second)
        again = await client.post(f"{worker}/v1/executions", json=body)
    assert during["running"] == ["exe_twice"]
    assert during["memory_reserved_mb"] == 3000 and during["memory_used_mb"] == 3000
    assert [answer.status_code for answer in answers] == [200, 200]
    assert answers[0].json() == answers[1].json() == again.json()
    assert gpu(worker, 1)["memory_used_mb"] == 0


async def test_delete_cancels_a_hanging_execution(worker: str) -> None:
    """DELETE stops a hanging execution: its memory and reservation go, its POST gets 409."""
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
        post = asyncio.create_task(
            client.post(
                f"{worker}/v1/executions", json=execution("exe_hang", reserved=5000, failure="hang")
            )
        )
        await started(client, worker, 0, "exe_hang")
        held = (await client.get(f"{worker}/v1/gpus")).json()["items"][0]
        cancelled = await client.delete(f"{worker}/v1/executions/exe_hang")
        after = (await client.get(f"{worker}/v1/gpus")).json()["items"][0]
        answer = await post
        again = await client.delete(f"{worker}/v1/executions/exe_hang")
        unknown = await client.delete(f"{worker}/v1/executions/exe_never")
    assert held["memory_reserved_mb"] == 5000 and held["memory_used_mb"] == 5000
    assert cancelled.status_code == 200 and cancelled.json() == {"cancelled": True}
    assert after["memory_reserved_mb"] == 0 and after["memory_used_mb"] == 0
    assert after["running"] == []
    assert answer.status_code == 409
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["error"] == "cancelled"
    assert again.json() == {"cancelled": False} and unknown.json() == {"cancelled": False}


def test_out_of_memory_is_507(worker: str) -> None:
    """A simulated OOM, and a reservation larger than the GPU, answer 507 with the peak."""
    simulated = httpx.post(
        f"{worker}/v1/executions",
        json=execution("exe_oom", duration_s=0.1, failure="oom"),
        headers=AUTH,
    )
    too_big = httpx.post(
        f"{worker}/v1/executions", json=execution("exe_big", reserved=90_000), headers=AUTH
    )
    assert simulated.status_code == 507
    assert simulated.json()["error"] == "gpu_out_of_memory"
    assert simulated.json()["peak_memory_mb"] == 2000 and simulated.json()["message"]
    assert too_big.status_code == 507 and too_big.json()["peak_memory_mb"] == 90_000


def test_an_output_that_cannot_be_sent_as_json_is_a_clear_failure(worker: str) -> None:
    """An executor's output with a lone surrogate fails the execution by name, not with a 500."""
    body = json.dumps(execution("exe_lone", duration_s=0.01, output={"t": "\ud800"}))
    answer = httpx.post(
        f"{worker}/v1/executions",
        content=body.encode(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert answer.status_code == 500
    assert answer.json()["error"] == "backend_error"
    assert "cannot be sent as JSON" in answer.json()["message"]
    assert "output.t" in answer.json()["message"]
    state = httpx.get(f"{worker}/v1/executions/exe_lone", headers=AUTH)
    assert state.status_code == 200 and state.json()["state"] == "failed"


def test_bad_input_is_a_problem(worker: str) -> None:
    """A malformed body is 422 and another worker's GPU 409, both problem details."""
    malformed = httpx.post(
        f"{worker}/v1/executions", json={"execution_id": "exe_bad"}, headers=AUTH
    )
    foreign = execution("exe_foreign")
    foreign["gpu_ids"] = ["other:0"]
    foreign["reservations"] = {}
    elsewhere = httpx.post(f"{worker}/v1/executions", json=foreign, headers=AUTH)
    assert malformed.status_code == 422
    assert malformed.headers["content-type"] == "application/problem+json"
    assert malformed.json()["status"] == 422 and malformed.json()["errors"]
    assert elsewhere.status_code == 409
    assert elsewhere.headers["content-type"] == "application/problem+json"


def test_the_worker_token_is_required(worker: str) -> None:
    """Without the token (or with a wrong one) /v1 calls are 401; /healthz needs none."""
    missing = httpx.get(f"{worker}/v1/gpus")
    wrong = httpx.get(f"{worker}/v1/gpus", headers={"Authorization": "Bearer nope"})
    delete = httpx.delete(f"{worker}/v1/executions/x")
    for response in (missing, wrong, delete):
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
    assert httpx.get(f"{worker}/v1/gpus", headers=AUTH).status_code == 200
    assert httpx.get(f"{worker}/healthz").status_code == 200


def test_it_registers_and_heartbeats(worker: str, router: Registrations) -> None:
    """The worker POSTs its name, URL and GPUs to the router with the token, again and again."""
    deadline = time.monotonic() + 5
    while len(router.calls) < 3:
        assert time.monotonic() < deadline, f"{len(router.calls)} registrations"
        time.sleep(0.05)
    for headers, body in router.calls[:3]:
        assert headers["authorization"] == f"Bearer {TOKEN}"
        assert body["name"] == NAME and body["url"] == worker
        assert [item["id"] for item in body["gpus"]] == [f"{NAME}:0", f"{NAME}:1"]
        assert body["gpus"][0]["memory_total_mb"] == H100_MB


class _OneGpu:
    """A reader of one fixed GPU: the worker needs neither NVML nor a simulated fleet."""

    def read(self) -> list[GPUReading]:
        return [GPUReading(worker="host", index=0, type="L4-24GB", memory_total_mb=23034)]


async def test_an_injected_reader_and_executor_replace_nvml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --simulate, a given reader and a callable executor serve the protocol in-process."""
    monkeypatch.syspath_prepend(str(CALLABLES_DIR))
    settings = load_settings(overrides={"worker": {"name": "host"}})
    app = create_worker_app(
        settings, reader=_OneGpu(), executor=CallableExecutor("worker_callables:with_peak")
    )
    body = execution("exe_host")
    body["gpu_ids"], body["reservations"] = ["host:0"], {"host:0": 100}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        gpus = (await client.get("/v1/gpus")).json()["items"]
        answer = await client.post("/v1/executions", json=body)
    assert [item["id"] for item in gpus] == ["host:0"]
    assert answer.status_code == 200
    assert answer.json()["output"] == {"text": "ok", "peak_memory_mb": 1234.2}
    assert answer.json()["usage"]["peak_memory_mb"] == 1235
    with pytest.raises(ConfigError) as refused:
        create_worker_app(settings, reader=_OneGpu())
    assert refused.value.key == "worker.executor"


async def test_a_full_gpu_refuses_more_executions() -> None:
    """With one slot per GPU a second execution on a busy GPU is refused with a 5xx."""
    settings = load_settings(
        overrides={"worker": {"name": NAME, "simulate": "1xL4-24GB", "slots": 1}}
    )
    app = create_worker_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        first = asyncio.create_task(
            client.post("/v1/executions", json=execution("exe_slot_1", duration_s=0.3))
        )
        await started(client, "", 0, "exe_slot_1")
        second = await client.post("/v1/executions", json=execution("exe_slot_2"))
        assert (await first).status_code == 200
    assert second.status_code == 500
    assert second.json() == {"error": "backend_error", "message": f"no free slot on GPU {NAME}:0"}


async def test_get_says_an_execution_runs_then_gives_its_outcome(worker: str) -> None:
    """GET answers running while it runs, and with ?wait= the same outcome as its POST."""
    body = execution("exe_look", gpu=1, reserved=1000, duration_s=0.5)
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
        post = asyncio.create_task(client.post(f"{worker}/v1/executions", json=body))
        await started(client, worker, 1, "exe_look")
        during = await client.get(f"{worker}/v1/executions/exe_look")
        waited = await client.get(f"{worker}/v1/executions/exe_look", params={"wait": 5})
        answer = await post
        later = await client.get(f"{worker}/v1/executions/exe_look")
    assert during.status_code == 200
    assert during.json() == {"execution_id": "exe_look", "state": "running"}
    assert waited.status_code == 200 and waited.json()["state"] == "succeeded"
    assert waited.json()["output"] == answer.json()["output"]
    assert waited.json()["usage"] == answer.json()["usage"]
    assert later.json() == waited.json()


async def test_a_caller_that_stops_waiting_does_not_stop_the_execution(worker: str) -> None:
    """A long-poll abandoned by its caller leaves the execution running to its end."""
    body = execution("exe_abandoned", gpu=1, reserved=1000, duration_s=0.6)
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
        post = asyncio.create_task(client.post(f"{worker}/v1/executions", json=body))
        await started(client, worker, 1, "exe_abandoned")
        with pytest.raises(httpx.TimeoutException):
            await client.get(
                f"{worker}/v1/executions/exe_abandoned", params={"wait": 5}, timeout=0.1
            )
        answer = await post
        after = await client.get(f"{worker}/v1/executions/exe_abandoned")
    assert answer.status_code == 200
    assert after.json()["state"] == "succeeded"


async def test_get_gives_failures_and_cancellations_with_their_post_status(worker: str) -> None:
    """A failed execution answers its kind and the status its POST got; a cancelled one 409."""
    async with httpx.AsyncClient(headers=AUTH, timeout=10) as client:
        oom = await client.post(
            f"{worker}/v1/executions", json=execution("exe_look_oom", duration_s=0.1, failure="oom")
        )
        post = asyncio.create_task(
            client.post(
                f"{worker}/v1/executions", json=execution("exe_look_hang", gpu=1, failure="hang")
            )
        )
        await started(client, worker, 1, "exe_look_hang")
        await client.delete(f"{worker}/v1/executions/exe_look_hang")
        await post
        failed = (await client.get(f"{worker}/v1/executions/exe_look_oom")).json()
        cancelled = (await client.get(f"{worker}/v1/executions/exe_look_hang")).json()
    assert oom.status_code == 507
    assert failed == {
        "execution_id": "exe_look_oom",
        "state": "failed",
        "status": 507,
        "error": "gpu_out_of_memory",
        "message": oom.json()["message"],
        "peak_memory_mb": 2000,
    }
    assert cancelled["state"] == "cancelled" and cancelled["status"] == 409
    assert cancelled["error"] == "cancelled"


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/v1/executions/exe_never_sent", {}, 404),
        ("/v1/executions/exe_never_sent", {"wait": 5}, 404),
        ("/v1/executions/exe_ok", {"wait": -1}, 422),
        ("/v1/executions/exe_ok", {"wait": 61}, 422),
        ("/v1/executions/exe_ok", {"wait": "soon"}, 422),
        ("/v1/executions/exe_ok", {"wait": "nan"}, 422),
        ("/v1/executions/exe_ok", {"wait": "inf"}, 422),
    ],
)
def test_get_of_an_unknown_execution_or_a_bad_wait_is_a_problem(
    worker: str, path: str, params: dict[str, Any], status: int
) -> None:
    """An unknown id is 404 at once (even with a wait); a wait outside 0..60 is 422."""
    response = httpx.get(f"{worker}{path}", params=params, headers=AUTH, timeout=3)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_get_of_an_execution_needs_the_worker_token(worker: str) -> None:
    """Without the worker token the lookup is 401 and says nothing about the execution."""
    missing = httpx.get(f"{worker}/v1/executions/exe_ok")
    wrong = httpx.get(f"{worker}/v1/executions/exe_ok", headers={"Authorization": "Bearer no"})
    for response in (missing, wrong):
        assert response.status_code == 401
        assert "state" not in response.json()


def _dispatched(execution_id: str, timeout_s: float) -> Dispatch:
    """The dispatch a router made of ``execution_id`` on ``w1:1``, due within ``timeout_s``."""
    estimate = Estimate(1000, 0, 1000, 0, {"H100-80GB": 1.0})
    request = Request(
        id=f"req_{execution_id}",
        user="u",
        model="llama-3-8b",
        task=Task.CHAT,
        priority="normal",
        estimate=estimate,
        created_at=time.time(),
        timeout_s=timeout_s,
        attempts=1,
    )
    return Dispatch(
        request=request,
        execution_id=execution_id,
        attempt=1,
        backend=NAME,
        placement=Placement(NAME, (f"{NAME}:1",)),
        reservations={f"{NAME}:1": 1000},
        deadline=request.deadline,
    )


async def test_the_agent_client_reads_each_state_of_an_execution(worker: str) -> None:
    """lookup() turns the worker's answers into the core's: running, outcome, unknown."""
    client = AgentClient(NAME, worker, TOKEN, SystemClock(), reported_id=str)
    body = execution("exe_client_look", gpu=1, reserved=1000, duration_s=0.4)
    try:
        async with httpx.AsyncClient(headers=AUTH, timeout=10) as http:
            post = asyncio.create_task(http.post(f"{worker}/v1/executions", json=body))
            await started(http, worker, 1, "exe_client_look")
            running = await client.lookup("exe_client_look")
            ended = await client.lookup("exe_client_look", wait_s=5)
            answer = (await post).json()
            oom = await http.post(
                f"{worker}/v1/executions",
                json=execution("exe_client_oom", duration_s=0.05, failure="oom"),
            )
        failed = await client.lookup("exe_client_oom")
        unknown = await client.lookup("exe_client_never")
    finally:
        await client.aclose()
    assert running == StillRunning()
    assert ended == ExecutionResult(
        output=answer["output"],
        gpu_seconds=answer["usage"]["gpu_seconds"],
        peak_memory_mb=answer["usage"]["peak_memory_mb"],
    )
    assert oom.status_code == 507
    assert failed == Failure(FailureKind.OUT_OF_MEMORY, oom.json()["message"], 2000)
    assert unknown == NotKnown()


async def test_the_agent_client_attaches_to_an_execution_it_did_not_start(worker: str) -> None:
    """attach() waits out an execution another caller POSTed and returns the same outcome."""
    client = AgentClient(NAME, worker, TOKEN, SystemClock(), reported_id=str)
    body = execution("exe_client_attach", gpu=1, reserved=1000, duration_s=0.5)
    try:
        async with httpx.AsyncClient(headers=AUTH, timeout=10) as http:
            post = asyncio.create_task(http.post(f"{worker}/v1/executions", json=body))
            await started(http, worker, 1, "exe_client_attach")
            outcome = await client.attach(_dispatched("exe_client_attach", 60))
            answer = (await post).json()
        forgotten = await client.attach(_dispatched("exe_client_forgotten", 60))
    finally:
        await client.aclose()
    assert isinstance(outcome, ExecutionResult) and outcome.output == answer["output"]
    assert isinstance(forgotten, Failure) and forgotten.kind is FailureKind.WORKER_LOST


async def test_attaching_to_a_worker_that_never_answers_ends_at_the_deadline() -> None:
    """With nobody listening, attach() keeps asking until the deadline and grace, then times out."""
    client = AgentClient(
        NAME, f"http://127.0.0.1:{free_port()}", TOKEN, SystemClock(), reported_id=str
    )
    try:
        async with asyncio.timeout(20):
            outcome = await client.attach(_dispatched("exe_client_nobody", -4.0))
    finally:
        await client.aclose()
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.TIMEOUT


@pytest.fixture(scope="module")
def odd_worker() -> Iterator[str]:
    """A stand-in worker on 127.0.0.1 whose GET answers are whatever the execution id names."""
    answers: dict[str, tuple[int, bytes]] = {
        "not_json": (200, b"<html>surprise</html>"),
        "a_list": (200, b"[1, 2]"),
        "odd_state": (200, b'{"state": "sleeping"}'),
        "failed_no_status": (200, b'{"state": "failed", "error": "backend_error"}'),
        "failed_text_status": (200, b'{"state": "failed", "status": "507"}'),
        "server_error": (500, b'{"state": "running"}'),
        "unauthorized": (401, b"{}"),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = answers[self.path.split("?")[0].rsplit("/", 1)[-1]]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize(
    "execution_id",
    [
        "not_json",
        "a_list",
        "odd_state",
        "failed_no_status",
        "failed_text_status",
        "server_error",
        "unauthorized",
    ],
)
async def test_an_answer_the_agent_client_cannot_read_is_no_answer(
    odd_worker: str, execution_id: str
) -> None:
    """A malformed or failed lookup is no answer (the work is retried), never a made-up outcome."""
    client = AgentClient(NAME, odd_worker, TOKEN, SystemClock(), reported_id=str)
    try:
        assert await client.lookup(execution_id) is None
    finally:
        await client.aclose()


def test_a_shared_worker_loads_a_model_once_reports_the_load_and_keeps_it_cached(
    tmp_path: Path,
) -> None:
    """A shared worker loads a model once, reports the load, and keeps the weights cached.

    ``worker.simulate_service: shared``: the first execution of a model loads its weights
    (15,317 MiB at 100 GB/s: 0.16 s) and says so in ``usage.load_s``, which the agent client
    reads; the GPU then lists the model as cached, its weights not counted as used, and the
    next execution starts without a load.
    """
    config = {
        "auth": {"worker_token": TOKEN},
        "worker": {"simulate_service": "shared"},
        "placement": {"service": {"load_gb_s": 100.0}},
    }
    load = 15_317 * 2**20 / 100e9

    async def lookup(url: str, execution_id: str) -> object:
        client = AgentClient(NAME, url, TOKEN, SystemClock(), reported_id=str)
        try:
            return await client.lookup(execution_id)
        finally:
            await client.aclose()

    bodies = []
    for name in ("exe_cold", "exe_warm"):
        body = execution(name, reserved=17_000, duration_s=0.1, peak_memory_mb=17_000)
        body["estimate"]["weights_mb"] = 15_317
        bodies.append(body)
    with (
        running_worker(tmp_path, config, "--simulate", "1xH100-80GB") as url,
        httpx.Client(headers=AUTH, timeout=10) as http,
    ):
        cold = http.post(f"{url}/v1/executions", json=bodies[0]).json()
        reported = asyncio.run(lookup(url, "exe_cold"))
        items = http.get(f"{url}/v1/gpus").json()["items"]
        warm = http.post(f"{url}/v1/executions", json=bodies[1]).json()
    assert cold["usage"]["load_s"] == pytest.approx(load, abs=0.05)
    assert cold["usage"]["gpu_seconds"] >= 0.1 + load - 0.01
    assert isinstance(reported, ExecutionResult)
    assert reported.load_s == cold["usage"]["load_s"]
    (gpu,) = items
    assert gpu["models_cached"] == ["llama-3-8b"] and gpu["models_loaded"] == []
    assert gpu["memory_used_mb"] == 0
    assert warm["usage"]["load_s"] == 0.0

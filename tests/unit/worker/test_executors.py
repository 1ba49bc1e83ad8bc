"""The worker's executors: the simulated fleet, a Python callable, an OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gpu_request_router.config.config_loader import BackendSettings, GpuGroup
from gpu_request_router.core.events import ExecutionResult, Failure, FailureKind
from gpu_request_router.exceptions import ConfigError
from gpu_request_router.models.request import Task
from gpu_request_router.services.simulator import FAILS_AFTER, SimulatedFleet
from gpu_request_router.testing import free_port
from gpu_request_router.worker.executors import (
    CallableExecutor,
    Job,
    OpenAIExecutor,
    SimulatedExecutor,
)

HERE = Path(__file__).resolve().parent
WORKER = "w"


def job(**overrides: Any) -> Job:
    """A job on GPU ``w:0`` with a 3000 MiB reservation and a 0.05 s estimate."""
    fields: dict[str, Any] = {
        "execution_id": "exe_1",
        "request_id": "req_1",
        "attempt": 1,
        "model": "m",
        "task": Task.CHAT,
        "input": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
        "gpu_ids": (f"{WORKER}:0",),
        "reservations": {f"{WORKER}:0": 3000},
        "estimate_memory_mb": 3000,
        "estimate_duration_s": 0.05,
        "deadline": time.time() + 60,
        "worker": WORKER,
    }
    fields.update(overrides)
    return Job(**fields)


def simulate(**spec: Any) -> dict[str, Any]:
    """A chat input with ``simulate`` overrides."""
    return {"messages": [{"role": "user", "content": "hi"}], "simulate": spec}


@pytest.fixture
def fleet() -> SimulatedFleet:
    """Two simulated H100s of worker ``w``."""
    backend = BackendSettings(
        name=WORKER, kind="simulated", gpus=[GpuGroup(type="H100-80GB", count=2)]
    )
    return SimulatedFleet([backend])


def used(fleet: SimulatedFleet, index: int = 0) -> int:
    """Memory in use on a simulated GPU."""
    return fleet.readings(WORKER)[index].memory_used_mb


class TestSimulatedExecutor:
    async def test_defaults_to_the_routers_estimate(self, fleet: SimulatedFleet) -> None:
        """Without overrides it takes the estimated duration and holds the reserved memory."""
        began = time.monotonic()
        outcome = await SimulatedExecutor(fleet).execute(job(), [0])
        assert isinstance(outcome, ExecutionResult)
        assert time.monotonic() - began >= 0.045  # timers may fire a hair early
        assert outcome.peak_memory_mb == 3000
        assert outcome.gpu_seconds is not None and outcome.gpu_seconds >= 0.045
        assert outcome.output["object"] == "chat.completion"
        assert outcome.output["model"] == "m"
        assert outcome.output["choices"][0]["message"]["content"]
        assert used(fleet) == 0

    async def test_memory_is_held_while_it_runs_and_freed_on_cancel(
        self, fleet: SimulatedFleet
    ) -> None:
        """A hanging execution holds its memory until its task is cancelled."""
        task = asyncio.create_task(
            SimulatedExecutor(fleet).execute(job(input=simulate(failure="hang")), [0])
        )
        await asyncio.sleep(0.02)
        assert used(fleet) == 3000 and fleet.running("exe_1")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert used(fleet) == 0 and not fleet.running("exe_1")

    async def test_out_of_memory_when_it_does_not_fit(self, fleet: SimulatedFleet) -> None:
        """A reservation larger than the GPU fails at once as out of memory."""
        big = job(reservations={f"{WORKER}:0": 90_000}, estimate_memory_mb=90_000)
        outcome = await SimulatedExecutor(fleet).execute(big, [0])
        assert isinstance(outcome, Failure)
        assert outcome.kind is FailureKind.OUT_OF_MEMORY
        assert outcome.peak_memory_mb == 90_000

    async def test_simulated_failure_comes_after_a_share_of_the_duration(
        self, fleet: SimulatedFleet
    ) -> None:
        """``failure: error`` reports a backend error after FAILS_AFTER × the duration."""
        began = time.monotonic()
        outcome = await SimulatedExecutor(fleet).execute(
            job(input=simulate(duration_s=0.5, failure="error")), [0]
        )
        assert isinstance(outcome, Failure) and outcome.kind is FailureKind.BACKEND_ERROR
        assert 0.9 * 0.5 * FAILS_AFTER <= time.monotonic() - began < 0.5
        assert used(fleet) == 0

    async def test_multi_gpu_holds_memory_on_each(self, fleet: SimulatedFleet) -> None:
        """A two-GPU job holds its reservation on both GPUs and reports 2× GPU-seconds."""
        two = job(
            gpu_ids=(f"{WORKER}:0", f"{WORKER}:1"),
            reservations={f"{WORKER}:0": 1000, f"{WORKER}:1": 1000},
            input=simulate(duration_s=0.1),
        )
        task = asyncio.create_task(SimulatedExecutor(fleet).execute(two, [0, 1]))
        await asyncio.sleep(0.02)
        assert used(fleet, 0) == 1000 and used(fleet, 1) == 1000
        outcome = await task
        assert isinstance(outcome, ExecutionResult)
        assert outcome.gpu_seconds is not None and outcome.gpu_seconds >= 0.18

    async def test_bad_simulate_and_unknown_gpus_are_client_errors(
        self, fleet: SimulatedFleet
    ) -> None:
        """An invalid ``simulate`` block or a GPU the fleet lacks cannot run anywhere."""
        executor = SimulatedExecutor(fleet)
        bad = await executor.execute(job(input=simulate(failure="explode")), [0])
        foreign = await executor.execute(job(gpu_ids=("other:0",)), [0])
        for outcome in (bad, foreign):
            assert isinstance(outcome, Failure) and outcome.kind is FailureKind.CLIENT_ERROR


@pytest.fixture
def callables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``worker_callables`` importable; release any blocked call afterwards."""
    monkeypatch.syspath_prepend(str(HERE))
    yield
    import worker_callables

    worker_callables.RELEASE.set()


@pytest.mark.usefixtures("callables")
class TestCallableExecutor:
    async def test_calls_with_the_first_gpu_and_the_request(self) -> None:
        """The function gets the first GPU's index and the request; GPU-seconds count GPUs."""
        two = job(gpu_ids=("w:2", "w:3"), reservations={"w:2": 10, "w:3": 10})
        outcome = await CallableExecutor("worker_callables:echo").execute(two, [2, 3])
        assert isinstance(outcome, ExecutionResult)
        assert outcome.output["gpu_index"] == 2
        request = outcome.output["request"]
        assert request["model"] == "m" and request["task"] == "chat"
        assert request["input"] == job().input
        assert request["execution_id"] == "exe_1" and request["attempt"] == 1
        assert request["gpu_ids"] == ["w:2", "w:3"]
        assert outcome.peak_memory_mb is None
        assert outcome.gpu_seconds is not None and outcome.gpu_seconds >= 0

    @pytest.mark.parametrize(("function", "peak"), [("with_peak", 1235), ("with_usage_peak", 777)])
    async def test_reports_the_peak_the_function_gives(self, function: str, peak: int) -> None:
        """``peak_memory_mb`` at the top level or under ``usage`` is the reported peak."""
        outcome = await CallableExecutor(f"worker_callables:{function}").execute(job(), [0])
        assert isinstance(outcome, ExecutionResult) and outcome.peak_memory_mb == peak

    @pytest.mark.parametrize(
        ("function", "kind"),
        [
            ("torch_oom", FailureKind.OUT_OF_MEMORY),
            ("message_oom", FailureKind.OUT_OF_MEMORY),
            ("bad_value", FailureKind.CLIENT_ERROR),
            ("bad_type", FailureKind.CLIENT_ERROR),
            ("crash", FailureKind.BACKEND_ERROR),
            ("not_a_dict", FailureKind.BACKEND_ERROR),
            ("not_json", FailureKind.BACKEND_ERROR),
        ],
    )
    async def test_maps_errors_to_failure_kinds(self, function: str, kind: FailureKind) -> None:
        """CUDA OOM, bad input and other errors become the matching failure kinds."""
        outcome = await CallableExecutor(f"worker_callables:{function}").execute(job(), [0])
        assert isinstance(outcome, Failure) and outcome.kind is kind

    async def test_cancel_ends_the_task_while_the_thread_runs_on(self) -> None:
        """Cancelling returns at once; the function's thread finishes later, unheard."""
        import worker_callables

        worker_callables.RELEASE.clear()
        task = asyncio.create_task(CallableExecutor("worker_callables:blocked").execute(job(), [0]))
        await asyncio.sleep(0.05)
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - began < 1.0
        worker_callables.RELEASE.set()

    @pytest.mark.parametrize(
        "target",
        [
            "worker_callables_missing:echo",
            "worker_callables:missing",
            "worker_callables:NOT_CALLABLE",
            "no_function",
        ],
    )
    def test_a_bad_target_is_a_config_error(self, target: str) -> None:
        """A module that cannot be imported or a missing function fails at construction."""
        with pytest.raises(ConfigError) as caught:
            CallableExecutor(target)
        assert caught.value.key == "worker.callable"


# The stand-in server's answer by model name (any other model: the path and body echoed).
_ERRORS = {
    "bad": (400, b'{"error": {"message": "bad request"}}'),
    "busy": (429, b'{"error": {"message": "too many requests"}}'),
    "boom": (500, b"internal error"),
    "oom": (500, b'{"error": {"message": "CUDA out of memory"}}'),
    "garbage": (200, b"not json"),
}


class _OpenAIHandler(BaseHTTPRequestHandler):
    """A stand-in OpenAI server: echoes path and body; the model name picks an error."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        status, payload = _ERRORS.get(
            body.get("model"), (200, json.dumps({"path": self.path, "body": body}).encode())
        )
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def openai_url() -> Iterator[str]:
    """A stand-in OpenAI-compatible server on 127.0.0.1, in a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
async def openai(openai_url: str) -> AsyncIterator[OpenAIExecutor]:
    """An executor for the stand-in server, closed afterwards."""
    executor = OpenAIExecutor(openai_url)
    yield executor
    await executor.aclose()


class TestOpenAIExecutor:
    @pytest.mark.parametrize(
        ("task", "path", "input"),
        [
            (Task.CHAT, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
            (Task.COMPLETION, "/v1/completions", {"prompt": "x", "model": "served-name"}),
            (Task.EMBEDDING, "/v1/embeddings", {"input": ["a", "b"]}),
        ],
    )
    async def test_forwards_the_input_by_task(
        self, openai: OpenAIExecutor, task: Task, path: str, input: dict[str, Any]
    ) -> None:
        """The input goes to the task's endpoint (model added if absent); the JSON comes back."""
        outcome = await openai.execute(job(task=task, input=input), [0])
        assert isinstance(outcome, ExecutionResult)
        assert outcome.output["path"] == path
        assert outcome.output["body"] == {"model": "m", **input}
        assert outcome.peak_memory_mb is None
        assert outcome.gpu_seconds is not None and outcome.gpu_seconds >= 0

    @pytest.mark.parametrize(
        ("model", "kind"),
        [
            ("bad", FailureKind.CLIENT_ERROR),
            ("busy", FailureKind.BACKEND_ERROR),
            ("boom", FailureKind.BACKEND_ERROR),
            ("oom", FailureKind.OUT_OF_MEMORY),
            ("garbage", FailureKind.BACKEND_ERROR),
        ],
    )
    async def test_maps_error_answers(
        self, openai: OpenAIExecutor, model: str, kind: FailureKind
    ) -> None:
        """4xx is a client error (429 a backend error), 5xx a backend error, OOM text an OOM."""
        outcome = await openai.execute(job(model=model, input={"messages": []}), [0])
        assert isinstance(outcome, Failure) and outcome.kind is kind

    async def test_a_refused_connection_is_unreachable(self) -> None:
        """Nothing listening on the port: the server is unreachable."""
        executor = OpenAIExecutor(f"http://127.0.0.1:{free_port()}")
        try:
            outcome = await executor.execute(job(), [0])
        finally:
            await executor.aclose()
        assert isinstance(outcome, Failure) and outcome.kind is FailureKind.UNREACHABLE

    async def test_generic_tasks_and_past_deadlines_do_not_call(
        self, openai: OpenAIExecutor
    ) -> None:
        """A generic task is a client error; a deadline already passed is a timeout."""
        generic = await openai.execute(job(task=Task.GENERIC), [0])
        late = await openai.execute(job(deadline=time.time() - 1), [0])
        assert isinstance(generic, Failure) and generic.kind is FailureKind.CLIENT_ERROR
        assert isinstance(late, Failure) and late.kind is FailureKind.TIMEOUT

"""Backend clients: what executes a placed request (SPEC §4 AI Orchestrator integration).

A client takes a :class:`~gpu_request_router.core.events.Dispatch` and returns either an
:class:`~gpu_request_router.core.events.ExecutionResult` or a
:class:`~gpu_request_router.core.events.Failure`; it raises only for its own bugs. It calls
``started()`` once the backend has the work. For a streaming request (``input.stream``) the
answer's bytes go to a :class:`StreamSink` as they arrive.

- ``simulated``: an in-process :class:`~gpu_request_router.services.simulator.SimulatedFleet`.
- ``agent``: a host running ``gpurouter worker``, over the worker protocol (SPEC §6). After a
  router restart it can also be asked what became of an execution (:meth:`AgentClient.lookup`)
  and waited on for one it still runs (:meth:`AgentClient.attach`).
- ``openai``: an OpenAI-compatible inference server (vLLM, SGLang, TGI, Ollama ...), the body
  forwarded as it is, streams passed through.

The HTTP clients use aiohttp with one pooled keep-alive session per backend: measured against
the same stand-in backend on this project's 2-core machine, aiohttp used ~0.14 ms of CPU per
request and carried ~7,000 requests/s at concurrency 16, httpx ~1.8 ms and ~550/s.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Protocol

import aiohttp

from gpu_request_router.core.events import (
    Dispatch,
    ExecutionResult,
    Failure,
    FailureKind,
    Lookup,
    NotKnown,
    StillRunning,
)
from gpu_request_router.models.request import Task
from gpu_request_router.services.simulator import FAILS_AFTER, SimulatedFleet
from gpu_request_router.utils.clock import Clock

__all__ = [
    "AgentClient",
    "BackendClient",
    "OpenAIClient",
    "SimulatedBackend",
    "StreamSink",
    "agent_payload",
    "includes_usage",
    "parse_vllm_load",
]

# Seconds an execution may outlive its deadline on the wire before the client gives up.
_DEADLINE_GRACE_S = 5.0
# A re-attached execution is long-polled this long per call (the worker allows up to 60 s).
_ATTACH_WAIT_S = 30.0
# How long a lookup's answer may take beyond the wait it asked for.
_LOOKUP_GRACE_S = 5.0
# Backoff between long-polls that got no answer: from the first figure, doubling, to the second.
_ATTACH_RETRY_S = (0.2, 5.0)
# The pause between long-polls that found the execution still running.
_ATTACH_PAUSE_S = 0.05
# How often a simulated execution looks whether its end moved (others started or ended beside it).
_RESHARE_CHECK_S = 0.25
_OPENAI_PATHS = {
    Task.CHAT: "/v1/chat/completions",
    Task.COMPLETION: "/v1/completions",
    Task.EMBEDDING: "/v1/embeddings",
}


class StreamSink:
    """Where the bytes of a streamed answer go, in order; ``sent`` once any byte has gone."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sent = False

    def put(self, chunk: bytes) -> None:
        """Pass a chunk on."""
        self.sent = True
        self.queue.put_nowait(chunk)

    def close(self) -> None:
        """No more chunks will come."""
        self.queue.put_nowait(None)


class BackendClient(Protocol):
    """Executes placed requests on one backend."""

    name: str

    async def execute(
        self, dispatch: Dispatch, started: Callable[[], None], sink: StreamSink | None = None
    ) -> ExecutionResult | Failure:
        """Run one execution to its end; call ``started()`` once the backend has it."""
        ...

    async def cancel(self, execution_id: str) -> None:
        """Tell the backend to stop an execution (a no-op for one it does not know)."""
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...


async def _hang() -> NoReturn:
    """Wait until cancelled (a simulated execution that never answers)."""
    await asyncio.Event().wait()
    raise AssertionError("an event nobody sets was set")


def includes_usage(body: Mapping[str, Any]) -> bool:
    """Whether a streamed call asked for the usage chunk (``stream_options.include_usage``)."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def _stream_chunks(output: Any, include_usage: bool = False) -> list[bytes]:
    """OpenAI streaming chunks (SSE) of a complete chat or text completion answer.

    As OpenAI streams: each choice's words, then a chunk with its ``finish_reason``; with
    ``include_usage``, a last chunk with the answer's ``usage`` and no choices; then
    ``data: [DONE]``.
    """
    if not isinstance(output, dict):
        return [b"data: [DONE]\n\n"]
    chat = output.get("object") == "chat.completion"
    head = {
        "id": output.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": output.get("created"),
        "model": output.get("model"),
    }

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n".encode()

    chunks: list[bytes] = []
    for choice in output.get("choices", []):
        index = choice.get("index", 0)
        text = choice.get("message", {}).get("content", "") if chat else choice.get("text", "")
        for position, word in enumerate(text.split(" ") if text else []):
            piece = word if position == 0 else f" {word}"
            part: dict[str, Any] = {"delta": {"content": piece}} if chat else {"text": piece}
            chunks.append(chunk([{"index": index, **part, "finish_reason": None}]))
        end: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
        reason = choice.get("finish_reason") or "stop"
        chunks.append(chunk([{"index": index, **end, "finish_reason": reason}]))
    if include_usage and isinstance(output.get("usage"), dict):
        chunks.append(chunk([], usage=output["usage"]))
    chunks.append(b"data: [DONE]\n\n")
    return chunks


class SimulatedBackend:
    """The ``simulated`` backend: executions on a :class:`SimulatedFleet`, in real time."""

    def __init__(self, name: str, fleet: SimulatedFleet, clock: Clock) -> None:
        self.name = name
        self._fleet = fleet
        self._clock = clock

    async def execute(
        self, dispatch: Dispatch, started: Callable[[], None], sink: StreamSink | None = None
    ) -> ExecutionResult | Failure:
        """Hold the execution's memory for its simulated duration, then answer (or stream)."""
        fleet = self._fleet
        clock = self._clock
        plan = fleet.plan(dispatch)
        began = clock.now()
        refused = fleet.start(dispatch, plan, began)
        if refused is not None:
            return refused
        execution_id = dispatch.execution_id
        started()
        try:
            duration = plan.duration_s
            if duration is None:
                await _hang()
            if plan.failure is not None:
                await asyncio.sleep(duration * FAILS_AFTER)
                return plan.failure
            chunks = (
                []
                if sink is None
                else _stream_chunks(plan.output, includes_usage(dispatch.request.input))
            )
            marks = [(i + 1) / len(chunks) for i in range(len(chunks))] or [1.0]
            for sent, mark in enumerate(marks):
                # A chunk (or the end) at its share of the run; on a shared GPU the end moves
                # as others start and end beside it, so look again now and then.
                while (due := fleet.due(execution_id)) is not None:
                    wait = began + (due - began) * mark - clock.now()
                    if wait <= 0:
                        break
                    await asyncio.sleep(min(wait, _RESHARE_CHECK_S))
                if chunks and sink is not None:
                    sink.put(chunks[sent])
            return fleet.finish(execution_id, plan, clock.now() - began, clock.now())
        finally:
            fleet.stop(execution_id, clock.now())

    async def cancel(self, execution_id: str) -> None:
        """Free the execution's simulated GPUs."""
        self._fleet.stop(execution_id, self._clock.now())

    async def aclose(self) -> None:
        """Nothing to release."""


class _HttpBackend:
    """The shared part of HTTP backends: one pooled session, created in the running loop."""

    def __init__(self, name: str, url: str, token: str | None, connections: int) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The keep-alive session (made on first use, inside the event loop)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=30),
            )
        return self._session

    def _timeout(self, dispatch: Dispatch, now: float) -> aiohttp.ClientTimeout:
        left = max(1.0, dispatch.deadline - now + _DEADLINE_GRACE_S)
        return aiohttp.ClientTimeout(total=left, sock_connect=5)

    async def aclose(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()


def agent_payload(dispatch: Dispatch, reported_id: Callable[[str], str]) -> dict[str, Any]:
    """The body of ``POST /v1/executions`` for a dispatch (the worker protocol, SPEC §6).

    ``gpu_ids`` and the keys of ``reservations`` are the ids the worker itself gave the GPUs:
    ``reported_id`` maps each of the router's GPU ids to it.
    """
    request = dispatch.request
    return {
        "execution_id": dispatch.execution_id,
        "request_id": request.id,
        "attempt": dispatch.attempt,
        "model": request.model,
        "task": request.task.value,
        "input": dict(request.input),
        "gpu_ids": [reported_id(gpu_id) for gpu_id in dispatch.placement.gpu_ids],
        "reservations": {reported_id(gpu_id): mb for gpu_id, mb in dispatch.reservations.items()},
        "estimate": {
            "gpu_memory_mb": request.estimate.gpu_memory_mb,
            "weights_mb": request.estimate.weights_mb,
            "duration_s": dict(request.estimate.duration_s),
        },
        "deadline": dispatch.deadline,
    }


def _result(output: Any, usage: Mapping[str, Any]) -> ExecutionResult:
    """A worker's answer for a finished execution: its output and its ``usage`` figures."""
    load = _number(usage.get("load_s"))
    return ExecutionResult(
        output=output,
        gpu_seconds=_number(usage.get("gpu_seconds")),
        peak_memory_mb=_integer(usage.get("peak_memory_mb")),
        load_s=load if load is not None and load >= 0 else 0.0,
    )


def _failure_of(status: int, body: Any, text: str) -> Failure:
    """The failure an HTTP error answer of a backend means."""
    message = text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
        message = str(body.get("message") or body.get("detail") or message)
    if status == 507 or (isinstance(body, dict) and body.get("error") == "gpu_out_of_memory"):
        peak = body.get("peak_memory_mb") if isinstance(body, dict) else None
        return Failure(FailureKind.OUT_OF_MEMORY, message, peak if isinstance(peak, int) else None)
    if 400 <= status < 500 and status not in (408, 429):
        return Failure(FailureKind.CLIENT_ERROR, f"backend refused ({status}): {message}")
    return Failure(FailureKind.BACKEND_ERROR, f"backend error ({status}): {message}")


async def _read_json(response: aiohttp.ClientResponse) -> tuple[Any, str]:
    text = await response.text()
    try:
        return json.loads(text), text
    except ValueError:
        return None, text


class AgentClient(_HttpBackend):
    """The ``agent`` backend: ``gpurouter worker`` on a GPU host, over the worker protocol.

    The router's GPU ids (``<backend name>:<index>``) need not be the worker's
    (``<its own name>:<index>``): ``reported_id`` gives, for each of the router's ids, the id
    the worker reported for that GPU, which is what the worker is sent.
    """

    def __init__(
        self,
        name: str,
        url: str,
        token: str | None,
        clock: Clock,
        *,
        reported_id: Callable[[str], str],
        connections: int = 256,
    ) -> None:
        super().__init__(name, url, token, connections)
        self._clock = clock
        self._reported_id = reported_id

    async def execute(
        self, dispatch: Dispatch, started: Callable[[], None], sink: StreamSink | None = None
    ) -> ExecutionResult | Failure:
        """POST the execution and wait for its outcome."""
        timeout = self._timeout(dispatch, self._clock.now())
        try:
            request = self.session.post(
                f"{self.url}/v1/executions",
                json=agent_payload(dispatch, self._reported_id),
                timeout=timeout,
            )
            started()
            async with request as response:
                body, text = await _read_json(response)
                if response.status != 200:
                    return _failure_of(response.status, body, text)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            return Failure(FailureKind.UNREACHABLE, f"worker {self.name}: {exc!r}")
        if not isinstance(body, dict):
            return Failure(FailureKind.BACKEND_ERROR, "the worker answered no JSON object")
        usage = body.get("usage")
        if not isinstance(usage, dict):
            usage = {}
        output = body.get("output")
        if sink is not None:
            for chunk in _stream_chunks(output, includes_usage(dispatch.request.input)):
                sink.put(chunk)
        return _result(output, usage)

    async def cancel(self, execution_id: str) -> None:
        """DELETE the execution on the worker."""
        timeout = aiohttp.ClientTimeout(total=5)
        async with self.session.delete(
            f"{self.url}/v1/executions/{execution_id}", timeout=timeout
        ) as response:
            await response.read()

    async def lookup(self, execution_id: str, wait_s: float = 0.0) -> Lookup | None:
        """GET the execution on the worker: what became of it; ``None`` for no usable answer.

        With ``wait_s`` (at most 60) the worker holds its answer while the execution runs, up to
        that long. Connection errors and time-outs raise as aiohttp raises them.
        """
        timeout = aiohttp.ClientTimeout(total=wait_s + _LOOKUP_GRACE_S, sock_connect=5)
        params = {"wait": f"{wait_s:.3f}"} if wait_s > 0 else None
        async with self.session.get(
            f"{self.url}/v1/executions/{execution_id}", params=params, timeout=timeout
        ) as response:
            body, text = await _read_json(response)
            status = response.status
        if status == 404:
            return NotKnown()
        if status != 200 or not isinstance(body, dict):
            return None
        state = body.get("state")
        if state == "running":
            return StillRunning()
        if state == "succeeded":
            usage = body.get("usage")
            return _result(body.get("output"), usage if isinstance(usage, dict) else {})
        answered = _integer(body.get("status"))
        if state in ("failed", "cancelled") and answered is not None and answered >= 400:
            return _failure_of(answered, body, text)
        return None

    async def attach(self, dispatch: Dispatch) -> ExecutionResult | Failure:
        """Wait for the outcome of an execution the worker already runs (after a router restart).

        Long-polls :meth:`lookup` until the execution ends. A worker that no longer knows it has
        lost it (``worker_lost``); one that gives no answer is asked again after a backoff,
        until the deadline (plus a grace) has passed (``timeout``).
        """
        delay, most = _ATTACH_RETRY_S
        while True:
            left = dispatch.deadline + _DEADLINE_GRACE_S - self._clock.now()
            if left <= 0:
                return Failure(
                    FailureKind.TIMEOUT, "the deadline passed before the execution ended"
                )
            try:
                answer = await self.lookup(dispatch.execution_id, min(_ATTACH_WAIT_S, left))
            except (aiohttp.ClientError, TimeoutError):
                answer = None
            if isinstance(answer, ExecutionResult | Failure):
                return answer
            if isinstance(answer, NotKnown):
                return Failure(
                    FailureKind.WORKER_LOST,
                    f"worker {self.name} no longer knows execution {dispatch.execution_id}",
                )
            if isinstance(answer, StillRunning):
                # A pause all the same: a worker that does not hold its answer is not polled hot.
                pause, delay = _ATTACH_PAUSE_S, _ATTACH_RETRY_S[0]
            else:
                pause, delay = delay, min(delay * 2, most)
            await asyncio.sleep(min(pause, left))


class OpenAIClient(_HttpBackend):
    """The ``openai`` backend: an OpenAI-compatible server; the body goes as it is."""

    def __init__(self, name: str, url: str, clock: Clock, *, connections: int = 256) -> None:
        super().__init__(name, url, None, connections)
        self._clock = clock

    async def execute(
        self, dispatch: Dispatch, started: Callable[[], None], sink: StreamSink | None = None
    ) -> ExecutionResult | Failure:
        """Forward the request's body; pass a stream through to ``sink``."""
        request = dispatch.request
        path = _OPENAI_PATHS.get(request.task)
        if path is None:
            return Failure(FailureKind.CLIENT_ERROR, f"an openai backend cannot run {request.task}")
        body = {**request.input, "model": request.model}
        streaming = sink is not None and bool(body.get("stream"))
        if not streaming:
            body.pop("stream", None)
        timeout = self._timeout(dispatch, self._clock.now())
        began = self._clock.now()
        try:
            async with self.session.post(f"{self.url}{path}", json=body, timeout=timeout) as reply:
                started()
                if reply.status != 200:
                    parsed, text = await _read_json(reply)
                    return _failure_of(reply.status, parsed, text)
                if streaming:
                    assert sink is not None
                    async for chunk in reply.content.iter_any():
                        sink.put(chunk)
                    output: Any = None
                else:
                    output, text = await _read_json(reply)
                    if output is None:
                        return Failure(FailureKind.BACKEND_ERROR, "the backend answered no JSON")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            if sink is not None and sink.sent:
                return Failure(FailureKind.STREAM_BROKEN, f"stream from {self.name} broke: {exc!r}")
            return Failure(FailureKind.UNREACHABLE, f"backend {self.name}: {exc!r}")
        return ExecutionResult(output=output, gpu_seconds=self._clock.now() - began)

    async def cancel(self, execution_id: str) -> None:
        """Nothing to tell: the runtime cancels the call, which closes the connection."""

    async def load(self, metrics_url: str) -> float | None:
        """The server's load (0..1) from its Prometheus metrics (vLLM's KV-cache usage)."""
        timeout = aiohttp.ClientTimeout(total=2)
        async with self.session.get(metrics_url, timeout=timeout) as response:
            if response.status != 200:
                return None
            return parse_vllm_load(await response.text())


def parse_vllm_load(text: str) -> float | None:
    """The KV-cache usage (0..1) in vLLM's metrics text, or ``None`` if it is not there."""
    for line in text.splitlines():
        if line.startswith(("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")):
            try:
                return max(0.0, min(1.0, float(line.rsplit(" ", 1)[1])))
            except (IndexError, ValueError):
                return None
    return None


def _number(value: Any) -> float | None:
    """A finite number the backend reported (``None``: not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a double
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

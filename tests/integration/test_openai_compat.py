"""The OpenAI-compatible front door, driven by the official `openai` Python client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from gpu_request_router.api.app import create_app
from gpu_request_router.testing import free_port

if TYPE_CHECKING:
    from conftest import LiveServer


def _client(server: LiveServer, user: str = "alice", **options: Any) -> openai.OpenAI:
    key = server.headers(user)["Authorization"].split(" ", 1)[1]
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, **options)


MESSAGES = [{"role": "user", "content": "Say something"}]


def test_chat_completion_plain_and_streamed(server: LiveServer) -> None:
    """Chat works as the client expects, whole or streamed, with the same words."""
    client = _client(server)
    whole = client.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=6)
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and text and len(text.split()) == 6
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    chunks = list(
        client.chat.completions.create(
            model="llama-3-8b", messages=MESSAGES, max_tokens=6, stream=True
        )
    )
    pieces = [chunk.choices[0].delta.content for chunk in chunks[:-1]]
    assert len(pieces) == 6 and len("".join(p or "" for p in pieces).split()) == 6
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [r["status"] for r in server.listed()] == ["succeeded", "succeeded"]


def test_completions_plain_and_streamed(server: LiveServer) -> None:
    """Text completions work whole and streamed."""
    client = _client(server)
    whole = client.completions.create(model="tinyllama-1.1b", prompt="Once upon", max_tokens=4)
    assert whole.object == "text_completion" and len(whole.choices[0].text.split()) == 4
    streamed = client.completions.create(
        model="tinyllama-1.1b", prompt="Once upon", max_tokens=4, stream=True
    )
    assert len("".join(chunk.choices[0].text for chunk in streamed).split()) == 4


def test_embeddings_and_models(server: LiveServer) -> None:
    """Embeddings come back one per input; the model list is the catalog."""
    client = _client(server)
    answer = client.embeddings.create(model="all-minilm-l6-v2", input=["one", "two", "three"])
    assert [item.index for item in answer.data] == [0, 1, 2]
    assert all(len(item.embedding) > 0 for item in answer.data)
    assert {model.id for model in client.models.list()} == {
        "llama-3-8b",
        "qwen2.5-7b",
        "tinyllama-1.1b",
        "all-minilm-l6-v2",
    }


def test_priority_header_and_quota_apply(serve: Any) -> None:
    """X-Priority sets the class; a class above the user's maximum is refused with 403."""
    server: LiveServer = serve(user_quotas={"alice": {"max_priority": "high"}})
    high = _client(server, default_headers={"X-Priority": "high"})
    high.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=2)
    assert server.listed()[0]["priority"] == "high"
    critical = _client(server, default_headers={"X-Priority": "critical"})
    with pytest.raises(openai.PermissionDeniedError) as info:
        critical.chat.completions.create(model="llama-3-8b", messages=MESSAGES)
    assert info.value.body["type"] == "permission_error"  # type: ignore[index]


def test_errors_take_openai_shape(serve: Any) -> None:
    """Unknown models, bad keys and rate limits are OpenAI-shaped errors the client raises."""
    server: LiveServer = serve(user_quotas={"alice": {"requests_per_minute": 1}})
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    body = unknown.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    client.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=2)
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60


def test_one_model_is_found_by_id_and_an_unknown_one_is_model_not_found(serve: Any) -> None:
    """``GET /v1/models/{id}`` answers a catalog model, and 404 ``model_not_found`` otherwise."""
    server: LiveServer = serve()
    client = _client(server)
    assert client.models.retrieve("llama-3-8b").id == "llama-3-8b"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("gpt-9")
    assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "llama-3-8b", "messages": MESSAGES}),
        ("/v1/completions", {"model": "tinyllama-1.1b", "prompt": "Once upon"}),
        ("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "x"}),
    ],
)
def test_a_full_queue_is_a_503_with_retry_after_in_openai_shape(
    serve: Any, path: str, body: dict[str, Any]
) -> None:
    """With max_queued_total waiting, a call is 503 + Retry-After, OpenAI-shaped; none is queued."""
    server: LiveServer = serve(quotas={"max_queued_total": 1})
    root = server.client("root")
    for gpu in ("sim:0", "sim:1"):
        assert root.post(f"/v1/gpus/{gpu}/cordon").status_code == 200
    waiting = server.client("alice").post(
        "/v1/requests", json={"model": "llama-3-8b", "input": {"messages": MESSAGES}}
    )
    assert waiting.status_code == 202
    response = server.client("bob").post(path, json=body)
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "queue-full"
    assert "waiting" in error["message"]
    assert [item["id"] for item in server.listed()] == [waiting.json()["id"]]
    with pytest.raises(openai.InternalServerError) as info:
        _client(server, "bob").chat.completions.create(model="llama-3-8b", messages=MESSAGES)
    assert info.value.status_code == 503


_CHAT = b'{"model": "llama-3-8b", "messages": [{"role": "user", "content": "x"}]}'


@pytest.mark.parametrize(
    ("path", "body", "headers", "param"),
    [
        ("/v1/chat/completions", b'{"model": "llama-3-8b", "messages": [', {}, "#"),
        ("/v1/chat/completions", b'{"model": "llama-3-8b", "messages": []}', {}, "messages"),
        ("/v1/chat/completions", b'["llama-3-8b"]', {}, ""),
        ("/v1/chat/completions", b"", {}, ""),
        ("/v1/chat/completions", _CHAT, {"Content-Type": "text/plain"}, ""),
        ("/v1/chat/completions", _CHAT, {"Content-Type": ""}, ""),
        ("/v1/completions", b'{"model": "llama-3-8b", "prompt": 7}', {}, "prompt"),
        ("/v1/embeddings", b'{"model": "llama-3-8b", "input": {"text": "x"}}', {}, "input"),
        ("/v1/chat/completions", _CHAT, {"X-Priority": "p" * 65}, "X-Priority"),
        ("/v1/chat/completions", _CHAT[:-1] + b', "max_tokens": 0}', {}, "max_tokens"),
        (
            "/v1/chat/completions",
            _CHAT[:-1] + b', "max_completion_tokens": 0}',
            {},
            "max_completion_tokens",
        ),
        ("/v1/chat/completions", _CHAT[:-1] + b', "temperature": NaN}', {}, "temperature"),
        ("/v1/completions", b'{"model": "tinyllama-1.1b", "prompt": "\\udc00"}', {}, "prompt"),
        (
            "/v1/embeddings",
            b'{"model": "all-minilm-l6-v2", "input": "x"}',
            {"X-Priority": ""},
            "X-Priority",
        ),
    ],
)
def test_bad_input_is_a_422_in_openai_shape_and_changes_nothing(
    server: LiveServer, path: str, body: bytes, headers: dict[str, str], param: str
) -> None:
    """Bad bodies and an empty or overlong X-Priority are refused before admission.

    As FastAPI refuses them on its other routes: malformed or invalid JSON, no body, a body
    that is not JSON by its content type. ``param`` names the offending field ("" for the body
    as a whole, "#" for a position in it).
    """
    response = server.client("alice").post(
        path, content=body, headers={"Content-Type": "application/json", **headers}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    where = (error["param"] or "").split(".")[0]
    assert where.isdigit() if param == "#" else where == param
    assert server.listed() == []


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/vnd.example+json"]
)
def test_json_under_any_json_content_type_is_served(server: LiveServer, content_type: str) -> None:
    """A parameter or a ``+json`` subtype is JSON too, as FastAPI reads it."""
    response = server.client("alice").post(
        "/v1/chat/completions", content=_CHAT, headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_an_unreadable_body_is_a_400(server: LiveServer) -> None:
    """A body that is not UTF-8 cannot be parsed at all: 400, and nothing is queued."""
    response = server.client("alice").post(
        "/v1/chat/completions",
        content=b'{"model": "\xff\xfe"}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert server.listed() == []


def test_the_caller_is_authenticated_under_a_root_path(server: LiveServer) -> None:
    """Mounted under a prefix (the auth middleware guards ``/v1/`` only), the key still decides."""
    app = create_app(server.settings, seed=1)
    with TestClient(app, root_path="/api") as client:
        path = "/api/v1/chat/completions"
        refused = client.post(path, content=_CHAT, headers={"Content-Type": "application/json"})
        assert refused.status_code == 401, refused.text
        answered = client.post(
            path,
            content=_CHAT,
            headers={"Content-Type": "application/json", **server.headers("alice")},
        )
        assert answered.status_code == 200, answered.text
        assert answered.json()["object"] == "chat.completion"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_another_method_on_an_openai_route_is_a_405_naming_post(
    server: LiveServer, path: str
) -> None:
    """Only POST is served on these routes; any other method is refused with ``Allow``."""
    response = server.client("alice").get(path)
    assert response.status_code == 405, response.text
    assert response.headers["Allow"] == "POST"
    assert server.listed() == []


def test_a_failure_before_the_first_byte_is_retried_invisibly(server: LiveServer) -> None:
    """A stream whose first attempt fails is served by the second, clean, from the start."""
    client = _client(server)
    stream = client.chat.completions.create(
        model="llama-3-8b",
        messages=MESSAGES,
        max_tokens=5,
        stream=True,
        extra_body={"simulate": {"failure": "error", "fail_attempts": 1, "duration_s": 0.1}},
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len("".join(pieces).split()) == 5
    (request,) = server.listed()
    assert request["attempts"] == 2 and request["status"] == "succeeded"


def test_a_call_failing_for_good_is_a_server_error(server: LiveServer) -> None:
    """A call whose every attempt fails is a 502 with the backend's error in OpenAI's shape."""
    client = _client(server)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="llama-3-8b",
            messages=MESSAGES,
            extra_body={"simulate": {"failure": "error", "duration_s": 0.01}},
        )
    assert info.value.status_code == 502
    assert info.value.body["code"] == "backend_error"  # type: ignore[index]


@pytest.fixture
def standin() -> Iterator[str]:
    """The OpenAI-compatible stand-in server as a real process."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gpu_request_router.bench.openai_standin", "--port", str(port)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "stand-in did not start"
        time.sleep(0.05)
    yield url
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:  # a loaded machine: do not leave it running
        process.kill()
        process.wait(10)
        raise


def test_openai_backend_forwards_and_streams_through(serve: Any, standin: str) -> None:
    """Behind an `openai` backend the answer is the inference server's, streams pass through."""
    backend = {
        "name": "vllm-0",
        "kind": "openai",
        "url": standin,
        "gpu": {"type": "H100-80GB"},
        "models": ["llama-3-8b"],
        "metrics_url": f"{standin}/metrics",
    }
    server: LiveServer = serve(backends=[backend])
    client = _client(server)
    answer = client.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=3)
    assert answer.id.startswith("chatcmpl-standin")
    assert answer.choices[0].message.content == "the router sent"
    streamed = client.chat.completions.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=3, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == (
        "the router sent"
    )
    gpu = server.client("root").get("/v1/gpus/vllm-0:0").json()
    assert gpu["type"] == "H100-80GB" and gpu["models_loaded"] == ["llama-3-8b"]
    assert gpu["memory_total_mb"] == 81559
    embedding_model_missing = server.client("alice").post(
        "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"}
    )
    assert embedding_model_missing.status_code == 422, "no backend serves it"


@pytest.fixture
def dcgm_exporter() -> Iterator[str]:
    """A dcgm-exporter-format endpoint on loopback serving the sample readings of two H200s."""
    sample = (Path(__file__).parents[1] / "data" / "gpu" / "dcgm_exporter_sample.txt").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(sample)

        def log_message(self, format: str, *args: Any) -> None:
            return

    exporter = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=exporter.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{exporter.server_address[1]}/metrics"
    exporter.shutdown()
    exporter.server_close()
    thread.join(5)


def test_openai_backend_gpu_is_read_from_its_dcgm_exporter(
    serve: Any, standin: str, dcgm_exporter: str
) -> None:
    """With dcgm_url, the backend's GPU carries dcgm-exporter's live figures for its index."""
    backend = {
        "name": "vllm-1",
        "kind": "openai",
        "url": standin,
        "gpu": {"type": "H200-141GB"},
        "models": ["llama-3-8b"],
        "dcgm_url": dcgm_exporter,
        "dcgm_gpu": 1,
    }
    server: LiveServer = serve(backends=[backend])
    gpu = server.client("root").get("/v1/gpus/vllm-1:0").json()
    assert gpu["temperature_c"] == 60.0 and gpu["power_w"] == 692.573
    assert gpu["name"] == "NVIDIA H200" and gpu["memory_total_mb"] == 143771
    assert gpu["health"] == "healthy" and gpu["schedulable"]
    answer = _client(server).chat.completions.create(
        model="llama-3-8b", messages=MESSAGES, max_tokens=2
    )
    assert answer.choices[0].message.content == "the router"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/requests"])
def test_a_client_gone_while_sending_its_body_is_a_400_not_an_error(
    server: LiveServer, path: str
) -> None:
    """The body cannot be read: 400 as the framework answers it, nothing queued, no 500."""
    app = create_app(server.settings, seed=1)
    headers = [(k.lower().encode(), v.encode()) for k, v in server.headers("alice").items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [*headers, (b"content-type", b"application/json"), (b"content-length", b"99")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    messages: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        messages.append(message)

    with TestClient(app) as client:
        client.portal.call(app, scope, receive, send)
        listed = client.get("/v1/requests", headers=server.headers("alice"))
    assert messages[0]["type"] == "http.response.start"
    assert messages[0]["status"] == 400
    assert listed.status_code == 200 and listed.json()["items"] == []

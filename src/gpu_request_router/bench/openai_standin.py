"""A fast OpenAI-compatible stand-in server: the backend of tests and of the overhead benchmark.

It answers ``/v1/chat/completions``, ``/v1/completions`` (both also streamed as SSE ending in
``data: [DONE]``), ``/v1/embeddings``, ``/v1/models`` and ``/health`` with well-formed,
deterministic answers after an optional delay, and serves vLLM-style load gauges on ``/metrics``
(``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:gpu_cache_usage_perc``).
Built on aiohttp, it costs far less per request than the router, so it never is the bottleneck.

Run it with ``python -m gpu_request_router.bench.openai_standin --port 8000 [--delay-ms 0]``.
A body with ``"fail": 500`` (or any status) makes it answer that status, for failure tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

__all__ = ["build_app", "main"]

_WORDS = ("the", "router", "sent", "this", "to", "a", "stand-in", "backend", "which", "answered")


def _words(count: int) -> list[str]:
    return [_WORDS[i % len(_WORDS)] for i in range(count)]


def _prompt_tokens(body: dict[str, Any]) -> int:
    text = json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
    return max(1, len(text) // 4)


class _State:
    """What the stand-in counts: requests in flight, for its /metrics."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.running = 0
        self.served = 0


async def _completion(request: web.Request) -> web.StreamResponse:
    state: _State = request.app["state"]
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error(400, "the body is not JSON")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return _error(400, "model is required")
    if "fail" in body:
        return _error(int(body["fail"]), "failure asked for")
    chat = request.path.endswith("/chat/completions")
    count = int(body.get("max_tokens") or 16)
    state.running += 1
    try:
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        words = _words(count)
        prompt = _prompt_tokens(body)
        created = int(time.time())
        ident = f"{'chatcmpl' if chat else 'cmpl'}-standin-{state.served}"
        state.served += 1
        if body.get("stream"):
            return await _stream(request, body["model"], words, chat, ident, created)
        text = " ".join(words)
        choice: dict[str, Any] = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
            if chat
            else {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        )
        return web.json_response(
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": body["model"],
                "choices": [choice],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": count,
                    "total_tokens": prompt + count,
                },
            }
        )
    finally:
        state.running -= 1


async def _stream(
    request: web.Request, model: str, words: list[str], chat: bool, ident: str, created: int
) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for index, word in enumerate(words):
        piece = word if index == 0 else f" {word}"
        delta: dict[str, Any] = (
            {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            if chat
            else {"index": 0, "text": piece, "finish_reason": None}
        )
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [delta],
        }
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    last: dict[str, Any] = (
        {"index": 0, "delta": {}, "finish_reason": "length"}
        if chat
        else {"index": 0, "text": "", "finish_reason": "length"}
    )
    final = {
        "id": ident,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [last],
    }
    await response.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
    await response.write_eof()
    return response


async def _embeddings(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error(400, "the body is not JSON")
    items = body.get("input", "")
    items = items if isinstance(items, list) else [items]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.5, -0.5, 0.5, -0.5]}
        for i in range(len(items))
    ]
    tokens = _prompt_tokens(body)
    return web.json_response(
        {
            "object": "list",
            "model": body.get("model", ""),
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


async def _models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": "stand-in", "object": "model", "owned_by": "test"}]}
    )


async def _metrics(request: web.Request) -> web.Response:
    state: _State = request.app["state"]
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="stand-in"}} {state.running}\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="stand-in"} 0\n'
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        f'vllm:gpu_cache_usage_perc{{model_name="stand-in"}} {min(1.0, state.running / 64)}\n'
    )
    return web.Response(text=text, content_type="text/plain")


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _error(status: int, message: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": "invalid_request_error", "code": status}},
        status=status,
    )


def build_app(delay_s: float = 0.0) -> web.Application:
    """The stand-in's aiohttp application."""
    app = web.Application()
    app["state"] = _State(delay_s)
    app.router.add_post("/v1/chat/completions", _completion)
    app.router.add_post("/v1/completions", _completion)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the stand-in until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="answer after this long")
    args = parser.parse_args(argv)
    web.run_app(build_app(args.delay_ms / 1000), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()

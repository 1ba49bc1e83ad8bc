"""A closed-loop HTTP load generator, run as its own process by ``gpurouter bench overhead``.

``concurrency`` clients each send a request, wait for the answer, and send the next, for
``warmup_s`` (not measured) and then ``duration_s``; aiohttp keeps one connection per client.
It prints one JSON object: requests and errors in the measured window, its length, every
latency percentile the benchmark reports, and the total sent (warm-up included) so that the
router's CPU time can be divided by it.

Modes: ``chat`` posts ``/v1/chat/completions``; ``submit`` posts ``/v1/requests`` (the durable
async API) and counts the 201; ``submit_wait`` posts ``/v1/requests`` and then waits for the
result with ``GET /v1/requests/{id}?wait=30``, timing both together.

Run it by hand with ``python -m gpu_request_router.bench.loadgen --url URL --mode chat``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import uvloop

__all__ = ["MODES", "percentiles", "run"]

MODES = ("chat", "submit", "submit_wait")
_MESSAGES = [{"role": "user", "content": "Say hello to the benchmark."}]
_PERCENTILES = (50, 90, 99)


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """The p50, p90 and p99 of ``samples`` (nearest rank), or zeros when there are none."""
    if not samples:
        return {f"p{p}": 0.0 for p in _PERCENTILES}
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {f"p{p}": ordered[min(last, round(p / 100 * last))] for p in _PERCENTILES}


class _Load:
    def __init__(self, url: str, mode: str, model: str, headers: dict[str, str]) -> None:
        self.url = url.rstrip("/")
        self.mode = mode
        self.headers = headers
        self.chat = json.dumps({"model": model, "messages": _MESSAGES, "max_tokens": 16}).encode()
        self.submit = json.dumps(
            {"model": model, "input": {"messages": _MESSAGES, "max_tokens": 16}}
        ).encode()
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.sent = 0

    async def one(self, session: aiohttp.ClientSession) -> bool:
        """Send one request (or submit + wait); True when it succeeded."""
        headers = {**self.headers, "Content-Type": "application/json"}
        if self.mode == "chat":
            async with session.post(
                f"{self.url}/v1/chat/completions", data=self.chat, headers=headers
            ) as response:
                await response.read()
                return self._ok(response.status, 200)
        async with session.post(
            f"{self.url}/v1/requests", data=self.submit, headers=headers
        ) as response:
            body = await response.read()
            if not self._ok(response.status, 202):
                return False
        if self.mode == "submit":
            return True
        request_id = json.loads(body)["id"]
        async with session.get(
            f"{self.url}/v1/requests/{request_id}", params={"wait": "30"}, headers=self.headers
        ) as response:
            answer = await response.read()
            if not self._ok(response.status, 200):
                return False
        status = json.loads(answer)["status"]
        if status != "succeeded":
            self.errors[status] = self.errors.get(status, 0) + 1
            return False
        return True

    def _ok(self, status: int, expected: int) -> bool:
        if status == expected:
            return True
        self.errors[str(status)] = self.errors.get(str(status), 0) + 1
        return False

    async def client(
        self, session: aiohttp.ClientSession, measure_from: float, until: float
    ) -> None:
        clock = time.perf_counter
        while True:
            started = clock()
            if started >= until:
                return
            self.sent += 1
            try:
                ok = await self.one(session)
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, KeyError) as exc:
                self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
                ok = False
            if ok and started >= measure_from:
                self.latencies.append((clock() - started) * 1000)


async def run(
    url: str,
    *,
    mode: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    model: str = "llama-3-8b",
    api_key: str | None = None,
) -> dict[str, Any]:
    """Drive ``url`` and return what was measured."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    load = _Load(url, mode, model, headers)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        measure_from = start + warmup_s
        until = measure_from + duration_s
        await asyncio.gather(
            *(load.client(session, measure_from, until) for _ in range(concurrency))
        )
        # The window ends when the last measured request came back.
        elapsed = max(time.perf_counter(), until) - measure_from
    return {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(load.latencies),
        "errors": load.errors,
        "elapsed_s": elapsed,
        "requests_per_s": len(load.latencies) / elapsed,
        "latency_ms": percentiles(load.latencies),
        "sent": load.sent,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run the load, print the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=MODES, default="chat")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("concurrency and duration must be positive, warmup not negative")
    result = uvloop.run(
        run(
            args.url,
            mode=args.mode,
            concurrency=args.concurrency,
            duration_s=args.duration,
            warmup_s=args.warmup,
            model=args.model,
            api_key=args.api_key,
        )
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

"""Measure the memory a `gpurouter serve` process takes per waiting request.

Starts the router on SQLite in a temporary folder with every GPU cordoned, so that nothing
starts, fills its queue up to ``quotas.max_queued_total`` with small chat requests, and reads the
process's resident set size (VmRSS) before and after. Prints one JSON object: the RSS at both
points, the growth per request, the growth scaled to the whole bound, and the answer to one
submission past the bound (503 expected).

    .venv/bin/python scripts/queue_memory.py --requests 10000

Linux only (it reads /proc/<pid>/status).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from gpu_request_router.testing import free_port

_WARM_UP = 200
_CONCURRENCY = 32
_PROMPT = (
    "Summarise the following meeting notes in three bullet points for a project update. "
    "The team agreed to move the release to the second week of the month, to add a test "
    "for the new cache, and to ask the platform group for two more GPUs for the nightly runs."
)


def _body(prompt_chars: int) -> dict[str, Any]:
    """A chat submission whose prompt is ``prompt_chars`` characters (the sample text repeated)."""
    prompt = (_PROMPT * (prompt_chars // len(_PROMPT) + 1))[:prompt_chars]
    return {
        "model": "llama-3-8b",
        "input": {"messages": [{"role": "user", "content": prompt}], "max_tokens": 256},
    }


def _rss_kib(pid: int) -> int:
    """The resident set size of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc status")


async def _fill(url: str, headers: dict[str, str], count: int, body: dict[str, Any]) -> None:
    """Submit ``count`` requests, ``_CONCURRENCY`` at a time; each must be accepted (202)."""
    left = iter(range(count))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:

        async def worker() -> None:
            for _ in left:
                response = await client.post("/v1/requests", json=body)
                if response.status_code != 202:
                    raise RuntimeError(f"submission refused: {response.text}")

        await asyncio.gather(*(worker() for _ in range(_CONCURRENCY)))


def _settled_rss(pid: int) -> int:
    """The RSS once it stops moving (the last submissions' buffers freed), KiB."""
    previous = _rss_kib(pid)
    for _ in range(20):
        time.sleep(0.25)
        current = _rss_kib(pid)
        if current == previous:
            return current
        previous = current
    return previous


def measure(requests: int, prompt_chars: int, workdir: Path) -> dict[str, Any]:
    """Run the router, fill its queue to ``requests`` waiting, and report its memory."""
    body = _body(prompt_chars)
    if requests <= _WARM_UP:
        raise ValueError(f"--requests must be more than {_WARM_UP}")
    key = secrets.token_urlsafe(24)
    port = free_port()
    config = {
        "server": {"port": port},
        "auth": {
            "users": [
                {
                    "name": "ops",
                    "role": "admin",
                    "api_key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                }
            ]
        },
        "state": {"sqlite_path": str(workdir / "router.db")},
        "quotas": {
            "default": {"requests_per_minute": None, "max_queued": None},
            "max_queued_total": requests,
        },
        "logging": {"level": "warning"},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    gpurouter = str(Path(sys.executable).parent / "gpurouter")
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    with (workdir / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [gpurouter, "serve", "--config", str(workdir / "config.yaml")],
            cwd=workdir,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise RuntimeError((workdir / "serve.log").read_text())
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the router did not become ready")
            time.sleep(0.1)
        gpus = httpx.get(f"{url}/v1/gpus", headers=headers).json()["items"]
        for gpu in gpus:
            httpx.post(f"{url}/v1/gpus/{gpu['id']}/cordon", headers=headers).raise_for_status()
        asyncio.run(_fill(url, headers, _WARM_UP, body))
        before = _settled_rss(server.pid)
        asyncio.run(_fill(url, headers, requests - _WARM_UP, body))
        after = _settled_rss(server.pid)
        past = httpx.post(f"{url}/v1/requests", headers=headers, json=body)
        queued = httpx.get(f"{url}/v1/metrics", headers=headers).json()["queue_depth"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    per_request_kib = (after - before) / (requests - _WARM_UP)
    return {
        "prompt_chars": prompt_chars,
        "body_bytes": len(json.dumps(body)),
        "requests_waiting": sum(queued.values()),
        "rss_after_warm_up_mib": round(before / 1024, 1),
        "rss_full_mib": round(after / 1024, 1),
        "per_request_kib": round(per_request_kib, 2),
        "queue_at_bound_mib": round(per_request_kib * requests / 1024, 1),
        "past_the_bound": {
            "status": past.status_code,
            "retry_after": past.headers.get("retry-after"),
        },
    }


def main() -> None:
    """Parse the arguments, measure, print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=10_000, help="the bound, and how many to queue"
    )
    parser.add_argument(
        "--prompt-chars", type=int, default=len(_PROMPT), help="the size of each request's prompt"
    )
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        report = measure(arguments.requests, arguments.prompt_chars, Path(folder))
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

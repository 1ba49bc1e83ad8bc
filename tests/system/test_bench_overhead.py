"""``gpurouter bench overhead`` end to end: real stand-in, router and load generator processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from gpu_request_router.bench.loadgen import percentiles
from gpu_request_router.bench.overhead import _process
from gpu_request_router.bench.provenance import problems
from gpu_request_router.testing import free_port


def _bench(arguments: list[str], **environment: str) -> subprocess.CompletedProcess[str]:
    """Run ``gpurouter`` with ``arguments`` (a wide terminal, ``environment`` added)."""
    return subprocess.run(
        [sys.executable, "-m", "gpu_request_router.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "200", **environment},
        check=False,
    )


def test_percentiles_take_the_nearest_rank() -> None:
    """p50/p90/p99 of 1..101 are 51, 91 and 100; nothing measured gives zeros."""
    assert percentiles([float(n) for n in range(101, 0, -1)]) == {
        "p50": 51.0,
        "p90": 91.0,
        "p99": 100.0,
    }
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_a_short_run_measures_direct_passthrough_router_and_async_api(tmp_path: Path) -> None:
    """Every target answers without errors; the middle's CPU and added latency are reported.

    The middle: the bare pass-through proxy, or the router. The JSON names the command line.
    """
    out = tmp_path / "overhead.json"
    arguments = [
        *("bench", "overhead", "--concurrency", "1,4", "--duration", "0.5", "--warmup", "0.1"),
        *("--state", "sqlite", "--json", str(out)),
    ]
    done = _bench(arguments)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Overhead (state: sqlite)" in done.stdout
    data = json.loads(out.read_text())
    assert problems(data["provenance"]) == []
    assert data["provenance"]["argv"] == ["cli.py", *arguments]
    rows = data["rows"]
    assert [(row["target"], row["concurrency"]) for row in rows] == [
        (target, concurrency)
        for concurrency in (1, 4)
        for target in ("direct", "passthrough", "router", "submit", "submit+wait")
    ]
    for row in rows:
        assert row["errors"] == {}, row
        assert row["requests"] > 0 and row["requests_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["backend_cpu_ms_per_request"] is not None
        if row["target"] == "direct":
            assert row["router_cpu_ms_per_request"] is None
        else:
            assert row["router_cpu_ms_per_request"] > 0
    middle = [row for row in rows if row["target"] in ("passthrough", "router")]
    direct = {row["concurrency"]: row["p50_ms"] for row in rows if row["target"] == "direct"}
    for row in middle:
        assert row["added_p50_ms"] == row["p50_ms"] - direct[row["concurrency"]]


def test_bad_options_are_refused_before_anything_starts() -> None:
    """A peer that is not a URL or an unknown state store: exit 2 naming the option."""
    for arguments, option in (
        (["--peer", "localhost:8000"], "--peer"),
        (["--state", "postgres"], "--state"),
        (["--concurrency", "0"], "--concurrency"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "gpu_request_router.cli", "bench", "overhead", *arguments],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stdout + done.stderr
        assert option in done.stdout + done.stderr


def test_the_passthrough_proxy_forwards_status_type_and_body(tmp_path: Path) -> None:
    """What the stand-in answers, the pass-through answers, failures included."""
    backend_port, proxy_port = free_port(), free_port()
    backend = f"http://127.0.0.1:{backend_port}"
    proxy = f"http://127.0.0.1:{proxy_port}"
    standin = [sys.executable, "-m", "gpu_request_router.bench.openai_standin"]
    passthrough = [sys.executable, "-m", "gpu_request_router.bench.passthrough"]
    with (
        _process([*standin, "--port", str(backend_port)], f"{backend}/health", tmp_path / "s"),
        _process(
            [*passthrough, "--backend", backend, "--port", str(proxy_port)],
            f"{proxy}/health",
            tmp_path / "p",
        ),
    ):
        for body in (
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            {"model": "m", "messages": [], "fail": 503},
        ):
            direct = httpx.post(f"{backend}/v1/chat/completions", json=body, timeout=10)
            proxied = httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=10)
            assert proxied.status_code == direct.status_code
            assert proxied.headers["content-type"] == direct.headers["content-type"]
            # The stand-in numbers its answers and stamps their time: the rest is the same.
            assert _unstamped(proxied.json()) == _unstamped(direct.json())
        assert direct.status_code == 503


def _unstamped(answer: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in answer.items() if key not in ("id", "created")}


def test_one_run_measures_several_stores_side_by_side(tmp_path: Path, redis_url: str) -> None:
    """--state sqlite,redis-shared: a router per store, each target named after its store.

    The shared pair (serve --workers 2) is measured as one target, with the Redis scripts it ran.
    """
    out = tmp_path / "overhead.json"
    arguments = [
        *("bench", "overhead", "--concurrency", "2", "--duration", "0.5", "--warmup", "0.1"),
        *("--state", "sqlite,redis-shared", "--no-async-api", "--json", str(out)),
    ]
    done = _bench(arguments, REDIS_URL=redis_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "router [redis-shared]" in done.stdout
    rows = {row["target"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["direct", "passthrough", "router [sqlite]", "router [redis-shared]"]
    shared = rows["router [redis-shared]"]
    assert shared["errors"] == {} and shared["requests"] > 0
    assert shared["router_cpu_ms_per_request"] > 0
    assert shared["redis_scripts_per_request"] > 0  # the door commits on a shared prefix
    assert rows["router [sqlite]"]["redis_scripts_per_request"] is None

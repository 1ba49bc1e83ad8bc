"""``gpurouter bench overhead`` end to end: real stand-in, router and load generator processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gpu_request_router.bench.loadgen import percentiles


def test_percentiles_take_the_nearest_rank() -> None:
    """p50/p90/p99 of 1..101 are 51, 91 and 100; nothing measured gives zeros."""
    assert percentiles([float(n) for n in range(101, 0, -1)]) == {
        "p50": 51.0,
        "p90": 91.0,
        "p99": 100.0,
    }
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_a_short_run_measures_direct_router_and_async_api(tmp_path: Path) -> None:
    """Every target answers without errors; the router's CPU and added latency are reported."""
    out = tmp_path / "overhead.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpu_request_router.cli",
            "bench",
            "overhead",
            *("--concurrency", "1,4", "--duration", "0.5", "--warmup", "0.1"),
            *("--state", "sqlite", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Overhead (state: sqlite)" in done.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(row["target"], row["concurrency"]) for row in rows] == [
        (target, concurrency)
        for concurrency in (1, 4)
        for target in ("direct", "router", "submit", "submit+wait")
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
    router = [row for row in rows if row["target"] == "router"]
    direct = {row["concurrency"]: row["p50_ms"] for row in rows if row["target"] == "direct"}
    for row in router:
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

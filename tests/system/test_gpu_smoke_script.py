"""scripts/gpu_smoke.sh, run in its dry-run mode on simulated GPUs (the GPU run needs a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gpu_request_router.testing import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_script_places_work_through_a_worker_and_prints_a_summary(tmp_path: Path) -> None:
    """The script starts a worker and a router, places its jobs, and summarises them."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SIMULATE": "2xH100-80GB",
        "OUT": str(tmp_path),
        "ROUTER_PORT": str(free_port()),
        "WORKER_PORT": str(free_port()),
        "JOBS": "3",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_smoke.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "summary.txt").read_text()
    jobs = [json.loads(line) for line in summary.splitlines() if line.startswith('{"id": "req_')]
    assert [job["status"] for job in jobs] == ["succeeded"] * 3
    assert {job["gpu"] for job in jobs} <= {"gpu-host:0", "gpu-host:1"}
    final = json.loads(summary.split("== summary\n", 1)[1].splitlines()[0])
    assert final["succeeded"] == final["of"] == 3
    assert final["gpus"]["count"] == 2

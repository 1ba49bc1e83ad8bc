"""scripts/queue_memory.py, run against a real `gpurouter serve` with a small bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_fills_the_queue_to_its_bound_and_reports_the_memory() -> None:
    """The script queues exactly the bound, reports the RSS, and sees 503 one request past it."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "queue_memory.py"), "--requests", "260"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["requests_waiting"] == 260
    assert report["past_the_bound"]["status"] == 503
    assert int(report["past_the_bound"]["retry_after"]) >= 1
    assert report["rss_full_mib"] > 0 and report["rss_after_warm_up_mib"] > 0
    assert report["body_bytes"] > report["prompt_chars"] > 0

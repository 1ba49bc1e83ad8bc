"""scripts/aof_window.py: Redis's everysec fsyncs traced under a router's load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_script_measures_the_fsync_cadence_and_what_waits_on_it(tmp_path: Path) -> None:
    """Fsyncs about once a second; every acknowledgement covered within about two seconds."""
    out = tmp_path / "aof.json"
    arguments = ["--clients", "4", "--seconds", "4", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "aof_window.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert figures["acknowledged"] > 0
    assert figures["fsyncs"] >= 3
    assert 0.5 < figures["fsync_gap_median_s"] < 1.5
    assert 0 < figures["window_median_s"] <= figures["window_max_s"] < 2.5
    assert 1 <= figures["at_risk_max"] <= figures["acknowledged"]

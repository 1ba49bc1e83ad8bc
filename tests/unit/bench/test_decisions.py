"""``gpurouter bench decisions``: a small run end to end, and the growth fit it reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpu_request_router.bench.decisions import growth_exponent, run_decisions
from gpu_request_router.bench.provenance import problems
from gpu_request_router.cli import app
from gpu_request_router.core.load_balancer import POLICIES


def test_growth_exponent_recovers_the_power_of_a_curve() -> None:
    """Linear, quadratic and constant curves give slopes 1, 2 and 0 on log-log axes."""
    sizes = [10, 100, 1_000, 10_000]
    assert growth_exponent(sizes, [3.0 * n for n in sizes]) == pytest.approx(1.0)
    assert growth_exponent(sizes, [0.5 * n * n for n in sizes]) == pytest.approx(2.0)
    assert growth_exponent(sizes, [7.0 for _ in sizes]) == pytest.approx(0.0)
    assert growth_exponent([10], [1.0]) == 0.0


def test_a_small_run_measures_every_policy_size_and_depth() -> None:
    """Every policy at every fleet size for one- and two-GPU requests; every depth's operations."""
    report = run_decisions((8, 64), (10, 500), budget=500, operations=40)
    measured = {(row.gpus, row.policy, row.gpu_count) for row in report.placement}
    assert measured == {(n, p, c) for n in (8, 64) for p in POLICIES for c in (1, 2)}
    assert all(row.median_us > 0 and row.p90_us >= row.median_us for row in report.placement)
    assert [row.gpus for row in report.admission] == [8, 64]
    assert [row.depth for row in report.queue] == [10, 500]
    assert all(
        min(row.push_us, row.first_candidate_us, row.dispatch_head_us, row.remove_us) > 0
        for row in report.queue
    )
    assert report.log_growth == pytest.approx(math.log(500) / math.log(10))
    assert set(report.indexed_growth) == {"balanced", "best_fit", "least_loaded"}
    assert report.fleet_log_growth == pytest.approx(math.log(64) / math.log(8))


@pytest.mark.parametrize(
    ("arguments", "field"),
    [(["--gpus", "0"], "--gpus"), (["--depths", "x"], "--depths"), (["--gpus", ""], "--gpus")],
)
def test_bad_sizes_are_refused_by_name(arguments: list[str], field: str) -> None:
    """Sizes that are not positive whole numbers stop the command before it measures."""
    result = CliRunner().invoke(app, ["bench", "decisions", *arguments])
    assert result.exit_code == 2
    assert field in result.output


def test_command_prints_the_tables_and_writes_json(tmp_path: Path) -> None:
    """The command prints its three tables and the verdicts, and writes the same as JSON.

    The JSON carries the provenance of the run: its commit, command line, machine and time.
    """
    out = tmp_path / "decisions.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "decisions",
            *("--gpus", "10,1000", "--depths", "10,100"),
            *("--budget", "2000", "--operations", "20", "--json", str(out)),
        ],
    )
    assert result.exit_code == 0, result.output
    for title in ("Placement", "Admission", "Queue operations", "µs over 1,000 GPUs"):
        assert title in result.output
    data = json.loads(out.read_text())
    assert data["benchmark"] == "decisions"
    assert {row["gpus"] for row in data["placement"]} == {10, 1000}
    assert [row["depth"] for row in data["queue"]] == [10, 100]
    assert set(data["growth"]) == {
        "placement_exponent",
        "indexed_growth",
        "fleet_log_growth",
        "queue_growth",
        "log_growth",
    }
    assert set(data["growth"]["indexed_growth"]) == {"balanced", "best_fit", "least_loaded"}
    assert problems(data["provenance"]) == []
    assert data["provenance"]["recorded_after"] is False

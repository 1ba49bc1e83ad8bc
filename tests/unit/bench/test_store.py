"""``gpurouter bench store``: a small run end to end, and what it writes into the stores."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpu_request_router.bench import store as bench_store
from gpu_request_router.bench.provenance import problems
from gpu_request_router.bench.store import run_store
from gpu_request_router.cli import app
from gpu_request_router.models.request import RequestStatus
from gpu_request_router.store import SQLiteStore


def test_a_small_run_measures_every_write_of_every_store() -> None:
    """Each store takes the four writes of every request, alone and batched; all times positive."""
    rows = run_store(("memory", "sqlite"), requests=30)
    assert [row.store for row in rows] == ["memory", "sqlite"]
    for row in rows:
        assert row.requests == 30
        assert min(row.add_us, row.claim_us, row.start_us, row.end_us, row.batched_us) > 0
        assert row.request_wall_us >= row.add_us + row.claim_us + row.start_us + row.end_us


def test_the_requests_end_succeeded_and_charged_in_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writes are the router's: each request succeeded, with four audit entries.

    Twice as many requests as asked are written: each one's changes alone, then as many again
    with the changes of up to ``BATCH`` requests in one commit (12 here: one partial batch). The
    charge kept is the settled one, not the estimate the claim carried.
    """
    monkeypatch.setitem(bench_store.STORES, "kept", lambda _: SQLiteStore(tmp_path / "kept.db"))
    run_store(("kept",), requests=12)
    connection = sqlite3.connect(tmp_path / "kept.db")
    statuses = connection.execute(
        "SELECT status, count(*) FROM requests GROUP BY status"
    ).fetchall()
    ids = connection.execute("SELECT count(DISTINCT id) FROM requests").fetchone()
    trail = connection.execute("SELECT count(*) FROM transitions").fetchone()
    charged = connection.execute("SELECT total(gpu_seconds) FROM charges").fetchone()
    connection.close()
    assert statuses == [(RequestStatus.SUCCEEDED.value, 24)]
    assert ids == (24,)
    assert trail == (24 * 4,)
    assert charged == (pytest.approx(24 * 0.4),)


def test_command_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    """One command: a table on stdout, every row in the JSON, with the run's provenance."""
    out = tmp_path / "store.json"
    result = CliRunner().invoke(
        app,
        ["bench", "store", "--store", "memory", "--requests", "20", "--json", str(out)],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "State store" in result.output
    data = json.loads(out.read_text())
    assert data["benchmark"] == "store"
    assert [row["store"] for row in data["rows"]] == ["memory"]
    assert problems(data["provenance"]) == []
    assert data["provenance"]["recorded_after"] is False


@pytest.mark.parametrize("arguments", [["--store", "postgres"], ["--requests", "0"]])
def test_bad_options_are_refused(arguments: list[str]) -> None:
    """An unknown store or no requests: exit 2 before anything runs."""
    result = CliRunner().invoke(app, ["bench", "store", *arguments])
    assert result.exit_code == 2


def test_no_store_at_all_is_refused_by_name() -> None:
    """Measuring nothing is a mistake: the error lists the stores there are."""
    with pytest.raises(ValueError, match="memory, sqlite, sqlite-full"):
        run_store((), requests=10)

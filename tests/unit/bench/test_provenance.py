"""Provenance of benchmark results: what is captured, what is written, what is well-formed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gpu_request_router.bench.provenance import capture, finished, problems
from gpu_request_router.bench.report import write_json

_PACKAGE = Path(__file__).parents[3] / "src" / "gpu_request_router"


def _git(*arguments: str) -> str:
    return subprocess.run(
        ["git", *arguments], cwd=_PACKAGE, capture_output=True, text=True, check=True
    ).stdout


def _live() -> dict[str, Any]:
    return finished(capture(["/somewhere/bin/gpurouter", "bench", "store"]))


def _reconstructed() -> dict[str, Any]:
    return {
        "commit": "627bfbc" + "0" * 33,
        "dirty": None,
        "changed_files": None,
        "argv": ["gpurouter", "bench", "store"],
        "machine": {
            "cpu_model": None,
            "cpus": 2,
            "memory_bytes": None,
            "python": "3.11.7",
            "os": None,
        },
        "started_at": None,
        "finished_at": None,
        "recorded_after": True,
        "note": "reconstructed from the repository's history",
    }


def test_capture_names_the_commit_and_tree_state_git_reports() -> None:
    """The commit is HEAD of the source's checkout; dirty and the changed files are git's."""
    block = capture()
    changed = sorted(line[3:] for line in _git("status", "--porcelain", "-uno").splitlines())
    assert block["commit"] == _git("rev-parse", "HEAD").strip()
    assert block["changed_files"] == changed
    assert block["dirty"] is bool(changed)
    assert block["recorded_after"] is False


def test_capture_keeps_the_command_line_with_its_program_by_name() -> None:
    """The program's folder is the machine's business; the words after it are kept verbatim."""
    block = capture(["/home/someone/.venv/bin/gpurouter", "bench", "store", "--json", "a b.json"])
    assert block["argv"] == ["gpurouter", "bench", "store", "--json", "a b.json"]


def test_capture_describes_the_machine_without_its_name() -> None:
    """CPU model, cores, memory, Python and OS are recorded; the host name is not."""
    block = capture([])
    assert set(block["machine"]) == {"cpu_model", "cpus", "memory_bytes", "python", "os"}
    assert block["machine"]["cpus"] >= 1 and block["machine"]["memory_bytes"] > 2**20
    assert "hostname" not in json.dumps(block)


def test_a_finished_live_block_is_well_formed() -> None:
    """Captured then finished: no problem, and it ends no earlier than it started."""
    block = _live()
    assert problems(block) == []
    assert block["finished_at"] >= block["started_at"]


def test_a_reconstructed_block_with_a_note_is_well_formed() -> None:
    """A block added from history may leave unknowns null, as long as it says so in a note."""
    assert problems(_reconstructed()) == []
    assert problems({**_reconstructed(), "note": ""}) == [
        "recorded_after without a note saying how the block was made"
    ]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"commit": None}, "commit None is not a 40-digit git commit"),
        ({"commit": "37a0445"}, "commit '37a0445' is not a 40-digit git commit"),
        ({"argv": []}, "argv is not a non-empty list of strings"),
        ({"argv": "gpurouter bench"}, "argv is not a non-empty list of strings"),
        ({"dirty": None}, "dirty is not true or false"),
        ({"changed_files": ["src/x.py"]}, "changed_files does not agree with dirty"),
        ({"recorded_after": "no"}, "recorded_after is not true or false"),
        ({"started_at": "yesterday"}, "started_at 'yesterday' is not an ISO 8601 time"),
        ({"finished_at": "2026-01-01T00:00:00"}, "has no time zone"),
        ({"started_at": "2999-01-01T00:00:00+00:00"}, "finished_at is before started_at"),
        ({"machine": {"cpus": 2}}, "machine does not have cpu_model, cpus, memory_bytes"),
    ],
)
def test_a_malformed_live_block_is_named(change: dict[str, Any], problem: str) -> None:
    """Each defect of a block captured at run time is reported in words."""
    block = {**_live(), "dirty": False, "changed_files": [], **change}
    assert any(problem in found for found in problems(block)), problems(block)


def test_missing_keys_and_a_missing_block_are_named() -> None:
    """A block without a key, or no block at all, is reported rather than accepted."""
    block = _live()
    del block["argv"]
    assert problems(block) == ["no argv"]
    assert problems(None) == ["provenance is missing or not an object"]


def test_write_json_puts_the_finished_provenance_first(tmp_path: Path) -> None:
    """The written file opens with the provenance, stamped with the time it finished."""
    path = tmp_path / "deep" / "result.json"
    started = capture(["gpurouter", "bench", "store"])
    write_json(path, {"benchmark": "store", "rows": [1, 2]}, started)
    document = json.loads(path.read_text())
    assert list(document) == ["provenance", "benchmark", "rows"]
    assert document["provenance"]["started_at"] == started["started_at"]
    assert document["provenance"]["finished_at"] is not None
    assert problems(document["provenance"]) == []

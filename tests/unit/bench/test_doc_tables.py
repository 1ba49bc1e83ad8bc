"""``gpurouter bench tables``: the benchmarks document's tables are its JSON results, rendered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpu_request_router.bench.doc_tables import provenance_problems, regenerate, stale
from gpu_request_router.bench.result_tables import TABLES, TablesError, render
from gpu_request_router.cli import app

ROOT = Path(__file__).parents[3]
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the document and of the results, to change freely."""
    doc = tmp_path / "benchmarks.md"
    shutil.copy(DOC, doc)
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png"))
    return doc, results


def _edit_json(path: Path, change: Any) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


# The repository's own document ------------------------------------------------------------------


def test_the_documents_tables_match_the_committed_json() -> None:
    """Every table of docs/benchmarks.md is exactly what its JSON in benchmarks/results renders."""
    assert stale(DOC.read_text(), RESULTS) == []


def test_every_committed_result_carries_provenance_naming_its_commit() -> None:
    """Each JSON under benchmarks/results has a well-formed provenance block with a commit."""
    files = sorted(RESULTS.glob("*.json"))
    sources = {source for table in TABLES.values() for source in table.sources}
    assert sources <= {path.name for path in files}
    assert provenance_problems(RESULTS) == {}
    for path in files:
        commit = json.loads(path.read_text())["provenance"]["commit"]
        assert len(commit) == 40 and int(commit, 16) >= 0, path.name


# Rendering and rewriting -------------------------------------------------------------------------


def test_a_number_changed_in_the_json_makes_its_table_stale(copies: tuple[Path, Path]) -> None:
    """Only the table whose JSON changed is stale, and regenerating puts the new number in."""
    doc, results = copies

    def slower(document: dict[str, Any]) -> None:
        document["rows"][0]["add_us"] = 12_345.4

    _edit_json(results / "store.json", slower)
    text = doc.read_text()
    assert stale(text, results) == ["store"]
    fresh = regenerate(text, results)
    assert "| `memory` | 12,345 |" in fresh
    assert stale(fresh, results) == []


def test_regenerating_touches_nothing_outside_the_markers(copies: tuple[Path, Path]) -> None:
    """Prose and hand-edited tables stay; the cell typed between markers is replaced."""
    doc, results = copies
    text = doc.read_text()
    rendered = render("decisions-admission", results)
    typed = text.replace(rendered[2], rendered[2].replace("|", "| 9", 1), 1)
    assert typed != text
    assert regenerate(typed, results) == text


def test_the_seed_table_averages_the_seeds_and_marks_the_fewest_oom_events(
    copies: tuple[Path, Path],
) -> None:
    """Mean and range over the seed files; the fewest OOM events in bold; halves rounded up."""
    _, results = copies
    for seed in range(4):

        def oom(document: dict[str, Any], seed: int = seed) -> None:
            for number, metrics in enumerate(document["policies"].values()):
                metrics["oom_events"] = 10 * number + seed
                metrics["p99_queue_wait_s"] = 2.0 + seed / 10
            document["policies"]["random"]["oom_events"] = 50 + (seed == 3)

        _edit_json(results / f"replay_seed{seed}.json", oom)
    lines = render("replay-seeds", results)
    assert lines[2].startswith("| `balanced` | 2.15 (2.00–2.30) |")
    assert lines[2].endswith(" | **1.5** (0–3) |")
    assert lines[3].endswith(" | 11.5 (10–13) |")
    assert lines[7].endswith(" | 50.3 (50–51) |")


def test_replays_that_differ_in_more_than_the_seed_are_not_averaged(
    copies: tuple[Path, Path],
) -> None:
    """A seed file replayed at another load scale makes the seed table refuse to render."""
    _, results = copies

    def faster(document: dict[str, Any]) -> None:
        document["settings"]["load_scale"] = 30.0

    _edit_json(results / "replay_seed2.json", faster)
    with pytest.raises(TablesError, match="differ in more than seed"):
        render("replay-seeds", results)


def test_the_same_seed_twice_is_not_averaged(copies: tuple[Path, Path]) -> None:
    """Two seed files holding the same seed would weigh it twice: the table refuses them."""
    _, results = copies
    shutil.copy(results / "replay_seed1.json", results / "replay_seed3.json")
    with pytest.raises(TablesError, match="two replays have the same seed"):
        render("replay-seeds", results)


def test_the_bound_table_groups_the_replays_by_their_bound(copies: tuple[Path, Path]) -> None:
    """One row per bound and policy, bounds in order, each the mean of its seeds."""
    _, results = copies
    lines = render("replay-bounds", results)
    bounds = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert bounds == [bound for bound in ("2", "5", "10", "1,000") for _ in range(3)]
    policies = [line.split(" | ")[1] for line in lines[2:5]]
    assert policies == ["`balanced`", "`round_robin`", "`random`"]


# Bad documents and results ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("<!-- table:store:end -->", "", 1), "begins inside 'store'"),
        (lambda t: t.replace("<!-- table:store:begin -->", "", 1), "ends where it did not begin"),
        (lambda t: t.replace(":store:", ":stores:"), "no table named 'stores'"),
        (
            lambda t: t.replace("<!-- table:store:begin -->", "", 1).replace(
                "<!-- table:store:end -->", "", 1
            ),
            "no markers for table 'store'",
        ),
        (lambda t: t.rsplit("<!-- table:packing:end -->", 1)[0], "'packing' begins but never"),
    ],
)
def test_broken_markers_are_refused_by_name(
    copies: tuple[Path, Path], edit: Any, message: str
) -> None:
    """Unbalanced, unknown or missing markers stop the rewrite with the table's name."""
    doc, results = copies
    with pytest.raises(TablesError, match=message):
        regenerate(edit(doc.read_text()), results)


def test_a_missing_result_file_is_named(copies: tuple[Path, Path]) -> None:
    """A table whose JSON is gone cannot be rendered, and the error names the file."""
    _, results = copies
    (results / "decisions.json").unlink()
    with pytest.raises(TablesError, match=r"decisions\.json: cannot read it"):
        render("decisions-queue", results)


# The command ------------------------------------------------------------------------------------


def test_check_passes_on_a_matching_document_and_fails_on_a_stale_one(
    copies: tuple[Path, Path],
) -> None:
    """--check exits 0 when every table matches, 1 naming the table once one does not."""
    doc, results = copies
    arguments = ["bench", "tables", "--check", "--doc", str(doc), "--results", str(results)]
    assert CliRunner().invoke(app, arguments).exit_code == 0
    doc.write_text(doc.read_text().replace("| `sqlite` |", "| `sqlite` | 1", 1))
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1
    assert "table 'store' differs from store.json" in result.output


def test_the_command_rewrites_a_stale_document(copies: tuple[Path, Path]) -> None:
    """Without --check the stale table is rewritten from its JSON, and the file matches again."""
    doc, results = copies
    original = doc.read_text()
    doc.write_text(original.replace("| `sqlite` |", "| `sqlite` | 1", 1))
    arguments = ["bench", "tables", "--doc", str(doc), "--results", str(results)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "rewrote store" in result.output
    assert doc.read_text() == original


def test_a_result_without_provenance_fails_the_check_and_the_rewrite(
    copies: tuple[Path, Path],
) -> None:
    """A JSON file that does not name its commit is reported, and nothing is written."""
    doc, results = copies

    def anonymous(document: dict[str, Any]) -> None:
        document["provenance"]["commit"] = None

    _edit_json(results / "store.json", anonymous)
    doc.write_text(doc.read_text().replace("| `sqlite` |", "| `sqlite` | 1", 1))
    before = doc.read_text()
    for extra in (["--check"], []):
        arguments = ["bench", "tables", *extra, "--doc", str(doc), "--results", str(results)]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 1
        assert "store.json: provenance: commit None is not a 40-digit git commit" in result.output
    assert doc.read_text() == before


def test_the_command_refuses_broken_markers_without_writing(copies: tuple[Path, Path]) -> None:
    """Markers that do not pair up: exit 2 with the line and table named, the file untouched."""
    doc, results = copies
    broken = doc.read_text().replace("<!-- table:store:begin -->", "", 1)
    doc.write_text(broken)
    result = CliRunner().invoke(
        app, ["bench", "tables", "--doc", str(doc), "--results", str(results)]
    )
    assert result.exit_code == 2
    assert "table 'store' ends where it did not begin" in result.output
    assert doc.read_text() == broken

"""The result tables of ``docs/benchmarks.md``, kept equal to the JSON in ``benchmarks/results/``.

Each generated table sits between two marker comments in the markdown, and nothing is typed
into it by hand::

    <!-- table:decisions-placement:begin -->
    | policy (1 GPU / 2 GPUs) | 10 GPUs | … |
    <!-- table:decisions-placement:end -->

``gpurouter bench tables`` rewrites what lies between the markers with what
:mod:`gpu_request_router.bench.result_tables` renders; ``--check`` only compares, and fails when
a table differs from its JSON or a result file lacks a well-formed provenance block
(:mod:`gpu_request_router.bench.provenance`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from gpu_request_router.bench.provenance import problems
from gpu_request_router.bench.result_tables import TABLES, TablesError, load, render

__all__ = ["provenance_problems", "regenerate", "stale"]

DOC = Path("docs/benchmarks.md")
RESULTS = Path("benchmarks/results")

_MARKER = re.compile(r"<!-- table:(?P<name>[a-z0-9-]+):(?P<edge>begin|end) -->")


def _blocks(lines: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Each marked table's lines: from the one after its begin marker to its end marker."""
    blocks: dict[str, tuple[int, int]] = {}
    opened: tuple[str, int] | None = None
    for number, line in enumerate(lines):
        match = _MARKER.fullmatch(line.strip())
        if match is None:
            continue
        name, where = match["name"], f"line {number + 1}"
        if match["edge"] == "begin":
            if opened is not None:
                raise TablesError(f"{where}: table {name!r} begins inside {opened[0]!r}")
            if name in blocks:
                raise TablesError(f"{where}: table {name!r} is marked twice")
            opened = (name, number + 1)
        elif opened is None or opened[0] != name:
            raise TablesError(f"{where}: table {name!r} ends where it did not begin")
        else:
            blocks[name], opened = (opened[1], number), None
    if opened is not None:
        raise TablesError(f"table {opened[0]!r} begins but never ends")
    unknown = sorted(set(blocks) - set(TABLES))
    missing = [name for name in TABLES if name not in blocks]
    if unknown:
        raise TablesError(f"no table named {', '.join(map(repr, unknown))}")
    if missing:
        raise TablesError(f"no markers for table {', '.join(map(repr, missing))}")
    return blocks


def regenerate(text: str, results: Path) -> str:
    """``text`` with every marked table rendered anew from ``results``.

    Raises:
        TablesError: the markers are unbalanced, unknown or missing, or a table cannot be made.
    """
    lines = text.split("\n")
    for name, (first, end) in sorted(_blocks(lines).items(), key=lambda item: -item[1][0]):
        lines[first:end] = render(name, results)
    return "\n".join(lines)


def stale(text: str, results: Path) -> list[str]:
    """The tables of ``text`` whose lines differ from what ``results`` renders, in order.

    Raises:
        TablesError: as :func:`regenerate`.
    """
    lines = text.split("\n")
    blocks = sorted(_blocks(lines).items(), key=lambda item: item[1][0])
    return [name for name, (first, end) in blocks if lines[first:end] != render(name, results)]


def provenance_problems(results: Path) -> dict[str, list[str]]:
    """What is wrong with the provenance of each JSON file in ``results``; only files with some.

    Raises:
        TablesError: a file is not a JSON object.
    """
    found = {}
    for path in sorted(results.glob("*.json")):
        wrong = problems(load(results, path.name).get("provenance"))
        if wrong:
            found[path.name] = wrong
    return found


def command(
    doc: Annotated[Path, typer.Option("--doc", help="The markdown holding the tables.")] = DOC,
    results: Annotated[
        Path, typer.Option("--results", help="The folder of result JSON files.")
    ] = RESULTS,
    check: Annotated[
        bool, typer.Option("--check", help="Only compare; exit 1 if a table or a file is off.")
    ] = False,
) -> None:
    """Write the result tables of the benchmarks document from the JSON results.

    Every result file must carry its provenance. With ``--check`` nothing is written: the command
    names each table that differs from its JSON, and each file without a well-formed provenance.
    """
    try:
        text = doc.read_text()
        off = provenance_problems(results)
        changed = stale(text, results)
        fresh = regenerate(text, results)
    except OSError as exc:
        typer.echo(f"tables: {doc}: cannot read it ({exc.strerror})", err=True)
        raise typer.Exit(2) from exc
    except TablesError as exc:
        typer.echo(f"tables: {exc}", err=True)
        raise typer.Exit(2) from exc
    for name, wrong in off.items():
        typer.echo(f"{results / name}: provenance: {'; '.join(wrong)}", err=True)
    if check:
        for name in changed:
            typer.echo(f"{doc}: table {name!r} differs from {', '.join(TABLES[name].sources)}")
        if changed or off:
            raise typer.Exit(1)
        typer.echo(f"{doc}: {len(TABLES)} tables match {results}")
        return
    if off:
        raise typer.Exit(1)
    if not changed:
        typer.echo(f"{doc}: {len(TABLES)} tables already match {results}")
        return
    doc.write_text(fresh)
    typer.echo(f"{doc}: rewrote {', '.join(changed)} from {results}")

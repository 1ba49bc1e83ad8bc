"""Printing result tables."""

from __future__ import annotations

import pytest

from gpu_request_router.bench.report import print_table


def test_cells_print_as_text_not_markup(capsys: pytest.CaptureFixture[str]) -> None:
    """Brackets in a target's name (a store, an IPv6 peer) are printed, not read as markup."""
    print_table(
        "Overhead (state: ['sqlite', 'redis'])", ["target", "p50"], [["router [redis]", "1.00"]]
    )
    out = capsys.readouterr().out
    assert "router [redis]" in out
    assert "['sqlite', 'redis']" in out

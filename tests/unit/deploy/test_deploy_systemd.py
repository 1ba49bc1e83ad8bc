"""The systemd units in deploy/systemd start real ``gpurouter`` commands with real keys.

Each ExecStart is parsed by the ``gpurouter`` typer app itself (its click command): an unknown
verb or option, or a value the option refuses, fails. ``GPUROUTER_*`` variables the units name
must be configuration keys. Where ``systemd-analyze`` is installed, ``systemd-analyze verify``
reads each unit too (unknown keys, bad values), with ExecStart pointed at this venv's
``gpurouter`` (the unit's path, /opt/gpurouter, does not exist here); elsewhere that test skips.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SYSTEMD = Path(__file__).parents[3] / "deploy" / "systemd"
DEPLOYMENT_DOC = Path(__file__).parents[3] / "docs" / "deployment.md"
ParseCommand = Callable[[list[str]], tuple[str, dict[str, Any]]]
UNITS = {"gpurouter.service": "serve", "gpurouter-worker.service": "worker"}


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """``[Section]`` -> key -> values (a key may repeat), comments and blank lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"a key outside any section: {line!r}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize(("unit", "verb"), UNITS.items())
def test_exec_start_is_a_real_command(unit: str, verb: str, parse_command: ParseCommand) -> None:
    """ExecStart runs the venv's gpurouter with a verb and options the CLI accepts."""
    service = unit_sections((SYSTEMD / unit).read_text())["Service"]
    (exec_start,) = service["ExecStart"]
    binary, *argv = shlex.split(exec_start)
    assert binary.endswith("/bin/gpurouter")
    name, params = parse_command(argv)
    assert name == verb
    assert str(params["config"]).startswith("/etc/gpurouter/")


def test_the_worker_listens_where_the_router_can_reach_it(parse_command: ParseCommand) -> None:
    """The worker binds all addresses on its documented port, not the loopback default."""
    service = unit_sections((SYSTEMD / "gpurouter-worker.service").read_text())["Service"]
    _, params = parse_command(shlex.split(service["ExecStart"][0])[1:])
    assert (params["host"], params["port"]) == ("0.0.0.0", 9090)


@pytest.mark.parametrize(
    "argv", [["serve", "--cofnig", "/etc/x.yaml"], ["wroker"], ["worker", "--port", "0"]]
)
def test_a_wrong_command_fails(argv: list[str], parse_command: ParseCommand) -> None:
    """A misspelt option or verb, or a port the CLI refuses, is an error."""
    with pytest.raises(Exception, match=r"No such|greater than or equal"):
        parse_command(argv)


@pytest.mark.parametrize("unit", UNITS)
def test_variables_named_are_configuration_keys(
    unit: str, config_key: Callable[[str], bool]
) -> None:
    """Each GPUROUTER_* the unit mentions (its comments included) is a settings key."""
    names = set(re.findall(r"GPUROUTER_[A-Z0-9_]+", (SYSTEMD / unit).read_text()))
    assert names
    assert [name for name in sorted(names) if not config_key(name)] == []


def test_config_key_refuses_a_wrong_name(config_key: Callable[[str], bool]) -> None:
    """The key check is not vacuous: a misspelt key or a key below a scalar is refused."""
    assert config_key("GPUROUTER_AUTH__WORKER_TOKEN")
    assert not config_key("GPUROUTER_AUTH__WORKERTOKEN")
    assert not config_key("GPUROUTER_SERVER__PORT__X")


def test_the_deployment_doc_points_to_the_units() -> None:
    """docs/deployment.md names both files rather than keeping a copy of their text."""
    doc = DEPLOYMENT_DOC.read_text()
    for unit in UNITS:
        assert f"deploy/systemd/{unit}" in doc
    assert "ExecStart=" not in doc


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_reads_the_unit_without_a_complaint(unit: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds no unknown key or bad value (it warns, exit status 0)."""
    gpurouter = Path(sys.executable).parent / "gpurouter"
    text = (
        (SYSTEMD / unit).read_text().replace("/opt/gpurouter/.venv/bin/gpurouter", str(gpurouter))
    )
    (tmp_path / unit).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")

"""Where a benchmark result came from: the commit, the command line, the machine, the time.

Every benchmark takes :func:`capture` when it starts and hands it to
:func:`gpu_request_router.bench.report.write_json`, which stamps the ``finished_at`` time and
writes the block as the ``provenance`` key of its JSON::

    {
      "commit": "37a0445…",          # git rev-parse HEAD of the source that ran (null outside git)
      "dirty": false,                # tracked files differed from that commit
      "changed_files": [],           # which ones
      "argv": ["gpurouter", "bench", "store", "--json", "…"],   # the program by name only
      "machine": {"cpu_model": "…", "cpus": 2, "memory_bytes": …, "python": "3.11.7", "os": "…"},
      "started_at": "2026-…+00:00", "finished_at": "2026-…+00:00",
      "recorded_after": false
    }

A block added to a result after the fact, from the repository's history, says so with
``"recorded_after": true`` and a ``note``; what could not be recovered is ``null``.
:func:`problems` tells what is wrong with a block, in words.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["capture", "finished", "machine", "problems"]

_COMMIT = re.compile(r"[0-9a-f]{40}")
_GIT_TIMEOUT_S = 10.0
_MACHINE_KEYS = ("cpu_model", "cpus", "memory_bytes", "python", "os")
_KEYS = (
    "commit",
    "dirty",
    "changed_files",
    "argv",
    "machine",
    "started_at",
    "finished_at",
    "recorded_after",
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _git(*arguments: str) -> str | None:
    """The output of one git command in the folder of this package, or None outside git."""
    try:
        done = subprocess.run(
            ["git", *arguments],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo``, else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _memory_bytes() -> int | None:
    """Physical memory of the machine, where the OS tells it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def machine() -> dict[str, Any]:
    """The machine and Python a result is measured on (no host name)."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def capture(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The provenance of a run starting now: commit, tree state, command line, machine, time.

    Args:
        argv: the command line; default ``sys.argv``. Its program is kept by name only.
    """
    words = list(sys.argv if argv is None else argv)
    if words:
        words[0] = Path(words[0]).name
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if head else None
    changed = None if status is None else sorted(line[3:] for line in status.splitlines())
    return {
        "commit": head.strip() if head else None,
        "dirty": None if changed is None else bool(changed),
        "changed_files": changed,
        "argv": words,
        "machine": machine(),
        "started_at": _now(),
        "finished_at": None,
        "recorded_after": False,
    }


def finished(block: Mapping[str, Any]) -> dict[str, Any]:
    """The block of a run that ends now: ``finished_at`` stamped."""
    return {**block, "finished_at": _now()}


def _time(block: Mapping[str, Any], key: str) -> datetime | str:
    """The time under ``key``, or what is wrong with it."""
    value = block[key]
    if not isinstance(value, str):
        return f"{key} is not a time"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return f"{key} {value!r} is not an ISO 8601 time"
    return moment if moment.tzinfo is not None else f"{key} {value!r} has no time zone"


def problems(block: object) -> list[str]:
    """What is wrong with a provenance block, in words; empty when it is well-formed.

    Every block names its 40-digit commit and a non-empty command line. A block captured at run
    time has every field filled; one reconstructed afterwards (``recorded_after``) carries a
    ``note`` and may leave what it could not recover as null.
    """
    if not isinstance(block, Mapping):
        return ["provenance is missing or not an object"]
    found = [f"no {key}" for key in _KEYS if key not in block]
    if found:
        return found
    if not isinstance(block["commit"], str) or not _COMMIT.fullmatch(block["commit"]):
        found.append(f"commit {block['commit']!r} is not a 40-digit git commit")
    argv = block["argv"]
    if not isinstance(argv, list) or not argv or not all(isinstance(word, str) for word in argv):
        found.append("argv is not a non-empty list of strings")
    host = block["machine"]
    if not isinstance(host, Mapping) or any(key not in host for key in _MACHINE_KEYS):
        found.append(f"machine does not have {', '.join(_MACHINE_KEYS)}")
        host = {}
    if block["recorded_after"] is True:
        if not isinstance(block.get("note"), str) or not block["note"]:
            found.append("recorded_after without a note saying how the block was made")
        return found
    if block["recorded_after"] is not False:
        found.append("recorded_after is not true or false")
    if not isinstance(block["dirty"], bool):
        found.append("dirty is not true or false")
    changed = block["changed_files"]
    if not isinstance(changed, list) or bool(changed) != block["dirty"]:
        found.append("changed_files does not agree with dirty")
    found += [
        f"machine.{key} is not a string"
        for key in ("cpu_model", "python", "os")
        if key in host and not isinstance(host[key], str)
    ]
    found += [
        f"machine.{key} is not a positive whole number"
        for key in ("cpus", "memory_bytes")
        if key in host and not (isinstance(host[key], int) and host[key] > 0)
    ]
    started, ended = _time(block, "started_at"), _time(block, "finished_at")
    found += [time for time in (started, ended) if isinstance(time, str)]
    if isinstance(started, datetime) and isinstance(ended, datetime) and ended < started:
        found.append("finished_at is before started_at")
    return found

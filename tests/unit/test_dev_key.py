"""The development admin key: kept beside the SQLite file (0600), reused, refused when unsafe."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpu_request_router.config.config_loader import StateSettings
from gpu_request_router.dev_key import DevKeyUnusable, dev_key_path, development_key
from gpu_request_router.http.keys import hash_key


def _state(tmp_path: Path) -> StateSettings:
    return StateSettings(backend="sqlite", sqlite_path=str(tmp_path / "router.db"))


def test_the_key_is_made_once_kept_0600_and_read_back(tmp_path: Path) -> None:
    """A second call on the same state file gives the first key; the file is the owner's only."""
    old_umask = os.umask(0)  # the file's mode may not depend on a lenient umask
    try:
        first = development_key(_state(tmp_path))
    finally:
        os.umask(old_umask)
    path = tmp_path / "router.db.devkey"
    assert dev_key_path(_state(tmp_path)) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == first + "\n"
    assert development_key(_state(tmp_path)) == first
    other = tmp_path / "other"
    other.mkdir()
    assert development_key(_state(other)) != first, "another state file, another key"


def test_the_memory_backend_keeps_nothing(tmp_path: Path) -> None:
    """Nothing outlives a run on the memory backend, its key included."""
    state = StateSettings(backend="memory", sqlite_path=str(tmp_path / "router.db"))
    assert dev_key_path(state) is None
    assert development_key(state) != development_key(state)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    """A key that group or others could read is no secret: refused, and left as it is."""
    key = development_key(_state(tmp_path))
    path = tmp_path / "router.db.devkey"
    path.chmod(mode)
    with pytest.raises(DevKeyUnusable, match=f"mode {mode:04o}") as refused:
        development_key(_state(tmp_path))
    assert refused.value.path == path
    assert path.read_text() == key + "\n"


@pytest.mark.parametrize("text", ["", "gr_short\n", "not a key at all " * 3, "gr_" + "a" * 44])
def test_a_file_without_a_key_is_refused_not_overwritten(tmp_path: Path, text: str) -> None:
    """A damaged file is reported (delete it to start over) rather than silently replaced."""
    path = tmp_path / "router.db.devkey"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(DevKeyUnusable, match="does not hold a gpurouter key"):
        development_key(_state(tmp_path))
    assert path.read_text() == text


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """The key file is never read or written through a link planted in its place."""
    target = tmp_path / "elsewhere"
    target.write_text("gr_" + "a" * 43 + "\n")
    target.chmod(0o600)
    (tmp_path / "router.db.devkey").symlink_to(target)
    with pytest.raises(DevKeyUnusable, match="cannot be read"):
        development_key(_state(tmp_path))


def test_the_key_is_a_valid_api_key_of_256_bits(tmp_path: Path) -> None:
    """The kept key has the shape of `keys create`'s keys and hashes like any other key."""
    key = development_key(_state(tmp_path))
    assert key.startswith("gr_") and len(key) == 46
    assert len(hash_key(key)) == 64

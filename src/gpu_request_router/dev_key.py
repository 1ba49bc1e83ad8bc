"""The development admin key of ``gpurouter serve`` when no users are configured.

The key stays the same across restarts on one SQLite state file: it is kept in
``<state file>.devkey`` beside it (``gpurouter.db.devkey`` for the embedded default), created
with mode 0600 and read back on the next start. A key file that others may read, that another
user owns, or that does not hold a key is refused rather than used or overwritten. On the
``memory`` backend nothing outlives the run, so neither does its key. A deployment with
``auth.users`` configured never reads or writes such a file (the caller asks only when there are
no users).

Example::

    key = development_key(settings.state)   # after the store's lock is held
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from gpu_request_router.config.config_loader import StateSettings

__all__ = ["DevKeyUnusable", "dev_key_path", "development_key", "new_api_key"]

_KEY = re.compile(r"gr_[A-Za-z0-9_-]{43}")


class DevKeyUnusable(Exception):
    """The development key file exists but cannot be trusted or read; ``path`` names it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(
            f"development key file {path}: {problem}; delete it to make a new key, "
            "or configure auth.users"
        )
        self.path = path


def new_api_key() -> str:
    """A fresh API key (``gr_`` and 43 URL-safe characters, 256 random bits)."""
    return "gr_" + secrets.token_urlsafe(32)


def dev_key_path(state: StateSettings) -> Path | None:
    """Where the development key of ``state`` is kept: beside the SQLite file, else nowhere."""
    if state.backend != "sqlite":
        return None
    database = Path(state.sqlite_path)
    return database.with_name(database.name + ".devkey")


def development_key(state: StateSettings) -> str:
    """The development admin key for ``state``: the kept one, or a new one, kept (0600).

    Call it while holding the state file's lock, so that two starts never race on the file.

    Raises:
        DevKeyUnusable: the file is readable by group or others, owned by another user, not a
            regular file, or does not hold one key.
    """
    path = dev_key_path(state)
    if path is None:
        return new_api_key()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return _make(path)
    except OSError as exc:
        raise DevKeyUnusable(path, f"cannot be read ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "r", encoding="ascii", errors="replace") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DevKeyUnusable(path, "is not a regular file")
        if info.st_uid != os.geteuid():
            raise DevKeyUnusable(path, f"is owned by uid {info.st_uid}, not this user")
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise DevKeyUnusable(path, f"has mode {mode:04o}; only its owner may read it (0600)")
        text = file.read(200).strip()
    if not _KEY.fullmatch(text):
        raise DevKeyUnusable(path, "does not hold a gpurouter key")
    return text


def _make(path: Path) -> str:
    key = new_api_key()
    try:
        # O_EXCL: never write through a file or link that appeared meanwhile; 0600 from the start.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DevKeyUnusable(path, f"cannot be created ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(key + "\n")
        file.flush()
        os.fsync(file.fileno())
    return key

"""One live owner per SQLite file: an exclusive ``flock`` on ``<database>.lock``.

The SQLite store takes the lock before it opens the database (before any read, migration or
recovery) and holds it until it closes. The owner is the process: stores of one process on the
same file share the lock, and it is released when the last of them closes. The operating system
drops it when the process dies, so a ``kill -9`` never leaves a stale lock behind; the lock file
itself stays (deleting it while a router runs would let a second one in).

The lock file holds its holder as one JSON object (``pid``, ``host``, ``started_at``), so that a
process refused the lock can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path

from gpu_request_router.exceptions import StoreInUse, StoreUnavailable

__all__ = ["OwnerLock", "lock_path_of"]

_guard = threading.Lock()
_held: dict[tuple[int, int], OwnerLock] = {}  # (device, inode) of a lock file -> its lock


def lock_path_of(database: Path) -> Path:
    """The lock file of ``database``: the same name with ``.lock`` added, beside it."""
    return database.with_name(database.name + ".lock")


class OwnerLock:
    """This process's exclusive lock on one SQLite file; take it with :meth:`acquire`."""

    def __init__(self, fd: int, key: tuple[int, int]) -> None:
        self._fd = fd
        self._key = key
        self._users = 1

    @classmethod
    def acquire(cls, database: Path) -> OwnerLock:
        """Take (or, within this process, share) the lock of ``database``.

        Raises:
            StoreInUse: another live process holds it.
            StoreUnavailable: the lock file cannot be created or locked.
        """
        lock_path = lock_path_of(database)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreUnavailable(
                f"SQLite state store {database}: cannot open the database's lock file "
                f"{lock_path}: {exc}"
            ) from exc
        with _guard:
            stat = os.fstat(fd)
            key = (stat.st_dev, stat.st_ino)
            shared = _held.get(key)
            if shared is not None:
                os.close(fd)
                shared._users += 1
                return shared
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, holder = _holder(fd)
                os.close(fd)
                raise StoreInUse(
                    f"SQLite state store {database} is in use by another process ({holder}; "
                    f"lock file {lock_path}): stop that process or point state.sqlite_path at "
                    "another file",
                    path=str(database),
                    holder=holder,
                    pid=pid,
                    lock_path=str(lock_path),
                ) from None
            except OSError as exc:
                os.close(fd)
                raise StoreUnavailable(
                    f"SQLite state store {database}: cannot lock {lock_path}: {exc}"
                ) from exc
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            lock = cls(fd, key)
            _held[key] = lock
            return lock

    def release(self) -> None:
        """Give up this store's share; the last one empties the file and drops the lock."""
        with _guard:
            self._users -= 1
            if self._users > 0:
                return
            del _held[self._key]
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # no holder named once there is none
            os.close(self._fd)  # the last descriptor of the lock: the lock goes with it


def _holder(fd: int) -> tuple[int | None, str]:
    """The holder a lock file names: its pid, and a phrase naming it for a message."""
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        pid = int(record["pid"])
    except (OSError, ValueError, TypeError, KeyError):
        return None, "its pid is not written in the lock file yet"
    host = record.get("host")
    since = record.get("started_at")
    return pid, f"pid {pid}" + (f" on {host}" if host else "") + (
        f" since {since}" if since else ""
    )

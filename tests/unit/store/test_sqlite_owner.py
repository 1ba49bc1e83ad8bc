"""One live owner per SQLite file: the lock a store holds, seen from other real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_request_router.exceptions import StoreInUse, StoreUnavailable
from gpu_request_router.store.sqlite import SQLiteStore

SRC = Path(__file__).resolve().parents[3] / "src"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
}

# Opens a store on argv[1] in another process and prints what happened as one JSON line.
OPENER = textwrap.dedent(
    """
    import json, sys
    from gpu_request_router.exceptions import StoreInUse, StoreUnavailable
    from gpu_request_router.store.sqlite import SQLiteStore

    try:
        SQLiteStore(sys.argv[1]).close()
    except StoreInUse as exc:
        print(json.dumps({"refused": exc.message, "pid": exc.pid, "lock": exc.lock_path}))
    except StoreUnavailable as exc:
        print(json.dumps({"unavailable": exc.message}))
    else:
        print(json.dumps({"opened": True}))
    """
)

# Holds a store on argv[1] until killed; says "ready" once it holds it.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from gpu_request_router.store.sqlite import SQLiteStore

    store = SQLiteStore(sys.argv[1])
    print("ready", flush=True)
    time.sleep(600)
    """
)


def open_elsewhere(db: Path) -> dict[str, object]:
    """Try to open ``db`` from another process; what it answered."""
    result = subprocess.run(
        [sys.executable, "-c", OPENER, str(db)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
        check=True,
    )
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` and its bytes."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """The path of a database file that does not exist yet."""
    return tmp_path / "state.db"


@pytest.fixture
def holder(db: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding a store on ``db`` until the test ends (or kills it)."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db)], stdout=subprocess.PIPE, text=True, env=ENV
    ) as process:
        assert process.stdout is not None
        try:
            assert process.stdout.readline() == "ready\n"
            yield process
        finally:
            process.kill()
            process.wait(30)


def test_a_second_process_is_refused_and_changes_nothing(db: Path) -> None:
    """While one store is open, another process is refused, naming the file and our pid."""
    store = SQLiteStore(db)
    try:
        before = files_of(db.parent)
        answer = open_elsewhere(db)
        assert answer["pid"] == os.getpid()
        assert answer["lock"] == f"{db}.lock"
        message = str(answer["refused"])
        assert str(db) in message
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "\n" not in message
        assert files_of(db.parent) == before  # no byte of the database, WAL or lock changed
    finally:
        store.close()


def test_the_lock_file_names_its_holder_while_held(db: Path) -> None:
    """The lock file holds the owner's pid, host and start time, and is empty once closed."""
    store = SQLiteStore(db)
    try:
        record = json.loads((db.parent / "state.db.lock").read_text())
        assert record["pid"] == os.getpid()
        assert record["host"] == socket.gethostname()
        assert record["started_at"].endswith("+00:00")
    finally:
        store.close()
    assert (db.parent / "state.db.lock").read_text() == ""


def test_closing_the_store_releases_the_file(db: Path) -> None:
    """Once the owner closes its store, another process opens the file."""
    SQLiteStore(db).close()
    assert open_elsewhere(db) == {"opened": True}


def test_stores_of_one_process_share_the_lock_until_the_last_closes(db: Path) -> None:
    """Two stores of this process both open; another process is refused until both closed."""
    first = SQLiteStore(db)
    second = SQLiteStore(db)
    first.close()
    assert open_elsewhere(db)["pid"] == os.getpid()
    second.close()
    assert open_elsewhere(db) == {"opened": True}


def test_a_killed_owner_leaves_no_stale_lock(db: Path, holder: subprocess.Popen[str]) -> None:
    """The owner refuses this process while alive; after its kill -9 the file opens here."""
    with pytest.raises(StoreInUse) as refused:
        SQLiteStore(db)
    assert refused.value.pid == holder.pid
    assert f"pid {holder.pid}" in refused.value.message
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    store = SQLiteStore(db)
    try:
        assert json.loads((db.parent / "state.db.lock").read_text())["pid"] == os.getpid()
    finally:
        store.close()


def test_a_holder_that_named_no_pid_is_still_refused(db: Path) -> None:
    """A lock held by a process that wrote no pid (but garbage) refuses: the pid is unknown."""
    lock = db.parent / "state.db.lock"
    lock.write_text("not json")
    grab = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
    grab += "fcntl.flock(fd, fcntl.LOCK_EX); print('ready', flush=True); time.sleep(600)"
    with subprocess.Popen(
        [sys.executable, "-c", grab, str(lock)], stdout=subprocess.PIPE, text=True
    ) as other:
        try:
            assert other.stdout is not None
            assert other.stdout.readline() == "ready\n"
            with pytest.raises(StoreInUse, match="pid is not written") as refused:
                SQLiteStore(db)
            assert refused.value.pid is None
        finally:
            other.kill()
            other.wait(30)
    assert not db.exists()  # refused before the database was created


def test_a_lock_file_that_cannot_be_created_is_unavailable(tmp_path: Path) -> None:
    """A lock path that is a directory cannot be opened: StoreUnavailable, and no database."""
    (tmp_path / "state.db.lock").mkdir()
    with pytest.raises(StoreUnavailable, match="lock file"):
        SQLiteStore(tmp_path / "state.db")
    assert not (tmp_path / "state.db").exists()

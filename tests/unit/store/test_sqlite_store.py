"""What only the SQLite store promises: durability, its pragmas, schema versions, failures.

The behaviour it shares with every store is in ``test_store_contract.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from changes import PLACEMENT, T0, add, created, make_request, moved
from hypothesis import given, settings
from hypothesis import strategies as st

import gpu_request_router.store.sqlite as sqlite_module
from gpu_request_router.core.request_router import transition_of
from gpu_request_router.core.state_store import PRUNE_INTERVAL_S, Change, Charge, OverrideChange
from gpu_request_router.exceptions import StoreUnavailable
from gpu_request_router.models.request import (
    TERMINAL_STATUSES,
    ErrorInfo,
    Placement,
    Request,
    RequestStatus,
)
from gpu_request_router.store import MemoryStore, RequestQuery, StateStore
from gpu_request_router.store.codec import (
    request_fixed_to_json,
    request_state_to_json,
    transition_to_json,
)
from gpu_request_router.store.sqlite import SCHEMA_VERSION, SQLiteStore

S = RequestStatus
SRC = Path(__file__).resolve().parents[3] / "src"


def pragma(store: SQLiteStore, name: str, conn: sqlite3.Connection | None = None) -> Any:
    """A pragma's value as the store's writer (or ``conn``) sees it (some are per connection)."""
    row = (conn or store._conn).execute(f"PRAGMA {name}").fetchone()
    return None if row is None else row[0]


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Query the file through a connection of its own, as another program would."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def schema_names(path: Path, kind: str) -> set[str]:
    """The names of the file's tables, indexes or triggers."""
    return {
        name for (name,) in rows(path, "SELECT name FROM sqlite_master WHERE type = ?", (kind,))
    }


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """The path of a database file that does not exist yet."""
    return tmp_path / "state.db"


@pytest.fixture
def store(db: Path) -> Iterator[SQLiteStore]:
    """A new SQLite store on ``db``."""
    opened = SQLiteStore(db)
    yield opened
    opened.close()


# --- durability across close and reopen ---------------------------------------------------------


def test_everything_written_survives_close_and_reopen(db: Path) -> None:
    """Requests, audit trails, admissions, charges and overrides are read back after a reopen."""
    store = SQLiteStore(db)
    request = make_request("r1", key="k")
    second = make_request("r2", created_at=T0 + 1)
    store.write(
        [
            created(request),
            moved(request, S.DISPATCHING, T0 + 2, charge=Charge("alice", "exe_r1_1", T0 + 2, 12.5)),
        ]
    )
    store.write(
        [
            created(second),
            moved(request, S.QUEUED, T0 + 3, error=ErrorInfo("oom", "out of memory")),
            OverrideChange("alice", {"max_concurrent": 3, "max_queued": None}),
        ]
    )
    store.close()

    again = SQLiteStore(db)
    try:
        stored = again.get_request("r1")
        assert stored is not None
        assert (stored.status, stored.attempts, stored.version) == (S.QUEUED, 1, 2)
        assert stored.error == ErrorInfo("oom", "out of memory")
        assert (stored.queued_at, stored.input) == (T0 + 3, {"prompt": "hello"})
        found = again.find_idempotent("alice", "k")
        assert found is not None
        assert found.id == "r1"
        assert [t.to_status for t in again.transitions("r1")] == [S.QUEUED, S.DISPATCHING, S.QUEUED]
        assert [r.id for r in again.unfinished_requests()] == ["r1", "r2"]
        assert [r.id for r in again.list_requests(RequestQuery()).items] == ["r2", "r1"]
        history = again.quota_history(T0 + 10, 60.0, 3600.0)
        assert sorted(history.admissions) == [("alice", T0, "r1"), ("alice", T0 + 1, "r2")]
        assert history.charges == [Charge("alice", "exe_r1_1", T0 + 2, 12.5)]
        assert again.quota_overrides() == {"alice": {"max_concurrent": 3, "max_queued": None}}
    finally:
        again.close()


# --- pragmas and schema -------------------------------------------------------------------------


@pytest.mark.parametrize(("synchronous", "level"), [("normal", 1), ("full", 2)])
def test_wal_mode_and_the_synchronous_level_are_applied(
    db: Path, synchronous: Any, level: int
) -> None:
    """The writer runs in WAL mode with the chosen fsync level, a busy timeout and FKs.

    The reader waits for locks as long (a checkpoint may hold one briefly).
    """
    store = SQLiteStore(db, synchronous=synchronous)
    try:
        assert pragma(store, "journal_mode") == "wal"
        assert pragma(store, "synchronous") == level
        assert pragma(store, "busy_timeout") == 5000
        assert pragma(store, "foreign_keys") == 1
        assert pragma(store, "user_version") == SCHEMA_VERSION == 4
        assert pragma(store, "busy_timeout", store._reader) == 5000
        assert store._reader is not store._conn
        assert store._conn.isolation_level is None
        assert store._reader.isolation_level is None
    finally:
        store.close()
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]  # WAL is a property of the file


def test_an_unknown_synchronous_level_is_refused(db: Path) -> None:
    """Only normal and full are offered."""
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(db, synchronous="off")  # type: ignore[arg-type]
    assert not db.exists()


_TABLES = {"requests", "transitions", "admissions", "charges", "quota_overrides"}
_INDEXES = {
    "requests_user_created",
    "requests_created",
    "requests_unfinished",
    "requests_idempotency",
}


def assert_current_schema(db: Path) -> None:
    """The file has schema 4's tables and indexes, no counters, no triggers, no leftovers."""
    assert rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = dict(rows(db, "SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert set(tables) == _TABLES
    for name in ("transitions", "admissions", "charges"):
        assert tables[name].endswith("WITHOUT ROWID")
    assert {i for i in schema_names(db, "index") if not i.startswith("sqlite_")} == _INDEXES
    assert schema_names(db, "trigger") == set()
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert rows(db, "PRAGMA foreign_key_check") == []


def test_the_schema_is_created_once_and_reopened(db: Path) -> None:
    """A new file gets schema 4; reopening a current file keeps its data."""
    SQLiteStore(db).close()
    assert_current_schema(db)
    store = SQLiteStore(db)
    add(store, make_request("r1"))
    store.close()
    store = SQLiteStore(db)
    assert store.get_request("r1") is not None
    store.close()
    assert_current_schema(db)


# The tables as schema 2 made them (schema 1: the same without the counters and triggers).
_SCHEMA_2_TABLES = """
    CREATE TABLE requests (id TEXT PRIMARY KEY, user TEXT NOT NULL, status TEXT NOT NULL,
        attempts INTEGER NOT NULL, created_at REAL NOT NULL, model TEXT NOT NULL,
        priority TEXT NOT NULL, idempotency_key TEXT, body TEXT NOT NULL);
    CREATE INDEX requests_user_created ON requests (user, created_at, id);
    CREATE INDEX requests_created ON requests (created_at, id);
    CREATE INDEX requests_status ON requests (status);
    CREATE UNIQUE INDEX requests_idempotency ON requests (user, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE transitions (request_id TEXT NOT NULL REFERENCES requests (id),
        seq INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (request_id, seq));
    CREATE TABLE admissions (user TEXT NOT NULL, at REAL NOT NULL);
    CREATE INDEX admissions_user_at ON admissions (user, at);
    CREATE TABLE charges (user TEXT NOT NULL, charge_id TEXT NOT NULL, at REAL NOT NULL,
        gpu_seconds REAL NOT NULL, PRIMARY KEY (user, charge_id));
    CREATE INDEX charges_user_at ON charges (user, at);
    CREATE TABLE quota_overrides (user TEXT PRIMARY KEY, body TEXT NOT NULL);
"""
_SCHEMA_2_COUNTERS = """
    CREATE TABLE admission_counts (user TEXT PRIMARY KEY, n INTEGER NOT NULL);
    CREATE TABLE charge_totals (user TEXT PRIMARY KEY, gpu_seconds REAL NOT NULL);
    CREATE TRIGGER admissions_counted AFTER INSERT ON admissions BEGIN
        INSERT INTO admission_counts (user, n) VALUES (NEW.user, 1)
            ON CONFLICT (user) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER charges_added AFTER INSERT ON charges BEGIN
        INSERT INTO charge_totals (user, gpu_seconds) VALUES (NEW.user, NEW.gpu_seconds)
            ON CONFLICT (user) DO UPDATE SET gpu_seconds = gpu_seconds + NEW.gpu_seconds;
    END;
"""
_UNFINISHED_SQL = "status IN ({})".format(
    ", ".join(
        f"'{s.value}'" for s in sorted(S, key=lambda s: s.value) if s not in TERMINAL_STATUSES
    )
)
# The tables as schema 3 made them: the request split into body and state, admissions keyed by
# request, WITHOUT ROWID tables, and the counters kept by triggers.
_SCHEMA_3 = f"""
    CREATE TABLE requests (id TEXT PRIMARY KEY, user TEXT NOT NULL, status TEXT NOT NULL,
        attempts INTEGER NOT NULL, created_at REAL NOT NULL, model TEXT NOT NULL,
        priority TEXT NOT NULL, idempotency_key TEXT, body TEXT NOT NULL, state TEXT);
    CREATE INDEX requests_user_created ON requests (user, created_at, id);
    CREATE INDEX requests_created ON requests (created_at, id);
    CREATE INDEX requests_unfinished ON requests (status) WHERE {_UNFINISHED_SQL};
    CREATE UNIQUE INDEX requests_idempotency ON requests (user, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE transitions (request_id TEXT NOT NULL REFERENCES requests (id),
        seq INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (request_id, seq)) WITHOUT ROWID;
    CREATE TABLE admissions (user TEXT NOT NULL, at REAL NOT NULL, request_id TEXT NOT NULL,
        PRIMARY KEY (user, at, request_id)) WITHOUT ROWID;
    CREATE TABLE charges (user TEXT NOT NULL, charge_id TEXT NOT NULL, at REAL NOT NULL,
        gpu_seconds REAL NOT NULL, PRIMARY KEY (user, charge_id)) WITHOUT ROWID;
    CREATE INDEX charges_user_at ON charges (user, at);
    CREATE TABLE admission_counts (user TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE charge_totals (user TEXT PRIMARY KEY, gpu_seconds REAL NOT NULL) WITHOUT ROWID;
    CREATE TRIGGER admissions_counted AFTER INSERT ON admissions BEGIN
        INSERT INTO admission_counts (user, n) VALUES (NEW.user, 1)
            ON CONFLICT (user) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER admissions_uncounted AFTER DELETE ON admissions BEGIN
        UPDATE admission_counts SET n = n - 1 WHERE user = OLD.user;
    END;
    CREATE TRIGGER charges_added AFTER INSERT ON charges BEGIN
        INSERT INTO charge_totals (user, gpu_seconds) VALUES (NEW.user, NEW.gpu_seconds)
            ON CONFLICT (user) DO UPDATE SET gpu_seconds = gpu_seconds + NEW.gpu_seconds;
    END;
    CREATE TRIGGER charges_changed AFTER UPDATE OF gpu_seconds ON charges BEGIN
        UPDATE charge_totals SET gpu_seconds = gpu_seconds - OLD.gpu_seconds + NEW.gpu_seconds
            WHERE user = NEW.user;
    END;
    CREATE TRIGGER charges_removed AFTER DELETE ON charges BEGIN
        UPDATE charge_totals SET gpu_seconds = CASE
            WHEN EXISTS (SELECT 1 FROM charges WHERE user = OLD.user)
            THEN gpu_seconds - OLD.gpu_seconds ELSE 0 END
            WHERE user = OLD.user;
    END;
    CREATE TABLE quota_overrides (user TEXT PRIMARY KEY, body TEXT NOT NULL);
"""
_OLD_CHARGES = [
    ("alice", "c1", 100.0, 30.0),
    ("alice", "c2", 200.0, 12.5),
    ("bob", "c3", 200.0, 4.0),
]


def write_old_file(db: Path, version: int, request: Request) -> None:
    """A file as schema ``version`` (1, 2 or 3) left it, with ``request`` queued.

    In schemas 1 and 2 the body is one object with every field; in 3 the body is the fixed part
    and ``state`` the changing one. alice has admissions (two at one time) and charges; alice
    has an override.
    """
    connection = sqlite3.connect(db)
    if version == 3:
        connection.executescript(_SCHEMA_3)
    else:
        connection.executescript(_SCHEMA_2_TABLES + (_SCHEMA_2_COUNTERS if version == 2 else ""))
    fixed, state = request_fixed_to_json(request), request_state_to_json(request)
    with connection:
        row = (request.id, request.user, request.created_at, request.model, request.priority)
        if version == 3:
            connection.execute(
                "INSERT INTO requests VALUES (?, ?, 'queued', 0, ?, ?, ?, 'k', ?, ?)",
                (*row, fixed, state),
            )
            connection.executemany(
                "INSERT INTO admissions VALUES ('alice', ?, ?)",
                [(195.0, "a"), (200.0, "b"), (200.0, request.id)],
            )
        else:
            whole = {**json.loads(fixed), **json.loads(state)}  # the whole record of codec v1
            connection.execute(
                "INSERT INTO requests VALUES (?, ?, 'queued', 0, ?, ?, ?, 'k', ?)",
                (*row, json.dumps(whole)),
            )
            connection.executemany(
                "INSERT INTO admissions VALUES ('alice', ?)", [(195.0,), (200.0,), (200.0,)]
            )
        entry = transition_of(request, None, request.user, request.created_at)
        connection.execute(
            "INSERT INTO transitions VALUES (?, 0, ?)", (request.id, transition_to_json(entry))
        )
        connection.executemany("INSERT INTO charges VALUES (?, ?, ?, ?)", _OLD_CHARGES)
        connection.execute("INSERT INTO quota_overrides VALUES ('alice', '{\"max_queued\":4}')")
    connection.execute(f"PRAGMA user_version = {version}")
    connection.close()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_schema_file_opens_as_schema_4_with_its_data(db: Path, version: int) -> None:
    """A file of schema 1, 2 or 3 keeps its requests, trails, admissions, charges, overrides.

    The counter tables and their triggers are gone, and its requests take changes in the new
    layout.
    """
    old = make_request("r1", created_at=200.0, key="k", prompt=f"written by schema {version}")
    write_old_file(db, version, old)
    if version >= 2:
        assert {"admission_counts", "charge_totals"} <= schema_names(db, "table")
        assert schema_names(db, "trigger")
    store = SQLiteStore(db)
    stored = store.get_request("r1")
    assert stored is not None
    assert (stored.input, stored.status, stored.version) == (old.input, S.QUEUED, 0)
    found = store.find_idempotent("alice", "k")
    assert found is not None
    assert found.id == "r1"
    assert [entry.to_status for entry in store.transitions("r1")] == [S.QUEUED]
    assert [request.id for request in store.unfinished_requests()] == ["r1"]
    history = store.quota_history(250.0, 60.0, 3600.0)
    assert sorted(at for user, at, _ in history.admissions if user == "alice") == [
        195.0,
        200.0,
        200.0,
    ]
    assert len({request_id for _, _, request_id in history.admissions}) == 3
    assert sorted((c.user, c.charge_id, c.at, c.gpu_seconds) for c in history.charges) == (
        _OLD_CHARGES
    )
    assert store.quota_overrides() == {"alice": {"max_queued": 4}}
    store.write([moved(stored, S.DISPATCHING, 260.0, charge=Charge("alice", "c2", 260.0, 2.5))])
    again = store.get_request("r1")
    assert again is not None
    assert (again.status, again.placement, again.input) == (S.DISPATCHING, PLACEMENT, old.input)
    charges = store.quota_history(261.0, 60.0, 3600.0).charges
    assert Charge("alice", "c2", 200.0, 2.5) in charges  # replaced, at its first time
    store.close()
    assert_current_schema(db)


def test_an_older_file_that_cannot_be_migrated_is_unavailable_and_left_as_it_was(
    db: Path,
) -> None:
    """An audit entry of no request (another program's doing) stops the migration, not the data."""
    write_old_file(db, 2, make_request("r1"))
    connection = sqlite3.connect(db)  # foreign keys off, as sqlite3 opens by default
    with connection:
        connection.execute("INSERT INTO transitions VALUES ('gone', 0, '{}')")
    connection.close()
    with pytest.raises(StoreUnavailable, match="migrate schema 2 to 4"):
        SQLiteStore(db)
    assert rows(db, "PRAGMA user_version") == [(2,)]
    assert rows(db, "SELECT count(*) FROM transitions") == [(2,)]
    assert {"admission_counts", "charge_totals"} <= schema_names(db, "table")


def test_a_newer_schema_version_is_refused_and_left_alone(db: Path) -> None:
    """A file written by a newer router is refused with a clear error and not modified."""
    connection = sqlite3.connect(db)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    newer = rf"schema version {SCHEMA_VERSION + 1}, newer than the version {SCHEMA_VERSION}"
    with pytest.raises(StoreUnavailable, match=newer):
        SQLiteStore(db)
    assert rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert rows(db, "SELECT name FROM sqlite_master") == []


def test_a_file_that_is_not_a_database_is_unavailable(db: Path) -> None:
    """Opening something else than an SQLite file raises StoreUnavailable naming the file."""
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match=r"state\.db"):
        SQLiteStore(db)


def test_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    """A path in a directory that does not exist cannot be opened."""
    with pytest.raises(StoreUnavailable, match="open the database"):
        SQLiteStore(tmp_path / "missing" / "state.db")


def test_a_closed_store_is_unavailable(store: SQLiteStore) -> None:
    """After close, every call raises StoreUnavailable; closing again is harmless."""
    add(store, make_request("r1"))
    store.close()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.ping()
    with pytest.raises(StoreUnavailable):
        store.get_request("r1")
    with pytest.raises(StoreUnavailable):
        store.quota_history(T0, 60.0, 3600.0)
    with pytest.raises(StoreUnavailable):
        add(store, make_request("r2"))


# --- the reader connection ----------------------------------------------------------------------


def test_reads_go_on_while_a_commit_runs_on_another_thread(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write held inside its transaction does not block reads, which see the last commit."""
    add(store, make_request("r1", key="k"))
    inside, release = threading.Event(), threading.Event()
    encode = sqlite_module.request_state_to_json

    def slow_encode(request: Request) -> str:
        inside.set()  # the writer is in its transaction, holding the write lock
        assert release.wait(10)
        return encode(request)

    monkeypatch.setattr(sqlite_module, "request_state_to_json", slow_encode)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            store.write([created(make_request("r2", created_at=T0 + 1))])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert inside.wait(10)
        assert store._conn.in_transaction
        read: list[object] = []
        reader = threading.Thread(
            target=lambda: read.extend(
                [
                    store.get_request("r2"),
                    [r.id for r in store.list_requests(RequestQuery()).items],
                    [r.id for r in store.unfinished_requests()],
                    store.quota_history(T0 + 2, 60.0, 3600.0).admissions,
                    store.ping(),
                ]
            )
        )
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "a read waited for the commit"
        assert read == [None, ["r1"], ["r1"], [("alice", T0, "r1")], None]
    finally:
        release.set()
        writer.join(10)
    assert not errors
    assert [r.id for r in store.unfinished_requests()] == ["r1", "r2"]


# --- pruning ------------------------------------------------------------------------------------


def count(db: Path, table: str) -> int:
    """How many rows ``table`` holds, read through a connection of its own."""
    ((n,),) = rows(db, f"SELECT count(*) FROM {table}")
    return int(n)


def test_admissions_and_charges_out_of_their_windows_are_pruned_by_a_later_write(
    db: Path, store: SQLiteStore
) -> None:
    """A write deletes rows older than their windows, at most every PRUNE_INTERVAL_S."""
    old = make_request("old", created_at=T0)
    store.write([created(old), moved(old, S.DISPATCHING, T0, charge=Charge("alice", "c", T0, 5.0))])
    assert (count(db, "admissions"), count(db, "charges")) == (1, 1)
    # Past the rate window but within the interval of the last prune: nothing is deleted.
    later = T0 + PRUNE_INTERVAL_S - 1
    add(store, make_request("r1", created_at=later))
    assert count(db, "admissions") == 2
    # A write past the interval deletes the admission that left its 60 s window, not the charge.
    second = T0 + 61.0
    add(store, make_request("r2", created_at=second))
    assert sorted(r for (r,) in rows(db, "SELECT request_id FROM admissions")) == ["r1", "r2"]
    assert count(db, "charges") == 1
    # An hour on, the charge goes too; requests and their trails are never pruned.
    add(store, make_request("r3", created_at=T0 + 3600.0))
    assert rows(db, "SELECT request_id FROM admissions") == [("r3",)]
    assert count(db, "charges") == 0
    assert count(db, "requests") == 4
    assert count(db, "transitions") == 5


# --- failures leave the data as it was ----------------------------------------------------------


def snapshot(db: Path) -> list[Any]:
    """Every row of every table, to compare before and after a failed write."""
    return [
        rows(db, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("requests", "transitions", "admissions", "charges", "quota_overrides")
    ]


def fill_some(store: SQLiteStore) -> Request:
    """A few rows in every table; the queued request comes back."""
    request = make_request("r1", key="k")
    other = make_request("r0", created_at=T0 - 1)
    store.write(
        [
            created(request),
            created(other),
            moved(other, S.DISPATCHING, T0, charge=Charge("alice", "c1", T0, 5.0)),
            OverrideChange("alice", {"max_queued": 4}),
        ]
    )
    return request


def failed_batches(request: Request) -> list[list[Change]]:
    """One batch of every kind, each of which needs space in the file."""
    big = "x" * 200_000
    claimed = request.snapshot()
    charged = request.snapshot()
    created_and_moved = make_request("new")
    return [
        [created(make_request("big", prompt=big))],
        [moved(claimed, S.DISPATCHING, T0 + 1, placement=Placement("w", ("w:0",), big))],
        [OverrideChange("bob", {"note": big})],
        [moved(charged, S.DISPATCHING, T0 + 1, charge=Charge("alice", big, T0, 1.0))],
        [
            created(created_and_moved),
            moved(created_and_moved, S.CANCELLED, T0 + 1),
            created(make_request("big", user=big)),
        ],
    ]


def test_a_full_database_raises_and_leaves_the_data_as_it_was(db: Path) -> None:
    """With no page left (max_page_count), each batch raises StoreUnavailable, writes nothing."""
    store = SQLiteStore(db)
    try:
        request = fill_some(store)
        before = snapshot(db)
        pages = pragma(store, "page_count")
        assert pragma(store, f"max_page_count = {pages}") == pages
        for batch in failed_batches(request):
            with pytest.raises(StoreUnavailable, match="full"):
                store.write(batch)
            assert not store._conn.in_transaction
            assert snapshot(db) == before
        stored = store.get_request("r1")
        assert stored is not None
        assert stored.status is S.QUEUED
        # Once there is room again, writing works.
        pragma(store, "max_page_count = 1073741823")
        add(store, make_request("r2"))
        assert store.get_request("r2") is not None
    finally:
        store.close()
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


def test_a_read_only_connection_raises_and_leaves_the_data_as_it_was(db: Path) -> None:
    """When the database refuses writes, every batch raises StoreUnavailable; reads still work."""
    store = SQLiteStore(db)
    try:
        request = fill_some(store)
        before = snapshot(db)
        pragma(store, "query_only = ON")
        for batch in failed_batches(request):
            with pytest.raises(StoreUnavailable, match="readonly"):
                store.write(batch)
            assert not store._conn.in_transaction
        assert snapshot(db) == before
        assert store.get_request("r1") is not None
        assert store.quota_history(T0, 60.0, 3600.0).charges == [Charge("alice", "c1", T0, 5.0)]
        store.ping()
    finally:
        store.close()


def test_a_failed_write_makes_the_store_unwritable_until_a_write_succeeds(
    store: SQLiteStore,
) -> None:
    """check_writable reports the last write's failure (a full file) until a later write commits."""
    store.check_writable(T0)  # probes: the file takes writes
    request = fill_some(store)
    pragma(store, f"max_page_count = {pragma(store, 'page_count')}")
    with pytest.raises(StoreUnavailable, match="full"):
        store.write(failed_batches(request)[0])
    with pytest.raises(StoreUnavailable, match="cannot write changes: database or disk is full"):
        store.check_writable(T0 + 0.5)  # no probe within the second: the failure is remembered
    pragma(store, "max_page_count = 1073741823")
    add(store, make_request("r2"))
    store.check_writable(T0 + 0.6)


def test_a_refused_batch_does_not_make_the_store_unwritable(store: SQLiteStore) -> None:
    """A programming error (a duplicate id) is no store failure: check_writable still passes."""
    add(store, make_request("r1"))
    store.check_writable(T0)
    with pytest.raises(sqlite3.IntegrityError):
        store.write([created(make_request("r1", user="bob"))])
    with pytest.raises(ValueError, match="GPU-seconds"):
        store.write([moved(make_request("r1"), S.CANCELLED, T0, charge=Charge("a", "c", T0, -1))])
    store.check_writable(T0 + 0.5)
    stored = store.get_request("r1")
    assert stored is not None
    assert stored.user == "alice"
    assert len(store.transitions("r1")) == 1


def test_check_writable_probes_at_most_once_a_second(store: SQLiteStore) -> None:
    """A database turned read-only is noticed by the next probe, a second after the last one."""
    store.check_writable(T0)
    pragma(store, "query_only = ON")
    store.check_writable(T0 + 0.9)  # the last outcome (the probe at T0) still stands
    with pytest.raises(StoreUnavailable, match="readonly"):
        store.check_writable(T0 + 1.0)
    pragma(store, "query_only = OFF")
    with pytest.raises(StoreUnavailable, match="readonly"):
        store.check_writable(T0 + 1.5)
    store.check_writable(T0 + 2.0)  # the next probe commits
    assert pragma(store, "user_version") == SCHEMA_VERSION  # and changed nothing


def test_a_read_only_file_is_unavailable(tmp_path: Path) -> None:
    """A database file and directory without write permission give StoreUnavailable."""
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "state.db"
    store = SQLiteStore(db)
    add(store, make_request("r1"))
    store.close()
    before = snapshot(db)
    db.chmod(0o444)
    folder.chmod(0o555)
    try:
        try:
            with db.open("r+b"):
                pytest.skip("file permissions are not enforced for this user (root?)")
        except PermissionError:
            pass
        with pytest.raises(StoreUnavailable):  # noqa: PT012 - opening or the first write fails
            opened = SQLiteStore(db)
            try:
                add(opened, make_request("r2"))
            finally:
                opened.close()
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)
    assert snapshot(db) == before


def test_a_locked_database_raises_after_the_busy_timeout(db: Path) -> None:
    """A write lock held elsewhere past the busy timeout gives StoreUnavailable, not a hang."""
    store = SQLiteStore(db)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        add(store, make_request("r1"))
        pragma(store, "busy_timeout = 50")  # instead of 5 s, to keep the test fast
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="locked"):
            add(store, make_request("r2"))
        assert store.get_request("r1") is not None  # WAL: reads go on under a writer
        assert store.get_request("r2") is None
        other.execute("ROLLBACK")
        add(store, make_request("r2"))
        assert store.get_request("r2") is not None
    finally:
        other.close()
        store.close()


def test_a_duplicate_request_id_is_a_programming_error(store: SQLiteStore) -> None:
    """Creating a second request with an existing id raises IntegrityError and writes nothing."""
    add(store, make_request("r1"))
    with pytest.raises(sqlite3.IntegrityError):
        store.write([created(make_request("r2")), created(make_request("r1", user="bob"))])
    stored = store.get_request("r1")
    assert stored is not None
    assert stored.user == "alice"
    assert len(store.transitions("r1")) == 1
    assert store.get_request("r2") is None
    assert store.quota_history(T0, 60.0, 3600.0).admissions == [("alice", T0, "r1")]


# --- crash durability ---------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from gpu_request_router.core.state_store import StateChange
    from gpu_request_router.models.request import (
        Estimate, Request, RequestStatus, Task, Transition,
    )
    from gpu_request_router.store.sqlite import SQLiteStore

    store = SQLiteStore(sys.argv[1], synchronous=sys.argv[2])
    estimate = Estimate(1000, 500, 500, 0, {"a100": 1.0})
    for index in range(1_000_000):
        request = Request(
            id=f"r{index:07d}", user=f"u{index % 7}", model="m", task=Task.CHAT,
            priority="normal", estimate=estimate, created_at=float(index),
            input={"prompt": "x" * 300}, idempotency_key=f"k{index}",
        )
        entry = Transition(request.id, 0, None, RequestStatus.QUEUED, float(index), 0, "u")
        store.write([StateChange(request, entry)])
        print(request.id, flush=True)
    """
)


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_every_acknowledged_request_survives_a_kill(tmp_path: Path, synchronous: str) -> None:
    """A router killed with SIGKILL mid-stream loses no request whose write returned."""
    db = tmp_path / "state.db"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), synchronous],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        assert child.stdout is not None
        assert child.stderr is not None
        try:
            for line in child.stdout:
                lines.append(line)
                if len(lines) >= 150:
                    child.send_signal(signal.SIGKILL)
                    break
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=30)
        # What the child printed before it died is acknowledged too (read through the buffer).
        lines += child.stdout.read().splitlines(keepends=True)
        errors = child.stderr.read()
    acknowledged = [line.strip() for line in lines if line.endswith("\n")]
    assert child.returncode == -signal.SIGKILL, errors
    assert len(acknowledged) >= 150

    store = SQLiteStore(db)
    try:
        for rid in acknowledged:
            stored = store.get_request(rid)
            assert stored is not None, f"{rid} was acknowledged but is lost"
            assert len(store.transitions(rid)) == 1
        stored_ids = [r.id for r in store.unfinished_requests()]
        # Whole transactions or nothing: the acknowledged ones, perhaps the one being written.
        assert stored_ids[: len(acknowledged)] == acknowledged
        assert len(stored_ids) <= len(acknowledged) + 1
        assert rows(db, "SELECT count(*) FROM transitions") == [(len(stored_ids),)]
    finally:
        store.close()
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


# --- the same answers as the in-memory store -----------------------------------------------------

# One step of a random history: create a request (user, key), move the request at an index to a
# status (with a charge of an amount when it dispatches or ends a run), or set a user's override.
_step = st.one_of(
    st.tuples(
        st.just("create"), st.sampled_from(["alice", "bob"]), st.sampled_from([None, "k1", "k2"])
    ),
    st.tuples(
        st.just("move"),
        st.integers(0, 12),
        st.sampled_from([S.DISPATCHING, S.RUNNING, S.QUEUED, S.SUCCEEDED, S.CANCELLED]),
        st.integers(0, 40),
    ),
    st.tuples(st.just("override"), st.sampled_from(["alice", "bob"]), st.integers(0, 2)),
)
_batches = st.lists(st.lists(_step, max_size=6), max_size=8)


def build_batch(
    live: dict[str, Request], steps: list[tuple[Any, ...]], clock: list[float], next_id: list[int]
) -> tuple[list[Change], dict[str, Request]]:
    """The changes of ``steps`` on copies of ``live``; the copies as the batch leaves them."""
    pending = {rid: request.snapshot() for rid, request in live.items()}
    changes: list[Change] = []
    for step in steps:
        clock[0] += 1.0
        now = clock[0]
        if step[0] == "create":
            _, user, key = step
            request = make_request(f"r{next_id[0]:02d}", user=user, created_at=now, key=key)
            next_id[0] += 1
            pending[request.id] = request
            changes.append(created(request))
        elif step[0] == "move":
            _, index, to, amount = step
            ids = sorted(pending)
            if not ids:
                continue
            request = pending[ids[index % len(ids)]]
            if not request.can_transition(to):
                continue
            charge = None
            if to is S.DISPATCHING or request.status is S.RUNNING:
                at = now if to is S.DISPATCHING else request.dispatched_at
                assert at is not None
                charge = Charge(request.user, request.execution_id, at, float(amount))
            changes.append(moved(request, to, now, charge=charge))
        else:
            _, user, value = step
            changes.append(OverrideChange(user, {"max_queued": value} if value else {}))
    return changes, pending


def reads(store: StateStore, ids: list[str], now: float) -> object:
    """Everything a reader can ask of ``store``, in comparable form."""
    pages = []
    cursor: str | None = None
    while True:
        page = store.list_requests(RequestQuery(limit=3, cursor=cursor))
        pages.append([r.id for r in page.items])
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    history = store.quota_history(now, 60.0, 3600.0)
    return (
        [
            None
            if (r := store.get_request(rid)) is None
            else (request_fixed_to_json(r), request_state_to_json(r), r.status, r.version)
            for rid in ids
        ],
        [store.transitions(rid) for rid in ids],
        pages,
        [r.id for r in store.unfinished_requests()],
        [
            None if (r := store.find_idempotent(user, key)) is None else r.id
            for user in ("alice", "bob")
            for key in ("k1", "k2")
        ],
        store.quota_overrides(),
        sorted(history.admissions),
        sorted(history.charges, key=lambda c: (c.user, c.charge_id)),
    )


@settings(max_examples=60, deadline=None)
@given(_batches)
def test_random_batches_read_back_as_from_the_memory_store(
    batches: list[list[tuple[Any, ...]]],
) -> None:
    """Any sequence of batches (some refused) gets equal reads from both stores.

    Both take or refuse each batch alike (a clash of idempotency keys refuses one), and every
    stored request is the caller's request as its last written change left it.
    """
    memory = MemoryStore()
    live: dict[str, Request] = {}
    clock, next_id = [T0], [0]
    with tempfile.TemporaryDirectory() as directory:
        sqlite = SQLiteStore(Path(directory) / "state.db")
        try:
            for steps in batches:
                changes, pending = build_batch(live, steps, clock, next_id)
                outcomes = []
                for store in (memory, sqlite):
                    try:
                        store.write(changes)
                        outcomes.append(True)
                    except (ValueError, sqlite3.IntegrityError):
                        outcomes.append(False)
                assert outcomes[0] == outcomes[1], changes
                if outcomes[0]:
                    live = pending
                ids = sorted(pending)
                answers = reads(memory, ids, clock[0])
                assert answers == reads(sqlite, ids, clock[0])
                for rid in ids:
                    got = memory.get_request(rid)
                    if rid in live:
                        assert got is not None
                        assert request_state_to_json(got) == request_state_to_json(live[rid])
                        assert [t.seq for t in memory.transitions(rid)] == list(
                            range(live[rid].version + 1)
                        )
                    else:
                        assert got is None
        finally:
            sqlite.close()

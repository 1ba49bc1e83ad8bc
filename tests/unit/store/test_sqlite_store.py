"""What only the SQLite store promises: durability, its pragmas, schema versions, races, failures.

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from counters import admit, charge
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gpu_request_router.core.request_router import transition_of
from gpu_request_router.core.state_store import Charge, RateAdmission
from gpu_request_router.exceptions import StoreUnavailable
from gpu_request_router.models.request import (
    ErrorInfo,
    Estimate,
    Placement,
    Request,
    RequestStatus,
    Task,
)
from gpu_request_router.store import MemoryStore, RequestQuery, StateStore
from gpu_request_router.store.codec import (
    request_fixed_to_json,
    request_state_to_json,
    transition_to_json,
)
from gpu_request_router.store.sqlite import SCHEMA_VERSION, SQLiteStore

S = RequestStatus
T0 = 1000.0
SRC = Path(__file__).resolve().parents[3] / "src"
PLACEMENT = Placement("w", ("w:0",))
ESTIMATE = Estimate(
    gpu_memory_mb=1000, weights_mb=500, kv_cache_mb=500, activations_mb=0, duration_s={"a": 1.0}
)
R = TypeVar("R")


def make_request(
    rid: str,
    *,
    user: str = "alice",
    created_at: float = T0,
    key: str | None = None,
    model: str = "m1",
    priority: str = "normal",
    prompt: str = "hello",
) -> Request:
    """A queued request."""
    return Request(
        id=rid,
        user=user,
        model=model,
        task=Task.CHAT,
        priority=priority,
        estimate=ESTIMATE,
        created_at=created_at,
        input={"prompt": prompt},
        idempotency_key=key,
    )


def add(store: StateStore, request: Request) -> Request:
    """Store a new request with its creation entry, as the receiver does."""
    return store.add_request(
        request, transition_of(request, None, request.user, request.created_at)
    )


def move(
    store: StateStore,
    request: Request,
    from_status: RequestStatus,
    attempt: int,
    charge: Charge | None = None,
) -> bool:
    """Write a changed request with its audit entry (and a charge), as the router does."""
    return store.transition(
        request, from_status, attempt, transition_of(request, from_status, "router", T0), charge
    )


def pragma(store: SQLiteStore, name: str) -> Any:
    """A pragma's value as the store's own connection sees it (some are per connection)."""
    row = store._conn.execute(f"PRAGMA {name}").fetchone()
    return None if row is None else row[0]


def rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Query the file through a connection of its own, as another process would."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def in_parallel(*calls: Callable[[], R]) -> list[R]:
    """Run the calls at once on their own threads (released together); their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], R]) -> None:
        barrier.wait()
        try:
            results[index] = call()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


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


def test_everything_but_reservations_survives_close_and_reopen(db: Path) -> None:
    """Requests, audit trail, admissions, charges and overrides are read back after a reopen."""
    store = SQLiteStore(db)
    request = add(store, make_request("r1", key="k"))
    second = make_request("r2", created_at=T0 + 1)
    created = transition_of(second, None, "alice", T0 + 1)
    store.add_request(second, created, RateAdmission(T0, 60.0, 2))
    request.transition(S.DISPATCHING, T0 + 2, placement=PLACEMENT)
    assert move(store, request, S.QUEUED, 0, Charge("alice", "exe_r1_1", T0, 12.5))
    request.transition(S.QUEUED, T0 + 3, error=ErrorInfo("oom", "out of memory"))
    assert move(store, request, S.DISPATCHING, 1)
    store.set_quota_override("alice", {"max_concurrent": 3, "max_queued": None})
    store.reserve("g0", "exe_r1_1", 500, 1000)
    store.close()

    again = SQLiteStore(db)
    try:
        stored = again.get_request("r1")
        assert stored is not None
        assert (stored.status, stored.attempts, stored.version) == (S.QUEUED, 1, 2)
        assert stored.error == ErrorInfo("oom", "out of memory")
        assert stored.queued_at == T0 + 3
        found = again.find_idempotent("alice", "k")
        assert found is not None
        assert found.id == "r1"
        assert [t.to_status for t in again.transitions("r1")] == [S.QUEUED, S.DISPATCHING, S.QUEUED]
        assert [r.id for r in again.unfinished_requests()] == ["r1", "r2"]
        assert [r.id for r in again.list_requests(RequestQuery()).items] == ["r2", "r1"]
        assert again.admissions_in_window("alice", T0 + 1, 60.0) == 1
        assert admit(again, "alice", T0 + 1, 60.0, 1) == pytest.approx(59.0)
        assert again.gpu_seconds_in_window("alice", T0 + 1, 3600.0) == 12.5
        assert again.oldest_charge_in_window("alice", T0 + 1, 3600.0) == T0
        assert again.quota_overrides() == {"alice": {"max_concurrent": 3, "max_queued": None}}
        # Reservations are rebuilt by recovery, not read back.
        assert again.reserved_mb("g0") == 0
    finally:
        again.close()


# --- pragmas and schema -------------------------------------------------------------------------


@pytest.mark.parametrize(("synchronous", "level"), [("normal", 1), ("full", 2)])
def test_wal_mode_and_the_synchronous_level_are_applied(
    db: Path, synchronous: Any, level: int
) -> None:
    """The connection runs in WAL mode with the chosen fsync level, a busy timeout and FKs."""
    store = SQLiteStore(db, synchronous=synchronous)
    try:
        assert pragma(store, "journal_mode") == "wal"
        assert pragma(store, "synchronous") == level
        assert pragma(store, "busy_timeout") == 5000
        assert pragma(store, "foreign_keys") == 1
        assert pragma(store, "user_version") == SCHEMA_VERSION
        assert store._conn.isolation_level is None
    finally:
        store.close()
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]  # WAL is a property of the file


def test_an_unknown_synchronous_level_is_refused(db: Path) -> None:
    """Only normal and full are offered."""
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(db, synchronous="off")  # type: ignore[arg-type]


def test_the_schema_is_created_once_and_reopened(db: Path) -> None:
    """A new file gets every table and index; reopening a current file keeps its data."""
    SQLiteStore(db).close()
    names = {name for (name,) in rows(db, "SELECT name FROM sqlite_master")}
    assert {
        "requests",
        "transitions",
        "admissions",
        "charges",
        "charge_totals",
        "quota_overrides",
    } <= names
    assert {
        "requests_user_created",
        "requests_unfinished",
        "requests_idempotency",
        "charges_user_at",
    } <= names
    store = SQLiteStore(db)
    add(store, make_request("r1"))
    store.close()
    store = SQLiteStore(db)
    assert store.get_request("r1") is not None
    store.close()


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


def write_old_file(db: Path, version: int, request: Request) -> None:
    """A file as schema ``version`` (1 or 2) left it, with ``request`` queued.

    Its body is one object with every field; the user has admissions and charges.
    """
    connection = sqlite3.connect(db)
    connection.executescript(_SCHEMA_2_TABLES + (_SCHEMA_2_COUNTERS if version == 2 else ""))
    whole = {**json.loads(request_fixed_to_json(request))}
    whole.update(json.loads(request_state_to_json(request)))  # the whole record of codec v1
    with connection:
        connection.execute(
            "INSERT INTO requests VALUES (?, ?, 'queued', 0, ?, ?, ?, NULL, ?)",
            (
                request.id,
                request.user,
                request.created_at,
                request.model,
                request.priority,
                json.dumps(whole),
            ),
        )
        created = transition_of(request, None, request.user, request.created_at)
        connection.execute(
            "INSERT INTO transitions VALUES (?, 0, ?)", (request.id, transition_to_json(created))
        )
        connection.executemany(  # two admissions at the same time, one before
            "INSERT INTO admissions VALUES ('alice', ?)", [(195.0,), (200.0,), (200.0,)]
        )
        connection.executemany(
            "INSERT INTO charges VALUES (?, ?, ?, ?)",
            [("alice", "c1", 100.0, 30.0), ("alice", "c2", 200.0, 12.5), ("bob", "c3", 200.0, 4.0)],
        )
    connection.execute(f"PRAGMA user_version = {version}")
    connection.close()


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_schema_file_is_migrated_with_its_data(db: Path, version: int) -> None:
    """A file of schema 1 or 2 keeps its requests, audit trail, admissions and charges.

    Its counters are right, and its requests take status changes in the new layout.
    """
    old = make_request("r1", created_at=200.0, prompt="a prompt written by schema " + str(version))
    write_old_file(db, version, old)
    store = SQLiteStore(db)
    stored = store.get_request("r1")
    assert stored is not None
    assert (stored.input, stored.status, stored.version) == (old.input, S.QUEUED, 0)
    assert [entry.to_status for entry in store.transitions("r1")] == [S.QUEUED]
    assert [request.id for request in store.unfinished_requests()] == ["r1"]
    assert store.admissions_in_window("alice", 250.0, 60.0) == 3
    assert admit(store, "alice", 250.0, 60.0, 4) is None
    assert admit(store, "alice", 250.0, 60.0, 4) == 5.0  # full until 195 + 60
    assert store.admissions_in_window("alice", 256.0, 60.0) == 3  # the one at 195 left
    assert store.gpu_seconds_in_window("alice", 250.0, 3600.0) == 42.5
    assert store.gpu_seconds_in_window("bob", 250.0, 3600.0) == 4.0
    charge(store, "alice", "c2", 200.0, 2.5)  # reconciled down
    assert store.gpu_seconds_in_window("alice", 250.0, 3600.0) == 32.5
    assert store.gpu_seconds_in_window("alice", 3750.0, 3600.0) == 2.5  # c1 left the window
    stored.transition(S.DISPATCHING, 260.0, placement=PLACEMENT)
    assert move(store, stored, S.QUEUED, 0)
    again = store.get_request("r1")
    assert again is not None
    assert (again.status, again.placement, again.input) == (S.DISPATCHING, PLACEMENT, old.input)
    store.close()
    assert rows(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = dict(rows(db, "SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert not {name for name in tables if name.endswith("_old")}
    for name in ("transitions", "admissions", "charges", "admission_counts", "charge_totals"):
        assert tables[name].endswith("WITHOUT ROWID")


def test_an_older_file_that_cannot_be_migrated_is_unavailable_and_left_as_it_was(
    db: Path,
) -> None:
    """An audit entry of no request (another program's doing) stops the migration, not the data."""
    write_old_file(db, 2, make_request("r1"))
    connection = sqlite3.connect(db)  # foreign keys off, as sqlite3 opens by default
    with connection:
        connection.execute("INSERT INTO transitions VALUES ('gone', 0, '{}')")
    connection.close()
    with pytest.raises(StoreUnavailable, match="migrate schema 2 to 3"):
        SQLiteStore(db)
    assert rows(db, "PRAGMA user_version") == [(2,)]
    assert rows(db, "SELECT count(*) FROM transitions") == [(2,)]


def test_the_counters_follow_rows_written_by_any_writer(db: Path) -> None:
    """Triggers keep the per-user counters, even for rows another program inserts or deletes."""
    store = SQLiteStore(db)
    charge(store, "ann", "c1", 100.0, 30.0)
    assert admit(store, "ann", 100.0, 60.0, 2) is None
    connection = sqlite3.connect(db)
    with connection:
        connection.execute(
            "INSERT INTO admissions (user, at, request_id) VALUES ('ann', 101.0, 'r9')"
        )
        connection.execute(
            "INSERT INTO charges (user, charge_id, at, gpu_seconds) VALUES ('ann', 'c2', 101, 2.5)"
        )
        connection.execute("UPDATE charges SET gpu_seconds = 10.0 WHERE charge_id = 'c1'")
    assert store.admissions_in_window("ann", 102.0, 60.0) == 2
    assert admit(store, "ann", 102.0, 60.0, 2) is not None  # full
    assert store.gpu_seconds_in_window("ann", 102.0, 3600.0) == 12.5
    with connection:
        connection.execute("DELETE FROM admissions WHERE user = 'ann'")
        connection.execute("DELETE FROM charges WHERE charge_id = 'c1'")
    connection.close()
    assert store.admissions_in_window("ann", 102.0, 60.0) == 0
    assert admit(store, "ann", 102.0, 60.0, 2) is None
    assert store.gpu_seconds_in_window("ann", 102.0, 3600.0) == 2.5
    store.close()


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
        add(store, make_request("r2"))


def test_ping_answers_on_a_working_store(store: SQLiteStore) -> None:
    """A ping returns quietly while the database can be read."""
    store.ping()


# --- races between connections on one file ------------------------------------------------------


def test_the_idempotency_race_stores_one_request(db: Path) -> None:
    """Two stores adding the same user and key at once store one request and both return it."""
    first, second = SQLiteStore(db), SQLiteStore(db)
    try:
        for round_ in range(15):
            key = f"k{round_}"
            mine = make_request(f"a{round_}", key=key)
            theirs = make_request(f"b{round_}", key=key)
            one, other = in_parallel(lambda: add(first, mine), lambda: add(second, theirs))  # noqa: B023
            assert one.id == other.id
            assert rows(db, "SELECT id FROM requests WHERE idempotency_key = ?", (key,)) == [
                (one.id,)
            ]
            assert rows(
                db,
                "SELECT count(*) FROM transitions WHERE request_id IN (?, ?)",
                (
                    mine.id,
                    theirs.id,
                ),
            ) == [(1,)]
    finally:
        first.close()
        second.close()


def test_the_guarded_transition_race_has_one_winner(db: Path) -> None:
    """Two connections claiming one queued request at once: exactly one write lands."""
    first, second = SQLiteStore(db), SQLiteStore(db)
    try:
        for round_ in range(15):
            rid = f"r{round_}"
            add(first, make_request(rid))
            claim = first.get_request(rid)
            cancel = second.get_request(rid)
            assert claim is not None
            assert cancel is not None
            claim.transition(S.DISPATCHING, T0 + 1, placement=PLACEMENT)
            cancel.transition(S.CANCELLED, T0 + 1)
            won = in_parallel(
                lambda: move(first, claim, S.QUEUED, 0),  # noqa: B023
                lambda: move(second, cancel, S.QUEUED, 0),  # noqa: B023
            )
            assert sorted(won) == [False, True]
            stored = second.get_request(rid)
            assert stored is not None
            assert stored.status is (S.DISPATCHING if won[0] else S.CANCELLED)
            trail = first.transitions(rid)
            assert [t.to_status for t in trail] == [S.QUEUED, stored.status]
    finally:
        first.close()
        second.close()


# --- failures leave the data as it was ----------------------------------------------------------


def snapshot(db: Path) -> list[Any]:
    """Every row of every table, to compare before and after a failed write."""
    return [
        rows(db, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("requests", "transitions", "admissions", "charges", "quota_overrides")
    ]


def fill_some(store: SQLiteStore) -> Request:
    """A few rows in every table; the queued request comes back."""
    request = add(store, make_request("r1", key="k"))
    admit(store, "alice", T0, 60.0, 10)
    charge(store, "alice", "c1", T0, 5.0)
    store.set_quota_override("alice", {"max_queued": 4})
    return request


def failed_writes(store: SQLiteStore, request: Request) -> list[Callable[[], object]]:
    """One write of every kind, each of which needs space in the file."""
    big = "x" * 200_000
    claimed = request.snapshot()
    claimed.transition(S.DISPATCHING, T0 + 1, placement=Placement("w", ("w:0",), big))
    charged = request.snapshot()
    charged.transition(S.DISPATCHING, T0 + 1, placement=PLACEMENT)
    return [
        lambda: add(store, make_request("big", prompt=big)),
        lambda: move(store, claimed, S.QUEUED, 0),
        lambda: store.set_quota_override("bob", {"note": big}),
        lambda: move(store, charged, S.QUEUED, 0, Charge("alice", big, T0, 1.0)),
        lambda: admit(store, big, T0, 60.0, 1),
    ]


def test_a_full_database_raises_and_leaves_the_data_as_it_was(db: Path) -> None:
    """With no page left (max_page_count), each write raises StoreUnavailable and writes nothing."""
    store = SQLiteStore(db)
    try:
        request = fill_some(store)
        before = snapshot(db)
        pages = pragma(store, "page_count")
        assert pragma(store, f"max_page_count = {pages}") == pages
        for write in failed_writes(store, request):
            with pytest.raises(StoreUnavailable, match="full"):
                write()
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
    """When the database refuses writes, every write raises StoreUnavailable; reads still work."""
    store = SQLiteStore(db)
    try:
        request = fill_some(store)
        before = snapshot(db)
        pragma(store, "query_only = ON")
        for write in failed_writes(store, request):
            with pytest.raises(StoreUnavailable, match="readonly"):
                write()
            assert not store._conn.in_transaction
        assert snapshot(db) == before
        assert store.get_request("r1") is not None
        assert store.gpu_seconds_in_window("alice", T0, 3600.0) == 5.0
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
        failed_writes(store, request)[0]()
    with pytest.raises(StoreUnavailable, match="cannot add a request: database or disk is full"):
        store.check_writable(T0 + 0.5)  # no probe within the second: the failure is remembered
    pragma(store, "max_page_count = 1073741823")
    add(store, make_request("r2"))
    store.check_writable(T0 + 0.6)


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
        other.execute("ROLLBACK")
        add(store, make_request("r2"))
        assert store.get_request("r2") is not None
    finally:
        other.close()
        store.close()


def test_a_duplicate_request_id_is_a_programming_error(store: SQLiteStore) -> None:
    """Adding a second request with an existing id raises IntegrityError and writes nothing."""
    add(store, make_request("r1"))
    with pytest.raises(sqlite3.IntegrityError):
        add(store, make_request("r1", user="bob"))
    stored = store.get_request("r1")
    assert stored is not None
    assert stored.user == "alice"
    assert len(store.transitions("r1")) == 1


# --- crash durability ---------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
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
        created = Transition(request.id, 0, None, RequestStatus.QUEUED, float(index), 0, "u")
        store.add_request(request, created)
        print(request.id, flush=True)
    """
)


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_every_acknowledged_request_survives_a_kill(tmp_path: Path, synchronous: str) -> None:
    """A router killed with SIGKILL mid-stream loses no request whose add_request returned."""
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

counter_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("admit"), st.integers(0, 300), st.sampled_from([30, 60]), st.integers(1, 3)
        ),
        st.tuples(
            st.just("admissions"), st.integers(0, 300), st.sampled_from([30, 60]), st.just(0)
        ),
        st.tuples(
            st.just("charge"),
            st.integers(0, 300),
            st.sampled_from(["c1", "c2", "c3"]),
            st.integers(0, 50),
        ),
        st.tuples(st.just("usage"), st.integers(0, 300), st.sampled_from([30, 60]), st.just(0)),
        st.tuples(st.just("oldest"), st.integers(0, 300), st.sampled_from([30, 60]), st.just(0)),
    ),
    max_size=30,
)


def apply_counter_op(store: StateStore, op: tuple[str, int, Any, int]) -> object:
    """Run one quota-counter operation; its answer."""
    name, now, arg, value = op
    if name == "admit":
        return admit(store, "u", float(now), float(arg), value)
    if name == "admissions":
        return store.admissions_in_window("u", float(now), float(arg))
    if name == "charge":
        return charge(store, "u", arg, float(now), float(value))
    if name == "usage":
        return store.gpu_seconds_in_window("u", float(now), float(arg))
    return store.oldest_charge_in_window("u", float(now), float(arg))


@settings(max_examples=75, deadline=None)
@given(counter_ops)
# A refused admission still prunes the window, in both stores, so that a clock that jumps back
# does not count an admission that had left it.
@example([("admit", 1, 30, 1), ("admit", 0, 30, 2), ("admit", 30, 30, 1), ("admit", 0, 30, 1)])
def test_quota_counters_answer_as_the_memory_store_does(
    ops: list[tuple[str, int, Any, int]],
) -> None:
    """Any sequence of admissions, charges and reads, clock jumps included, gets equal answers."""
    memory = MemoryStore()
    with tempfile.TemporaryDirectory() as directory:
        sqlite = SQLiteStore(Path(directory) / "state.db")
        try:
            for op in ops:
                assert apply_counter_op(sqlite, op) == apply_counter_op(memory, op), op
        finally:
            sqlite.close()


request_ops = st.lists(
    st.tuples(
        st.integers(0, 5),  # created_at: many ties
        st.sampled_from(["alice", "bob"]),
        st.sampled_from(["m1", "m2"]),
        st.sampled_from(["high", "normal"]),
        st.sampled_from([None, "k1", "k2"]),
        st.sampled_from([None, S.DISPATCHING, S.CANCELLED]),
    ),
    max_size=25,
)


@settings(max_examples=75, deadline=None)
@given(
    ops=request_ops,
    limit=st.integers(1, 4),
    user=st.sampled_from([None, "alice", "bob"]),
    statuses=st.sampled_from(
        [None, frozenset(), frozenset({S.QUEUED}), frozenset({S.DISPATCHING, S.CANCELLED})]
    ),
)
def test_listings_equal_the_memory_store(
    ops: list[tuple[int, str, str, str, str | None, RequestStatus | None]],
    limit: int,
    user: str | None,
    statuses: frozenset[RequestStatus] | None,
) -> None:
    """Pages, unfinished requests and idempotent lookups are those of the in-memory store."""
    memory = MemoryStore()
    with tempfile.TemporaryDirectory() as directory:
        sqlite = SQLiteStore(Path(directory) / "state.db")
        try:
            for index, (at, owner, model, priority, key, then) in enumerate(ops):
                request = make_request(
                    f"r{index:02d}",
                    user=owner,
                    created_at=float(at),
                    key=key,
                    model=model,
                    priority=priority,
                )
                stored = [add(store, request.snapshot()) for store in (memory, sqlite)]
                assert stored[0].id == stored[1].id
                if then is not None and stored[0].status is S.QUEUED:
                    changed = stored[0]
                    changed.transition(
                        then, T0, placement=PLACEMENT if then is S.DISPATCHING else None
                    )
                    assert move(memory, changed, S.QUEUED, 0) == move(sqlite, changed, S.QUEUED, 0)
            cursor: str | None = None
            while True:
                query = RequestQuery(user=user, statuses=statuses, limit=limit, cursor=cursor)
                pages = [store.list_requests(query) for store in (memory, sqlite)]
                assert [r.id for r in pages[0].items] == [r.id for r in pages[1].items]
                assert [r.status for r in pages[0].items] == [r.status for r in pages[1].items]
                assert pages[0].next_cursor == pages[1].next_cursor
                cursor = pages[0].next_cursor
                if cursor is None:
                    break
            assert [r.id for r in memory.unfinished_requests()] == [
                r.id for r in sqlite.unfinished_requests()
            ]
            for owner in ("alice", "bob"):
                for key in ("k1", "k2"):
                    found = [store.find_idempotent(owner, key) for store in (memory, sqlite)]
                    assert [f and f.id for f in found] == [found[0] and found[0].id] * 2
        finally:
            sqlite.close()

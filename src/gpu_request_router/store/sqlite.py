"""A durable :class:`StateStore` in one SQLite file (the stdlib ``sqlite3`` module).

Durability promise
    Every change handed to :meth:`SQLiteStore.write` is on disk when it returns: the whole batch
    (requests, audit entries, charges, admissions, overrides) in one transaction. The file is in
    WAL mode; with
    ``synchronous="normal"`` (the default) a commit survives a crash of the router process (the
    WAL is in the operating system's hands), but the last commits may be lost if the host loses
    power; ``synchronous="full"`` syncs the WAL on every commit and survives a power loss too,
    at the price of one fsync per write. Either way the database is never corrupted: a crash
    loses whole transactions or nothing.

One owner
    A store takes an exclusive ``flock`` on ``<path>.lock`` before it opens the database and
    holds it until :meth:`SQLiteStore.close` (the operating system drops it if the process
    dies). A store of another process on the same file is refused with
    :class:`~gpu_request_router.exceptions.StoreInUse`, naming the holder's pid, before it has
    read or written anything: two routers on one file would each recover and run the other's
    work. Stores of one process share the lock (the owner is the process).

Pitfalls avoided
    - Every write runs in ``BEGIN IMMEDIATE ... COMMIT``: the write lock is taken up front, so
      a connection never reads and then fails to upgrade to a write (``SQLITE_BUSY`` in the
      middle of a deferred transaction). On any error the transaction is rolled back, so nothing
      is half-written.
    - Writes and reads use two connections, each behind its own lock: the router commits on a
      writer thread while the event loop reads, and a read never waits for a commit's sync
      (WAL lets readers and the writer run together; a read sees what was committed before it).
    - Both are in autocommit mode (``isolation_level=None``): the ``sqlite3`` module opens no
      implicit transactions; reads run without one (each statement sees a consistent snapshot).
    - No transaction is ever held across an ``await``: every method is synchronous and opens
      and closes its transaction before it returns.
    - ``busy_timeout`` (5 s) makes a writer wait for another process's write lock instead of
      failing at once; past it the store raises ``StoreUnavailable``.
    - Every ``sqlite3.Error`` (locked, disk I/O error, disk full, read-only file, closed store)
      becomes :class:`~gpu_request_router.exceptions.StoreUnavailable`; an ``IntegrityError``
      (a bug: the same request id added twice) propagates.

Readiness
    :meth:`SQLiteStore.check_writable` answers whether writes work from the outcome of the last
    write transaction, and writes a probe (the schema version it already has) at most every
    :data:`WRITE_PROBE_INTERVAL_S`, so a full disk and its recovery are seen without traffic.

GPU memory reservations are *not* in the file: they are derived state (the memory of the
dispatching and running requests of this router's GPUs), kept by the core in memory and rebuilt at
recovery from the placements of the requests in flight.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`; a newer file is refused)::

    requests(id TEXT PRIMARY KEY, user, status, attempts, created_at, model, priority,
             idempotency_key, body, state)   -- body: the codec's fixed part, written once;
                                              -- state: its changing part (NULL in rows of
                                              -- schema 2, whose body holds every field)
        requests_user_created (user, created_at, id)
        requests_created      (created_at, id)  -- newest-first listing without a user filter
        requests_unfinished   (status) WHERE status is not terminal  -- recovery; stays small
        requests_idempotency  UNIQUE (user, idempotency_key) WHERE idempotency_key IS NOT NULL
    transitions(request_id REFERENCES requests, seq, body, PRIMARY KEY (request_id, seq))
    admissions(user, at, request_id, PRIMARY KEY (user, at, request_id))
    charges(user, charge_id, at, gpu_seconds, PRIMARY KEY (user, charge_id))
    quota_overrides(user PRIMARY KEY, body)     -- body: JSON object

Admissions and charges are written with the requests and status changes they belong to; the
core counts them in memory and reads them back only at a restart
(:meth:`SQLiteStore.quota_history`). Rows that have left their window are deleted by a write at
most every :data:`PRUNE_INTERVAL_S`, and so are finished requests created longer ago than
``retention_s`` (with their audit trails), when it is set.

Only ``status``, ``attempts`` and ``state`` change after a request is added; its id, user,
creation time, model, priority, idempotency key and ``body`` are fixed at creation. Every table
but ``requests`` and ``quota_overrides`` is ``WITHOUT ROWID`` (its rows live in its primary key),
so that a write touches one b-tree fewer per table (a rowid table keeps its primary key in a
second one): each page a transaction changes is written whole to the WAL, and those writes are
most of a commit's cost.

Schema history: 1 had no counter tables; 2 added them; 3 split the request into body and state,
keyed the admissions by request, and made the tables ``WITHOUT ROWID``; 4 dropped the counter
tables and their triggers (the core counts in memory). Opening an older file migrates it in one
transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from gpu_request_router.core.quota import HOUR_S, MINUTE_S
from gpu_request_router.core.state_store import (
    PRUNE_INTERVAL_S,
    RETENTION_BATCH,
    WRITE_PROBE_INTERVAL_S,
    Change,
    Charge,
    OverrideChange,
    Page,
    QuotaHistory,
    Refusal,
    RequestQuery,
    StateStore,
    batch_time,
    check_charge,
    check_retention,
    decode_cursor,
    encode_cursor,
)
from gpu_request_router.exceptions import StoreUnavailable
from gpu_request_router.models.request import TERMINAL_STATUSES, Request, RequestStatus, Transition
from gpu_request_router.store._owner import OwnerLock
from gpu_request_router.store.codec import (
    request_fixed_to_json,
    request_from_json,
    request_state_to_json,
    transition_from_json,
    transition_to_json,
)
from gpu_request_router.utils.every import Every

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION = 4
"""The schema this code writes and reads (``PRAGMA user_version``; see the module docstring)."""

BUSY_TIMEOUT_MS = 5000
"""How long a write waits for another connection's write lock before giving up."""


_UNFINISHED = tuple(sorted(s.value for s in RequestStatus if s not in TERMINAL_STATUSES))
_UNFINISHED_SQL = "status IN ({})".format(", ".join(f"'{status}'" for status in _UNFINISHED))

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS requests (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        created_at REAL NOT NULL,
        model TEXT NOT NULL,
        priority TEXT NOT NULL,
        idempotency_key TEXT,
        body TEXT NOT NULL,
        state TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS requests_user_created ON requests (user, created_at, id)",
    "CREATE INDEX IF NOT EXISTS requests_created ON requests (created_at, id)",
    f"CREATE INDEX IF NOT EXISTS requests_unfinished ON requests (status) WHERE {_UNFINISHED_SQL}",
    """CREATE UNIQUE INDEX IF NOT EXISTS requests_idempotency ON requests (user, idempotency_key)
        WHERE idempotency_key IS NOT NULL""",
    """CREATE TABLE IF NOT EXISTS transitions (
        request_id TEXT NOT NULL REFERENCES requests (id),
        seq INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (request_id, seq)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS admissions (
        user TEXT NOT NULL,
        at REAL NOT NULL,
        request_id TEXT NOT NULL,
        PRIMARY KEY (user, at, request_id)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS charges (
        user TEXT NOT NULL,
        charge_id TEXT NOT NULL,
        at REAL NOT NULL,
        gpu_seconds REAL NOT NULL,
        PRIMARY KEY (user, charge_id)
    ) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS quota_overrides (user TEXT PRIMARY KEY, body TEXT NOT NULL)",
)

_INSERT_REQUEST = """
    INSERT INTO requests
        (id, user, status, attempts, created_at, model, priority, idempotency_key, body, state)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_UPDATE_REQUEST = "UPDATE requests SET status = ?, attempts = ?, state = ? WHERE id = ?"
_INSERT_ADMISSION = "INSERT INTO admissions (user, at, request_id) VALUES (?, ?, ?)"
_INSERT_TRANSITION = "INSERT INTO transitions (request_id, seq, body) VALUES (?, ?, ?)"
_UPSERT_CHARGE = """
    INSERT INTO charges (user, charge_id, at, gpu_seconds) VALUES (?, ?, ?, ?)
    ON CONFLICT (user, charge_id) DO UPDATE SET gpu_seconds = excluded.gpu_seconds
"""


_COUNTERS = ("admission_counts", "charge_totals")
_COUNTER_TRIGGERS = (
    "admissions_counted",
    "admissions_uncounted",
    "charges_added",
    "charges_changed",
    "charges_removed",
)


def _drop_counters(conn: sqlite3.Connection) -> None:
    """Drop the counter tables of schemas 2 and 3 and what kept them."""
    for trigger in _COUNTER_TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    conn.execute("DROP INDEX IF EXISTS charges_user_at")
    for table in _COUNTERS:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring a schema 1, 2 or 3 file to the current schema, in the open transaction."""
    _drop_counters(conn)
    if version < 3:
        _migrate_to_3(conn)


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    """Bring a schema 1 or 2 file (its counters dropped) to schema 3's tables.

    The old tables are renamed, the new ones created and filled from them, the old ones
    dropped. Old admissions are keyed by their old row id (they were not keyed by request).
    """
    for index in ("requests_status", "admissions_user_at"):
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    conn.execute("ALTER TABLE requests ADD COLUMN state TEXT")
    for table in ("transitions", "admissions", "charges"):
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO transitions (request_id, seq, body)"
        " SELECT request_id, seq, body FROM transitions_old"
    )
    conn.execute(
        "INSERT INTO admissions (user, at, request_id)"
        " SELECT user, at, 'schema-2:' || rowid FROM admissions_old"
    )
    conn.execute(
        "INSERT INTO charges (user, charge_id, at, gpu_seconds)"
        " SELECT user, charge_id, at, gpu_seconds FROM charges_old"
    )
    for table in ("transitions", "admissions", "charges"):
        conn.execute(f"DROP TABLE {table}_old")


class SQLiteStore(StateStore):
    """Requests, audit trail, quota counters and overrides in one SQLite file.

    Args:
        path: the database file (created with its schema when missing).
        synchronous: ``"normal"`` survives a crash of the process, ``"full"`` also a power loss.
        retention_s: finished requests created longer ago than this are deleted, with their
            audit trail (and so their idempotency key), by the writes; ``None`` keeps them.

    Raises:
        StoreInUse: another live process owns the file (see the module docstring).
        StoreUnavailable: the file cannot be opened, is not a database, cannot be put in WAL
            mode, or has a schema newer than this code.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["normal", "full"] = "normal",
        retention_s: float | None = None,
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        check_retention(retention_s)
        self.path = Path(path)
        self.synchronous = synchronous
        self.retention_s = retention_s
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._closed = False
        # Why the last write failed (None once one succeeds), and when a probe last wrote.
        self._write_failure: str | None = None
        self._probes = Every(WRITE_PROBE_INTERVAL_S)
        self._prunes = Every(PRUNE_INTERVAL_S)
        self._owner = OwnerLock.acquire(self.path)  # before the file is read at all
        conns: list[sqlite3.Connection] = []
        try:
            conns.extend(
                sqlite3.connect(
                    self.path,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=BUSY_TIMEOUT_MS / 1000,
                )
                for _ in range(2)
            )
            self._conn, self._reader = conns
            self._open()
        except BaseException as exc:
            for conn in conns:
                conn.close()
            self._owner.release()
            if isinstance(exc, sqlite3.Error):
                raise self._unavailable("open the database", exc) from exc
            raise

    def _open(self) -> None:
        conn = self._conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._check_version()
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise StoreUnavailable(
                    f"SQLite state store {self.path}: cannot use WAL mode (journal_mode is {mode})"
                )
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            raise self._unavailable("open the database", exc) from exc
        with self._write("create the schema") as conn:
            version = self._check_version()
            fresh = not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests'"
            ).fetchone()
            if not fresh and version < SCHEMA_VERSION:
                try:
                    _migrate(conn, version)
                except sqlite3.IntegrityError as exc:  # rows another program left inconsistent
                    raise self._unavailable(
                        f"migrate schema {version} to {SCHEMA_VERSION}", exc
                    ) from exc
            else:
                for statement in _SCHEMA:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_version(self) -> int:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"SQLite state store {self.path}: the database has schema version {version}, "
                f"newer than the version {SCHEMA_VERSION} this router knows; upgrade the router "
                "or point state.sqlite_path at another file"
            )
        return int(version)

    # Transactions and errors ------------------------------------------------------------------

    def _unavailable(self, action: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite state store {self.path}: cannot {action}: {exc}")

    def _write_failed(self, action: str, exc: sqlite3.Error) -> StoreUnavailable:
        error = self._unavailable(action, exc)
        self._write_failure = error.message
        return error

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE ... COMMIT`` transaction, rolled back on any error.

        Its outcome is remembered for :meth:`check_writable`: a store error makes it the last
        write failure, a commit clears that.
        """
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._write_failed(action, exc) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                    raise self._write_failed(action, exc) from exc
                raise
            self._write_failure = None

    def _rollback(self) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            # SQLite rolls back by itself on the errors that make ROLLBACK fail (I/O, full).
            pass

    def _read(self, action: str, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Run one query outside any explicit transaction (its own consistent snapshot)."""
        with self._read_lock:
            if self._closed:
                raise StoreUnavailable(f"SQLite state store {self.path}: closed")
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._unavailable(action, exc) from exc

    # Requests ------------------------------------------------------------------------------

    def write(self, changes: Sequence[Change]) -> list[Refusal]:
        """Persist ``changes`` in one transaction (see the module docstring); refuse nothing."""
        last: dict[str, Request] = {}
        created: dict[str, Request] = {}
        entries: list[tuple[str, int, str]] = []
        charges: list[tuple[str, str, float, float]] = []
        admissions: list[tuple[str, float, str]] = []
        overrides: list[OverrideChange] = []
        for change in changes:
            if isinstance(change, OverrideChange):
                overrides.append(change)
                continue
            request, entry = change.request, change.entry
            last[request.id] = request
            if change.created:
                created[request.id] = request
                admissions.append((request.user, request.created_at, request.id))
            entries.append((entry.request_id, entry.seq, transition_to_json(entry)))
            charge = change.charge
            if charge is not None:
                check_charge(charge.gpu_seconds)
                charges.append((charge.user, charge.charge_id, charge.at, charge.gpu_seconds))
        now = batch_time(changes)
        with self._write("write changes") as conn:
            # Each request's row as the batch leaves it: a new one inserted whole, others updated.
            conn.executemany(
                _INSERT_REQUEST,
                [
                    (
                        request.id,
                        request.user,
                        final.status.value,
                        final.attempts,
                        request.created_at,
                        request.model,
                        request.priority,
                        request.idempotency_key,
                        request_fixed_to_json(request),
                        request_state_to_json(final),
                    )
                    for request_id, request in created.items()
                    for final in (last[request_id],)
                ],
            )
            conn.executemany(
                _UPDATE_REQUEST,
                [
                    (final.status.value, final.attempts, request_state_to_json(final), request_id)
                    for request_id, final in last.items()
                    if request_id not in created
                ],
            )
            conn.executemany(_INSERT_TRANSITION, entries)
            conn.executemany(_INSERT_ADMISSION, admissions)
            conn.executemany(_UPSERT_CHARGE, charges)
            for override in overrides:
                self._set_override(conn, override)
            if now is not None and self._prunes.due(now):
                self._prune(conn, now)
        return []

    @staticmethod
    def _set_override(conn: sqlite3.Connection, override: OverrideChange) -> None:
        if not override.values:
            conn.execute("DELETE FROM quota_overrides WHERE user = ?", (override.user,))
            return
        conn.execute(
            "INSERT INTO quota_overrides (user, body) VALUES (?, ?)"
            " ON CONFLICT (user) DO UPDATE SET body = excluded.body",
            (override.user, json.dumps(override.values, separators=(",", ":"))),
        )

    def _prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Delete what has left its window or its retention (every :data:`PRUNE_INTERVAL_S`).

        Admissions and charges past their windows; finished requests past ``retention_s``, at
        most :data:`RETENTION_BATCH` at a time (a full batch prunes again with the next write).
        """
        conn.execute("DELETE FROM admissions WHERE at <= ?", (now - MINUTE_S,))
        conn.execute("DELETE FROM charges WHERE at <= ?", (now - HOUR_S,))
        if self.retention_s is None:
            return
        old = conn.execute(
            f"SELECT id FROM requests WHERE created_at < ? AND NOT ({_UNFINISHED_SQL})"
            " ORDER BY created_at LIMIT ?",
            (now - self.retention_s, RETENTION_BATCH),
        ).fetchall()
        conn.executemany("DELETE FROM transitions WHERE request_id = ?", old)
        conn.executemany("DELETE FROM requests WHERE id = ?", old)
        if len(old) == RETENTION_BATCH:
            self._prunes.again()

    def get_request(self, request_id: str) -> Request | None:
        """The stored request, or ``None``."""
        rows = self._read(
            "read a request", "SELECT body, state FROM requests WHERE id = ?", (request_id,)
        )
        return request_from_json(*rows[0]) if rows else None

    def find_idempotent(self, user: str, key: str) -> Request | None:
        """The request ``user`` submitted with idempotency key ``key``, or ``None``."""
        rows = self._read(
            "read a request",
            "SELECT body, state FROM requests WHERE user = ? AND idempotency_key = ?",
            (user, key),
        )
        return request_from_json(*rows[0]) if rows else None

    def transitions(self, request_id: str, after: int = -1) -> list[Transition]:
        """The request's audit trail, oldest first, after entry ``after``."""
        rows = self._read(
            "read an audit trail",
            "SELECT body FROM transitions WHERE request_id = ? AND seq > ? ORDER BY seq",
            (request_id, after),
        )
        return [transition_from_json(body) for (body,) in rows]

    def list_requests(self, query: RequestQuery) -> Page:
        """Requests matching ``query``, newest first, one page at a time."""
        after = decode_cursor(query.cursor) if query.cursor else None
        clauses: list[str] = []
        params: list[Any] = []
        if query.user is not None:
            clauses.append("user = ?")
            params.append(query.user)
        if query.statuses is not None:
            if not query.statuses:
                return Page(items=[], next_cursor=None)
            clauses.append(f"status IN ({', '.join('?' * len(query.statuses))})")
            params.extend(sorted(status.value for status in query.statuses))
        if query.model is not None:
            clauses.append("model = ?")
            params.append(query.model)
        if query.priority is not None:
            clauses.append("priority = ?")
            params.append(query.priority)
        if after is not None:
            clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend((after[0], after[0], after[1]))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(
            "list requests",
            f"SELECT body, state FROM requests{where} ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, query.limit + 1),
        )
        items = [request_from_json(body, state) for body, state in rows[: query.limit]]
        more = len(rows) > query.limit
        return Page(items=items, next_cursor=encode_cursor(items[-1]) if more else None)

    def unfinished_requests(self) -> list[Request]:
        """Every request not yet in a terminal status, oldest first, ties in creation order."""
        rows = self._read(
            "list unfinished requests",
            f"SELECT body, state FROM requests WHERE {_UNFINISHED_SQL} ORDER BY created_at, rowid",
        )
        return [request_from_json(body, state) for body, state in rows]

    # Quota overrides --------------------------------------------------------------------------

    def quota_overrides(self) -> dict[str, dict[str, Any]]:
        """Per-user quota overrides set at run time (in the order users were first set)."""
        rows = self._read(
            "read quota overrides", "SELECT user, body FROM quota_overrides ORDER BY rowid"
        )
        return {user: json.loads(body) for user, body in rows}

    def quota_history(
        self, now: float, rate_window_s: float, charge_window_s: float
    ) -> QuotaHistory:
        """The admissions and charges still in their windows at ``now``."""
        admissions = self._read(
            "read admissions",
            "SELECT user, at, request_id FROM admissions WHERE at > ?",
            (now - rate_window_s,),
        )
        charges = self._read(
            "read charges",
            "SELECT user, charge_id, at, gpu_seconds FROM charges WHERE at > ?",
            (now - charge_window_s,),
        )
        return QuotaHistory(
            [(user, float(at), request_id) for user, at, request_id in admissions],
            [Charge(user, charge_id, float(at), float(gs)) for user, charge_id, at, gs in charges],
        )

    # Health and lifetime ------------------------------------------------------------------------

    def ping(self) -> None:
        """Return if the database answers a query, else raise ``StoreUnavailable``."""
        self._read("answer a ping", "SELECT count(*) FROM sqlite_master")

    def check_writable(self, now: float) -> None:
        """Raise ``StoreUnavailable`` while writes fail (a full disk, a read-only file, a lock).

        The answer is the outcome of the last write, the router's own or a probe. A probe is
        written when the last one is :data:`WRITE_PROBE_INTERVAL_S` old or more, so that a
        failure is noticed without traffic and a recovery without any other write: it rewrites
        the schema version the file already has, one page through the WAL, and changes nothing.
        """
        with self._lock:
            if self._probes.due(now):
                # A failure is remembered as the last write's, like any other.
                with suppress(StoreUnavailable), self._write("write (probe)") as conn:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if self._write_failure is not None:
                raise StoreUnavailable(self._write_failure)

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed) and give up the file's lock.

        Later calls raise StoreUnavailable.
        """
        with self._lock, self._read_lock:
            if not self._closed:
                self._closed = True
                self._rollback()
                self._reader.close()
                self._conn.close()
                self._owner.release()

"""A durable :class:`StateStore` in one SQLite file (the stdlib ``sqlite3`` module).

Durability promise
    A request is on disk when :meth:`SQLiteStore.add_request` returns, and so is every status
    change when :meth:`SQLiteStore.transition` returns ``True``, with its audit entry (and its
    GPU-seconds charge, when it carries one). The file is in WAL mode; with
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
      two connections never both read and then fail to upgrade to a write (``SQLITE_BUSY`` in
      the middle of a deferred transaction), and a check-and-write (the guarded status change,
      the rate admission, the idempotency check) is atomic across connections. On any error the
      transaction is rolled back, so nothing is half-written.
    - The connection is in autocommit mode (``isolation_level=None``): the ``sqlite3`` module
      opens no implicit transactions; reads run without one (each statement sees a consistent
      snapshot) and never block writers, thanks to WAL.
    - No transaction is ever held across an ``await``: every method is synchronous and opens
      and closes its transaction before it returns, so an event loop cannot interleave two
      callers inside one transaction. A lock serialises threads sharing the one connection.
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
dispatching and running requests of this router's GPUs), owned by the one router process that
drives those GPUs and rebuilt at recovery, when the requests that held them are queued again. They
live in memory inside the store object, as in :class:`~gpu_request_router.store.MemoryStore`.

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
        charges_user_at (user, at)
    admission_counts(user PRIMARY KEY, n)       -- each user's rows in admissions, and
    charge_totals(user PRIMARY KEY, gpu_seconds) -- the sum of their charges, kept by triggers on
                                                -- those tables: a quota check reads one row
    quota_overrides(user PRIMARY KEY, body)     -- body: JSON object

Only ``status``, ``attempts`` and ``state`` change after a request is added; its id, user,
creation time, model, priority, idempotency key and ``body`` are fixed at creation. Every table
but ``requests`` and ``quota_overrides`` is ``WITHOUT ROWID`` (its rows live in its primary key),
so that a write touches one b-tree fewer per table (a rowid table keeps its primary key in a
second one): each page a transaction changes is written whole to the WAL, and those writes are
most of a commit's cost.

Schema history: 1 had no counter tables; 2 added them; 3 split the request into body and state,
keyed the admissions by request, and made the tables ``WITHOUT ROWID``. Opening an older file
migrates it in one transaction (the counters are rebuilt from the rows by their triggers).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from gpu_request_router.core.state_store import (
    Charge,
    Page,
    RateAdmission,
    RateRefused,
    RequestQuery,
    StateStore,
    check_charge,
    decode_cursor,
    encode_cursor,
    retry_after,
)
from gpu_request_router.exceptions import StoreUnavailable
from gpu_request_router.models.request import TERMINAL_STATUSES, Request, RequestStatus, Transition
from gpu_request_router.store._owner import OwnerLock
from gpu_request_router.store._reservations import ReservationLedger
from gpu_request_router.store.codec import (
    request_fixed_to_json,
    request_from_json,
    request_state_to_json,
    transition_from_json,
    transition_to_json,
)

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

SCHEMA_VERSION = 3
"""The schema this code writes and reads (``PRAGMA user_version``; see the module docstring)."""

BUSY_TIMEOUT_MS = 5000
"""How long a write waits for another connection's write lock before giving up."""

WRITE_PROBE_INTERVAL_S = 1.0
"""The most often :meth:`SQLiteStore.check_writable` writes to learn whether writes work."""

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
    "CREATE INDEX IF NOT EXISTS charges_user_at ON charges (user, at)",
    """CREATE TABLE IF NOT EXISTS admission_counts (
        user TEXT PRIMARY KEY,
        n INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS charge_totals (
        user TEXT PRIMARY KEY,
        gpu_seconds REAL NOT NULL
    ) WITHOUT ROWID""",
    # Triggers keep the counters, so that every writer of the rows does, whatever its code.
    """CREATE TRIGGER IF NOT EXISTS admissions_counted AFTER INSERT ON admissions BEGIN
        INSERT INTO admission_counts (user, n) VALUES (NEW.user, 1)
            ON CONFLICT (user) DO UPDATE SET n = n + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS admissions_uncounted AFTER DELETE ON admissions BEGIN
        UPDATE admission_counts SET n = n - 1 WHERE user = OLD.user;
    END""",
    """CREATE TRIGGER IF NOT EXISTS charges_added AFTER INSERT ON charges BEGIN
        INSERT INTO charge_totals (user, gpu_seconds) VALUES (NEW.user, NEW.gpu_seconds)
            ON CONFLICT (user) DO UPDATE SET gpu_seconds = gpu_seconds + NEW.gpu_seconds;
    END""",
    """CREATE TRIGGER IF NOT EXISTS charges_changed AFTER UPDATE OF gpu_seconds ON charges BEGIN
        UPDATE charge_totals SET gpu_seconds = gpu_seconds - OLD.gpu_seconds + NEW.gpu_seconds
            WHERE user = NEW.user;
    END""",
    # With no charge left the total is exactly 0: rounding never builds up.
    """CREATE TRIGGER IF NOT EXISTS charges_removed AFTER DELETE ON charges BEGIN
        UPDATE charge_totals SET gpu_seconds = CASE
            WHEN EXISTS (SELECT 1 FROM charges WHERE user = OLD.user)
            THEN gpu_seconds - OLD.gpu_seconds ELSE 0 END
            WHERE user = OLD.user;
    END""",
    "CREATE TABLE IF NOT EXISTS quota_overrides (user TEXT PRIMARY KEY, body TEXT NOT NULL)",
)

_INSERT_REQUEST = """
    INSERT INTO requests
        (id, user, status, attempts, created_at, model, priority, idempotency_key, body, state)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_TRANSITION = "INSERT INTO transitions (request_id, seq, body) VALUES (?, ?, ?)"
_UPSERT_CHARGE = """
    INSERT INTO charges (user, charge_id, at, gpu_seconds) VALUES (?, ?, ?, ?)
    ON CONFLICT (user, charge_id) DO UPDATE SET gpu_seconds = excluded.gpu_seconds
"""


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    """Bring a schema 1 or 2 file to schema 3, in the open transaction.

    The old tables are renamed, the new ones created and filled from them, the old ones
    dropped; the counter tables start empty and their triggers count the copied rows. Old
    admissions are keyed by their old row id (they were not keyed by request).
    """
    for trigger in (
        "admissions_counted",
        "admissions_uncounted",
        "charges_added",
        "charges_changed",
        "charges_removed",
    ):
        conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    for index in ("requests_status", "admissions_user_at", "charges_user_at"):
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    conn.execute("ALTER TABLE requests ADD COLUMN state TEXT")
    for table in ("transitions", "admissions", "charges"):
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
    conn.execute("DROP TABLE IF EXISTS admission_counts")
    conn.execute("DROP TABLE IF EXISTS charge_totals")
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

    Raises:
        StoreInUse: another live process owns the file (see the module docstring).
        StoreUnavailable: the file cannot be opened, is not a database, cannot be put in WAL
            mode, or has a schema newer than this code.
    """

    def __init__(
        self, path: str | Path, *, synchronous: Literal["normal", "full"] = "normal"
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._lock = threading.RLock()
        self._closed = False
        self._reservations = ReservationLedger()
        # Why the last write failed (None once one succeeds), and when a probe last wrote.
        self._write_failure: str | None = None
        self._probed_at: float | None = None
        self._owner = OwnerLock.acquire(self.path)  # before the file is read at all
        try:
            self._conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as exc:
            self._owner.release()
            raise self._unavailable("open the database", exc) from exc
        try:
            self._open()
        except BaseException:
            self._conn.close()
            self._owner.release()
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
        except sqlite3.Error as exc:
            raise self._unavailable("open the database", exc) from exc
        with self._write("create the schema") as conn:
            version = self._check_version()
            fresh = not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests'"
            ).fetchone()
            if not fresh and version < 3:
                try:
                    _migrate_to_3(conn)
                except sqlite3.IntegrityError as exc:  # rows another program left inconsistent
                    raise self._unavailable(f"migrate schema {version} to 3", exc) from exc
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
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._unavailable(action, exc) from exc

    # Requests ------------------------------------------------------------------------------

    def add_request(
        self, request: Request, created: Transition, admission: RateAdmission | None = None
    ) -> Request:
        """Store a new request and its creation entry, or return the one with its key."""
        body = request_fixed_to_json(request)
        state = request_state_to_json(request)
        entry = transition_to_json(created)
        refused: float | None = None
        with self._write("add a request") as conn:
            key = request.idempotency_key
            if key is not None:
                # Under the write lock no other process can add one with this key meanwhile.
                row = conn.execute(
                    "SELECT body, state FROM requests WHERE user = ? AND idempotency_key = ?",
                    (request.user, key),
                ).fetchone()
                if row is not None:
                    return request_from_json(*row)
            if admission is not None:
                # As in memory: the window is pruned even when the admission is refused.
                refused = self._admit(conn, request.user, request.id, admission)
            if refused is None:
                conn.execute(
                    _INSERT_REQUEST,
                    (
                        request.id,
                        request.user,
                        request.status.value,
                        request.attempts,
                        request.created_at,
                        request.model,
                        request.priority,
                        key,
                        body,
                        state,
                    ),
                )
                conn.execute(_INSERT_TRANSITION, (created.request_id, created.seq, entry))
        if refused is not None:
            raise RateRefused(refused)
        return request.snapshot()

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

    def transition(
        self,
        request: Request,
        from_status: RequestStatus,
        attempt: int,
        change: Transition,
        charge: Charge | None = None,
    ) -> bool:
        """Write ``request`` and its entry if the stored one has ``from_status``, ``attempt``."""
        if charge is not None:
            check_charge(charge.gpu_seconds)
        state = request_state_to_json(request)
        entry = transition_to_json(change)
        with self._write("write a status change") as conn:
            updated = conn.execute(
                "UPDATE requests SET status = ?, attempts = ?, state = ?"
                " WHERE id = ? AND status = ? AND attempts = ?",
                (
                    request.status.value,
                    request.attempts,
                    state,
                    request.id,
                    from_status.value,
                    attempt,
                ),
            ).rowcount
            if updated != 1:
                return False
            conn.execute(_INSERT_TRANSITION, (change.request_id, change.seq, entry))
            if charge is not None:
                conn.execute(
                    _UPSERT_CHARGE,
                    (charge.user, charge.charge_id, charge.at, charge.gpu_seconds),
                )
        return True

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
        """Every request not yet in a terminal status, oldest first."""
        rows = self._read(
            "list unfinished requests",
            f"SELECT body, state FROM requests WHERE {_UNFINISHED_SQL} ORDER BY created_at, id",
        )
        return [request_from_json(body, state) for body, state in rows]

    # Quota overrides --------------------------------------------------------------------------

    def quota_overrides(self) -> dict[str, dict[str, Any]]:
        """Per-user quota overrides set at run time (in the order users were first set)."""
        rows = self._read(
            "read quota overrides", "SELECT user, body FROM quota_overrides ORDER BY rowid"
        )
        return {user: json.loads(body) for user, body in rows}

    def set_quota_override(self, user: str, values: dict[str, Any]) -> None:
        """Replace ``user``'s run-time quota override."""
        body = json.dumps(values, separators=(",", ":"))
        with self._write("set a quota override") as conn:
            conn.execute(
                "INSERT INTO quota_overrides (user, body) VALUES (?, ?)"
                " ON CONFLICT (user) DO UPDATE SET body = excluded.body",
                (user, body),
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
            if self._probed_at is None or not 0 <= now - self._probed_at < WRITE_PROBE_INTERVAL_S:
                self._probed_at = now
                # A failure is remembered as the last write's, like any other.
                with suppress(StoreUnavailable), self._write("write (probe)") as conn:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if self._write_failure is not None:
                raise StoreUnavailable(self._write_failure)

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed) and give up the file's lock.

        Later calls raise StoreUnavailable.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._rollback()
                self._conn.close()
                self._owner.release()

    # GPU memory reservations (in memory, see the module docstring) --------------------------

    def reserve(self, gpu_id: str, holder: str, memory_mb: int, limit_mb: int) -> int | None:
        """Reserve memory on a GPU unless the total would pass ``limit_mb``."""
        return self._reservations.reserve(gpu_id, holder, memory_mb, limit_mb)

    def release(self, holder: str) -> dict[str, int]:
        """Drop every reservation of ``holder``; return each touched GPU's new reserved total."""
        return self._reservations.release(holder)

    def reserved_mb(self, gpu_id: str) -> int:
        """The memory reserved on a GPU right now."""
        return self._reservations.reserved_mb(gpu_id)

    # Quota counters ----------------------------------------------------------------------------

    @staticmethod
    def _admit(
        conn: sqlite3.Connection, user: str, request_id: str, admission: RateAdmission
    ) -> float | None:
        """Record a request's admission in the open transaction; if refused, the retry-after."""
        now, window_s, limit = admission.at, admission.window_s, admission.limit
        # Admissions at or before the cutoff never count again: drop them on the way.
        conn.execute("DELETE FROM admissions WHERE user = ? AND at <= ?", (user, now - window_s))
        if limit is not None:
            row = conn.execute("SELECT n FROM admission_counts WHERE user = ?", (user,)).fetchone()
            if row is not None and row[0] >= limit:
                (oldest,) = conn.execute(
                    "SELECT min(at) FROM admissions WHERE user = ?", (user,)
                ).fetchone()
                return retry_after(now, oldest, window_s)
        conn.execute(
            "INSERT INTO admissions (user, at, request_id) VALUES (?, ?, ?)",
            (user, now, request_id),
        )
        return None

    def admissions_in_window(self, user: str, now: float, window_s: float) -> int:
        """How many admissions of ``user`` fall within the last ``window_s``."""
        self._prune("admissions", user, now - window_s)
        rows = self._read(
            "count admissions", "SELECT n FROM admission_counts WHERE user = ?", (user,)
        )
        return int(rows[0][0]) if rows else 0

    def gpu_seconds_in_window(self, user: str, now: float, window_s: float) -> float:
        """GPU-seconds charged to ``user`` at times within the last ``window_s``."""
        cutoff = now - window_s
        # One read answers both: the total, and whether charges have left the window (which
        # is checked on every admission and dispatch, and seldom true).
        ((total, due),) = self._read(
            "sum charges",
            "SELECT (SELECT gpu_seconds FROM charge_totals WHERE user = ?),"
            " EXISTS (SELECT 1 FROM charges WHERE user = ? AND at <= ?)",
            (user, user, cutoff),
        )
        if due:
            self._prune("charges", user, cutoff)
            ((total,),) = self._read(
                "sum charges", "SELECT gpu_seconds FROM charge_totals WHERE user = ?", (user,)
            )
        return 0.0 if total is None else max(0.0, float(total))

    def oldest_charge_in_window(self, user: str, now: float, window_s: float) -> float | None:
        """The time of the oldest charge still in the window."""
        self._prune("charges", user, now - window_s)
        rows = self._read(
            "read charges",
            "SELECT min(at) FROM charges WHERE user = ? AND at > ?",
            (user, now - window_s),
        )
        oldest = rows[0][0]
        return None if oldest is None else float(oldest)

    def _prune(self, table: Literal["admissions", "charges"], user: str, cutoff: float) -> None:
        """Drop ``user``'s rows dated at or before ``cutoff``, when there are any.

        As in the in-memory store, a charge that has left the window is forgotten, so charging
        its id again starts a new charge. The check is a read, so reading counters writes
        only when something is due for pruning.
        """
        due = self._read(
            f"read {table}",
            f"SELECT 1 FROM {table} WHERE user = ? AND at <= ? LIMIT 1",
            (user, cutoff),
        )
        if not due:
            return
        with self._write(f"prune {table}") as conn:
            conn.execute(f"DELETE FROM {table} WHERE user = ? AND at <= ?", (user, cutoff))

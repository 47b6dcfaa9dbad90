"""The audit trail, stored beside the gallery (same SQLite file, same PostgreSQL database)
so it survives restarts and every replica writes to and reads one trail.

Append-only by construction: the server only INSERTs rows and the retention purge only
DELETEs rows older than its cut-off; no code path updates one. A row holds when, which
key (its name), the request id, the client address, the route and action, the identity
and the outcome: never an image, a vector, a name or metadata.

Also here: :data:`CALLER`, the key name of the request being served (set by the
server's authentication, carried to the gallery threads), which the stores record with
each live decision so the consistency monitor keeps at most
:data:`DECISIONS_PER_CALLER` of one caller's decisions about one identity.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., None])
CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("facegate_caller", default=None)
AUDIT_SCHEMA_LOCK = 0x46470003  # beside pg_schema's advisory lock keys
DECISIONS_PER_CALLER = 20  # of an identity's 200 kept decisions: no one caller steers it



def best_effort(record: F) -> F:
    """A store's ``record_decision`` that a full disk (or, for PostgreSQL, a database that
    cannot take the write) does not fail: the verification it records has been answered
    correctly either way. Counted in ``store.unrecorded_decisions`` (exported by /metrics)
    and logged at most once a minute."""

    @functools.wraps(record)
    def wrapper(store: Any, *args: Any, **kwargs: Any) -> None:
        from facegate.gallery.pg_follow import GalleryUnavailable  # psycopg: only when called

        try:
            record(store, *args, **kwargs)
        except Exception as e:
            full = getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
                isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
            if not full and not isinstance(e, GalleryUnavailable):
                raise
            store.unrecorded_decisions = getattr(store, "unrecorded_decisions", 0) + 1
            if time.monotonic() - getattr(store, "_unrecorded_logged", -60.0) >= 60.0:
                store._unrecorded_logged = time.monotonic()
                log.error("a decision record was not written (%s); the decision itself stands", e)

    return wrapper  # type: ignore[return-value]


COLUMNS = ("at", "key_name", "request_id", "client", "method", "route", "action",
           "identity_id", "status", "outcome")


@dataclass(frozen=True)
class AuditRecord:
    at: float
    key_name: str
    request_id: str
    client: str | None
    method: str
    route: str
    action: str
    identity_id: str | None
    status: int
    outcome: str
    row_id: int | None = None

    def values(self) -> tuple:
        return tuple(getattr(self, c) for c in COLUMNS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SQLITE_AUDIT = """
CREATE TABLE IF NOT EXISTS audit (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL, key_name TEXT NOT NULL, request_id TEXT NOT NULL, client TEXT,
    method TEXT NOT NULL, route TEXT NOT NULL, action TEXT NOT NULL, identity_id TEXT,
    status INTEGER NOT NULL, outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_identity ON audit(identity_id, row_id);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit(at);
"""

POSTGRES_AUDIT = """
CREATE TABLE IF NOT EXISTS audit (
    row_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL, key_name text NOT NULL, request_id text NOT NULL,
    client text, method text NOT NULL, route text NOT NULL, action text NOT NULL,
    identity_id text, status integer NOT NULL, outcome text NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_identity ON audit (identity_id, row_id);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS caller text;
"""


def prepare_sqlite(db: sqlite3.Connection) -> None:
    """Inside the gallery's opening transaction: the audit table, ``decisions.caller``."""
    for statement in SQLITE_AUDIT.split(";"):
        if statement.strip():
            db.execute(statement)
    if "caller" not in {row[1] for row in db.execute("PRAGMA table_info(decisions)")}:
        db.execute("ALTER TABLE decisions ADD COLUMN caller TEXT")


def prepare_postgres(conn: Any) -> None:
    """At gallery open (every replica; one at a time): the audit table, ``decisions.caller``."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (AUDIT_SCHEMA_LOCK,))
        conn.execute(POSTGRES_AUDIT)


def _where(identity_id: str | None, key_name: str | None, action: str | None,
           since: float | None, until: float | None, before: int | None, mark: str) -> tuple[str, list]:
    terms, args = [], []
    for column, op, value in (("identity_id", "=", identity_id), ("key_name", "=", key_name),
                              ("action", "=", action), ("at", ">=", since), ("at", "<", until),
                              ("row_id", "<", before)):
        if value is not None:
            terms.append(f"{column} {op} {mark}")
            args.append(value)
    return (" WHERE " + " AND ".join(terms)) if terms else "", args


class SqliteAudit:
    """The trail in the gallery's SQLite file, on a connection of its own."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "secure_delete=ON"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(SQLITE_AUDIT)
        self._lock = threading.Lock()

    def append(self, records: list[AuditRecord]) -> None:
        marks = ", ".join("?" * len(COLUMNS))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({marks})",
                    [r.values() for r in records],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, *, limit: int = 100, identity_id: str | None = None, key_name: str | None = None,
              action: str | None = None, since: float | None = None, until: float | None = None,
              before: int | None = None) -> list[AuditRecord]:
        """Newest first; ``before`` (a row id) pages back."""
        where, args = _where(identity_id, key_name, action, since, until, before, "?")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(COLUMNS)}, row_id FROM audit{where} ORDER BY row_id DESC LIMIT ?",
                [*args, limit],
            ).fetchall()
        return [AuditRecord(*row) for row in rows]

    def purge(self, older_than: float) -> int:
        """Delete records made before the unix time ``older_than``; returns how many."""
        with self._lock:
            return self._db.execute("DELETE FROM audit WHERE at < ?", (older_than,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresAudit:
    """The trail in the gallery's PostgreSQL database (one connection, reopened on loss)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self.url = url
        self._conn: Any = None
        self._lock = threading.Lock()
        with self._lock:
            prepare_postgres(self._connection())

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        return self._conn

    def _run(self, fn: Any) -> Any:
        with self._lock:
            try:
                return fn(self._connection())
            except self._psycopg.OperationalError:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise

    def append(self, records: list[AuditRecord]) -> None:
        marks = ", ".join(["%s"] * len(COLUMNS))

        def write(conn: Any) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({marks})",
                                [r.values() for r in records])

        self._run(write)

    def query(self, *, limit: int = 100, identity_id: str | None = None, key_name: str | None = None,
              action: str | None = None, since: float | None = None, until: float | None = None,
              before: int | None = None) -> list[AuditRecord]:
        where, args = _where(identity_id, key_name, action, since, until, before, "%s")
        rows = self._run(lambda conn: conn.execute(
            f"SELECT {', '.join(COLUMNS)}, row_id FROM audit{where} ORDER BY row_id DESC LIMIT %s",
            [*args, limit],
        ).fetchall())
        return [AuditRecord(*row) for row in rows]

    def purge(self, older_than: float) -> int:
        return self._run(lambda conn: conn.execute(
            "DELETE FROM audit WHERE at < %s", (older_than,)).rowcount)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def open_audit(location: str | Path) -> SqliteAudit | PostgresAudit:
    from facegate.gallery.protocol import is_postgres_url

    return PostgresAudit(str(location)) if is_postgres_url(location) else SqliteAudit(location)

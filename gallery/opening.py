"""What a gallery must be before it is opened, and the named ways it can fail to be.

A new gallery starts empty, but an existing one that is empty, foreign, damaged or
newer than this facegate must never be taken for a new one: starting "silently as
empty" would answer every search with no match, and writing our tables into another
application's database would damage it. Each state is its own :class:`GalleryRefused`
subclass with a plain message (what was found, what to do) and its own exit status for
``facegate serve``, which checks the gallery (:func:`preflight`) before it starts. The
stores run the same checks when they open, so the ``facegate gallery`` commands and any
other caller refuse alike.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg

SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_TABLES = ("identities", "templates")  # what holds enrolments (older files may lack the rest)
POSTGRES_TABLES = {1: ("identities", "templates", "decisions"), 2: ("changes",)}


class GalleryRefused(RuntimeError):
    """The gallery cannot be opened as it is; nothing was changed."""

    exit_code = 9


class EmptyGalleryFile(GalleryRefused):
    exit_code = 4


class ForeignGallery(GalleryRefused):
    exit_code = 5


class DamagedGallery(GalleryRefused):
    exit_code = 6


class NewerGallerySchema(GalleryRefused):
    exit_code = 7


class GalleryUnreachable(GalleryRefused):
    exit_code = 8


def newer_schema(where: str, found: int, ours: int) -> NewerGallerySchema:
    return NewerGallerySchema(
        f"{where}: gallery schema {found} is newer than this facegate's ({ours}); upgrade "
        "facegate (a newer version migrated it, and an older one must not write to it)"
    )


def check_sqlite_file(path: Path, schema_version: int) -> None:
    """Refuse an existing file that is not a gallery this facegate can open (a missing
    file is fine: a new gallery). Reads only."""
    if not path.exists():
        return
    if not path.is_file():
        raise ForeignGallery(f"{path}: not a file; FACEGATE_GALLERY must name a SQLite file")
    size = path.stat().st_size
    if size == 0:
        raise EmptyGalleryFile(
            f"{path}: the gallery file is empty (0 bytes), not a gallery. If it held "
            "enrolments, restore it from a backup; to start a new gallery, delete the file"
        )
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise ForeignGallery(
            f"{path}: not a SQLite file ({size} bytes that do not start with SQLite's "
            "header); point FACEGATE_GALLERY at the gallery file, or restore it from a backup"
        )
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            check_sqlite_tables(db, path, schema_version)
        finally:
            db.close()
    except sqlite3.DatabaseError as e:  # "file is not a database", "malformed"
        raise DamagedGallery(f"{path}: SQLite cannot read it ({e}); restore it from a backup") \
            from None


def check_sqlite_tables(db: sqlite3.Connection, path: Path, schema_version: int) -> None:
    """A database with tables is a gallery: ``meta`` with a schema version this facegate
    knows, and every gallery table."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return  # a fresh database: the store creates the schema
    if "meta" not in tables:
        shown = ", ".join(sorted(tables)[:5])
        raise ForeignGallery(
            f"{path}: a SQLite database of another application (tables: {shown}), not a "
            "facegate gallery; nothing was written to it"
        )
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None or not str(row[0]).isdigit():
        raise DamagedGallery(f"{path}: the gallery's meta table has no schema version")
    if int(row[0]) > schema_version:
        raise newer_schema(str(path), int(row[0]), schema_version)
    missing = [t for t in SQLITE_TABLES if t not in tables]
    if missing:
        raise DamagedGallery(
            f"{path}: the gallery (schema {row[0]}) lacks its table(s) {', '.join(missing)}: "
            "it was damaged or edited; restore it from a backup (nothing was created in it)"
        )


def check_postgres(conn: psycopg.Connection, schema_version: int) -> set[int]:
    """The migration versions applied to this database, after refusing a database that
    is foreign (gallery tables but no migration record), newer, or missing a table its
    migrations created. Reads only."""
    def exists(table: str) -> bool:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]

    applied: set[int] = set()
    if exists("facegate_migrations"):
        applied = {v for (v,) in conn.execute("SELECT version FROM facegate_migrations")}
    newest = max(applied, default=0)
    if newest > schema_version:
        raise newer_schema("gallery database", newest, schema_version)
    wanted = [t for v, tables in POSTGRES_TABLES.items() if v in applied for t in tables]
    if not applied:
        clash = [t for ts in POSTGRES_TABLES.values() for t in ts if exists(t)]
        if clash:
            raise ForeignGallery(
                f"the gallery database already holds table(s) {', '.join(clash)} but no "
                "facegate migration record: another application's, or a damaged gallery; "
                "nothing was written to it"
            )
    missing = [t for t in wanted if not exists(t)]
    if missing:
        raise DamagedGallery(
            f"the gallery database (schema {newest}) lacks its table(s) {', '.join(missing)}: "
            "it was damaged or edited; restore it from a backup (nothing was created in it)"
        )
    return applied


def preflight(location: str | Path, *, connect_timeout_s: float = 5.0) -> None:
    """Refuse, before a server starts, a gallery it could not open."""
    from facegate.gallery import pg_schema, sqlite_schema
    from facegate.gallery.protocol import is_postgres_url

    if not is_postgres_url(location):
        check_sqlite_file(Path(location), sqlite_schema.SCHEMA_VERSION)
        return
    try:
        with psycopg.connect(str(location), connect_timeout=max(2, round(connect_timeout_s))) as conn:
            check_postgres(conn, pg_schema.SCHEMA_VERSION)
    except psycopg.OperationalError as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GalleryUnreachable(f"the gallery database cannot be reached ({detail})") from None

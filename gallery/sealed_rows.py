"""The database side of sealing (``gallery.crypto``): the ``identities.sealed_key`` column,
sealing a gallery written before sealing existed (at open, once), key rotation, and the
key tree's bookkeeping (gallery/key_tree.py): leaves handed out in order and never
again (a PostgreSQL sequence; a counter in SQLite's ``meta``), and ``shredded_leaves``,
the leaves of deleted identities (numbers only), which every copy of the tree punctures.

Both backends run the same steps through :class:`_Db`, a two-method view of a SQLite
or psycopg connection (the only difference is the parameter mark). A gallery whose rows
are sealed cannot be opened without its master key: it would serve ciphertext as names.
"""

from __future__ import annotations

import logging
from typing import Any

from facegate.gallery.crypto import PlainSealer, Sealer, SealError, leaf_of
from facegate.gallery.pg_schema import CHANGES_LOCK

SEALING_LOCK = 0x46470004  # beside pg_schema's advisory lock keys
log = logging.getLogger(__name__)


class _Db:
    def __init__(self, conn: Any, mark: str) -> None:
        self.conn, self.mark = conn, mark

    def next_leaf(self) -> int:
        if self.mark == "?":
            sql = ("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'next_key_leaf'"
                   " RETURNING CAST(value AS INTEGER) - 1")
        else:
            sql = "SELECT nextval('facegate_key_leaves')"
        return int(self.rows(sql)[0][0])

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.conn.execute(sql.replace("?", self.mark), args).fetchall()

    def run(self, sql: str, args: tuple = ()) -> None:
        self.conn.execute(sql.replace("?", self.mark), args)


def prepare_sqlite(db: Any, sealer: Sealer | PlainSealer) -> int:
    """Inside the gallery's opening transaction; returns how many identities were sealed
    now. Also punctures the key tree at every shredded leaf (a crash may have come between
    a delete's commit and its puncture)."""
    if "sealed_key" not in {row[1] for row in db.execute("PRAGMA table_info(identities)")}:
        db.execute("ALTER TABLE identities ADD COLUMN sealed_key BLOB")
    db.execute("CREATE TABLE IF NOT EXISTS shredded_leaves ("
               " seq INTEGER PRIMARY KEY AUTOINCREMENT, leaf INTEGER NOT NULL UNIQUE)")
    db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('next_key_leaf', '0')")
    sealed = _seal_existing(_Db(db, "?"), sealer)
    sync_shredded(db, "?", sealer, 0)
    _purge_shredded(_Db(db, "?"), sealer)
    return sealed


def prepare_postgres(conn: Any, sealer: Sealer | PlainSealer) -> int:
    """At gallery open, one replica at a time; returns how many identities were sealed now.
    (The follower punctures the key tree when it builds the index: ``sync_shredded``.)"""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SEALING_LOCK,))
        conn.execute("ALTER TABLE identities ADD COLUMN IF NOT EXISTS sealed_key bytea")
        conn.execute("CREATE SEQUENCE IF NOT EXISTS facegate_key_leaves MINVALUE 0 START 0")
        conn.execute("CREATE TABLE IF NOT EXISTS shredded_leaves ("
                     " seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                     " leaf bigint NOT NULL UNIQUE)")
        sealed = _seal_existing(_Db(conn, "%s"), sealer)
    if sealer.tree is not None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
            sync_shredded(conn, "%s", sealer, 0)
            _purge_shredded(_Db(conn, "%s"), sealer)
    return sealed


def new_key(conn: Any, mark: str, sealer: Sealer | PlainSealer, identity_id: str) -> tuple:
    """A new identity's (wrapped DEK, DEK), with the next leaf of the key tree if there is one."""
    leaf = _Db(conn, mark).next_leaf() if sealer.tree is not None else None
    return sealer.new_key(identity_id, leaf)


def record_shred(conn: Any, mark: str, identity_id: str) -> int | None:
    """In the delete's transaction, before the row goes: its leaf, now listed as shredded
    (the caller punctures it after the commit: ``Sealer.shred``). None without a leaf."""
    db = _Db(conn, mark)
    row = db.rows("SELECT sealed_key FROM identities WHERE identity_id = ?", (identity_id,))
    leaf = leaf_of(row[0][0]) if row and row[0][0] is not None else None
    if leaf is not None:
        db.run("INSERT INTO shredded_leaves (leaf) VALUES (?)", (leaf,))
    return leaf


def sync_shredded(conn: Any, mark: str, sealer: Sealer | PlainSealer, after: int) -> int:
    """Puncture the tree at every leaf shredded after list position ``after`` (by any
    replica or process); returns the last position read, for the next call."""
    rows = _Db(conn, mark).rows("SELECT seq, leaf FROM shredded_leaves WHERE seq > ? ORDER BY seq",
                                (after,))
    if not rows:
        return after
    sealer.shred([leaf for _, leaf in rows])
    return int(rows[-1][0])


def _purge_shredded(db: _Db, sealer: Sealer | PlainSealer) -> int:
    """Finish deletes that this copy of the gallery predates (a restored backup): rows
    whose key the tree no longer derives are dropped (PostgreSQL: with their changes, so
    every replica's index follows). Returns how many identities."""
    if sealer.tree is None:
        return 0
    gone = []
    for identity_id, wrapped in db.rows(
        "SELECT identity_id, sealed_key FROM identities WHERE sealed_key IS NOT NULL"
    ):
        leaf = leaf_of(wrapped)
        if leaf is not None and not sealer.tree.covers(leaf):
            gone.append(identity_id)
    for identity_id in gone:
        if db.mark == "%s":
            for (row_id,) in db.rows("DELETE FROM templates WHERE identity_id = ? RETURNING row_id",
                                     (identity_id,)):
                db.run("INSERT INTO changes (op, identity_id, row_id) VALUES ('untemplate', ?, ?)",
                       (identity_id, row_id))
            db.run("INSERT INTO changes (op, identity_id) VALUES ('unidentity', ?)", (identity_id,))
        db.run("DELETE FROM identities WHERE identity_id = ?", (identity_id,))
    if gone:
        log.warning("%d identities whose keys were shredded (deleted after this copy of the "
                    "gallery was made) were dropped at open", len(gone))
    return len(gone)


def _seal_existing(db: _Db, sealer: Sealer | PlainSealer) -> int:
    if not sealer.sealing:
        if db.rows("SELECT 1 FROM identities WHERE sealed_key IS NOT NULL LIMIT 1"):
            raise SealError("this gallery is sealed: set FACEGATE_MASTER_KEY_FILE (or "
                            "FACEGATE_MASTER_KEY) to the key it was sealed with")
        return 0
    if sealer.tree is not None:  # keys wrapped before the tree was configured get a leaf
        _rewrap_all(db, sealer, convert_only=True)
    plain = db.rows("SELECT identity_id, name, metadata FROM identities WHERE sealed_key IS NULL")
    for identity_id, name, metadata in plain:
        wrapped, key = sealer.new_key(identity_id, db.next_leaf() if sealer.tree else None)
        db.run(
            "UPDATE identities SET name = ?, metadata = ?, sealed_key = ? WHERE identity_id = ?",
            (sealer.seal_text(identity_id, "name", name, key),
             sealer.seal_text(identity_id, "metadata", metadata, key), wrapped, identity_id),
        )
        for row_id, template_id, embedding, crop, source in db.rows(
            "SELECT row_id, template_id, embedding, crop, source FROM templates"
            " WHERE identity_id = ?", (identity_id,),
        ):
            db.run(
                "UPDATE templates SET embedding = ?, crop = ?, source = ? WHERE row_id = ?",
                (sealer.seal(identity_id, f"embedding:{template_id}", embedding, key),
                 sealer.seal(identity_id, f"crop:{template_id}", crop, key),
                 sealer.seal_text(identity_id, f"source:{template_id}", source, key), row_id),
            )
    # Galleries sealed before photo file names were: seal those left in the clear.
    for row_id, identity_id, template_id, source in db.rows(
        "SELECT row_id, identity_id, template_id, source FROM templates"
        " WHERE source IS NOT NULL AND substr(source, 1, 5) <> 'fgs1:'"
    ):
        db.run("UPDATE templates SET source = ? WHERE row_id = ?",
               (sealer.seal_text(identity_id, f"source:{template_id}", source), row_id))
    return len(plain)


def load_keys(db: Any, mark: str, sealer: Sealer | PlainSealer) -> None:
    """Unwrap every identity's key once (before an index build opens all the vectors)."""
    if sealer.sealing:
        for identity_id, wrapped in _Db(db, mark).rows(
            "SELECT identity_id, sealed_key FROM identities WHERE sealed_key IS NOT NULL"
        ):
            sealer.remember(identity_id, wrapped)


def rotate(conn: Any, mark: str, sealer: Sealer | PlainSealer) -> tuple[int, int]:
    """Re-wrap every identity's key under the current (first) master key (and a leaf of the
    key tree, if one is configured and the key has none), in the caller's transaction;
    returns (re-wrapped, already current). The data itself is not touched: afterwards
    the old master key can be destroyed."""
    if not sealer.sealing:
        raise SealError("no master key configured (FACEGATE_MASTER_KEY_FILE)")
    return _rewrap_all(_Db(conn, mark), sealer)


def _rewrap_all(db: _Db, sealer: Sealer, convert_only: bool = False) -> tuple[int, int]:
    done = current = 0
    for identity_id, wrapped in db.rows(
        "SELECT identity_id, sealed_key FROM identities WHERE sealed_key IS NOT NULL"
    ):
        new = sealer.rewrap(identity_id, wrapped, db.next_leaf, convert_only)
        if new is None:
            current += 1
            continue
        db.run("UPDATE identities SET sealed_key = ? WHERE identity_id = ?", (new, identity_id))
        done += 1
    return done, current

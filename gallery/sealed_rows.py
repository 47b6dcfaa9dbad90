"""The database side of sealing (``gallery.crypto``): the ``identities.sealed_key`` column,
sealing a gallery written before sealing existed (at open, once), and key rotation.

Both backends run the same steps through :class:`_Db`, a two-method view of a SQLite
or psycopg connection (the only difference is the parameter mark). A gallery whose rows
are sealed cannot be opened without its master key: it would serve ciphertext as names.
"""

from __future__ import annotations

from typing import Any

from facegate.gallery.crypto import PlainSealer, Sealer, SealError

SEALING_LOCK = 0x46470004  # beside pg_schema's advisory lock keys


class _Db:
    def __init__(self, conn: Any, mark: str) -> None:
        self.conn, self.mark = conn, mark

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.conn.execute(sql.replace("?", self.mark), args).fetchall()

    def run(self, sql: str, args: tuple = ()) -> None:
        self.conn.execute(sql.replace("?", self.mark), args)


def prepare_sqlite(db: Any, sealer: Sealer | PlainSealer) -> int:
    """Inside the gallery's opening transaction; returns how many identities were sealed now."""
    if "sealed_key" not in {row[1] for row in db.execute("PRAGMA table_info(identities)")}:
        db.execute("ALTER TABLE identities ADD COLUMN sealed_key BLOB")
    return _seal_existing(_Db(db, "?"), sealer)


def prepare_postgres(conn: Any, sealer: Sealer | PlainSealer) -> int:
    """At gallery open, one replica at a time; returns how many identities were sealed now."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SEALING_LOCK,))
        conn.execute("ALTER TABLE identities ADD COLUMN IF NOT EXISTS sealed_key bytea")
        return _seal_existing(_Db(conn, "%s"), sealer)


def _seal_existing(db: _Db, sealer: Sealer | PlainSealer) -> int:
    if not sealer.sealing:
        if db.rows("SELECT 1 FROM identities WHERE sealed_key IS NOT NULL LIMIT 1"):
            raise SealError("this gallery is sealed: set FACEGATE_MASTER_KEY_FILE (or "
                            "FACEGATE_MASTER_KEY) to the key it was sealed with")
        return 0
    plain = db.rows("SELECT identity_id, name, metadata FROM identities WHERE sealed_key IS NULL")
    for identity_id, name, metadata in plain:
        wrapped, key = sealer.new_key(identity_id)
        db.run(
            "UPDATE identities SET name = ?, metadata = ?, sealed_key = ? WHERE identity_id = ?",
            (sealer.seal_text(identity_id, "name", name, key),
             sealer.seal_text(identity_id, "metadata", metadata, key), wrapped, identity_id),
        )
        for row_id, template_id, embedding, crop in db.rows(
            "SELECT row_id, template_id, embedding, crop FROM templates WHERE identity_id = ?",
            (identity_id,),
        ):
            db.run(
                "UPDATE templates SET embedding = ?, crop = ? WHERE row_id = ?",
                (sealer.seal(identity_id, f"embedding:{template_id}", embedding, key),
                 sealer.seal(identity_id, f"crop:{template_id}", crop, key), row_id),
            )
    return len(plain)


def load_keys(db: Any, mark: str, sealer: Sealer | PlainSealer) -> None:
    """Unwrap every identity's key once (before an index build opens all the vectors)."""
    if sealer.sealing:
        for identity_id, wrapped in _Db(db, mark).rows(
            "SELECT identity_id, sealed_key FROM identities WHERE sealed_key IS NOT NULL"
        ):
            sealer.remember(identity_id, wrapped)


def rotate(conn: Any, mark: str, sealer: Sealer | PlainSealer) -> tuple[int, int]:
    """Re-wrap every identity's key under the current (first) master key, in the caller's
    transaction; returns (re-wrapped, already current). The data itself is not touched:
    afterwards the old master key can be destroyed."""
    if not sealer.sealing:
        raise SealError("no master key configured (FACEGATE_MASTER_KEY_FILE)")
    db = _Db(conn, mark)
    done = current = 0
    for identity_id, wrapped in db.rows(
        "SELECT identity_id, sealed_key FROM identities WHERE sealed_key IS NOT NULL"
    ):
        new = sealer.rewrap(identity_id, wrapped)
        if new is None:
            current += 1
            continue
        db.run("UPDATE identities SET sealed_key = ? WHERE identity_id = ?", (new, identity_id))
        done += 1
    return done, current

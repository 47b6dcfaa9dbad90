"""Retention: live decision records and kept crops older than a cut-off are removed (the
audit trail's own purge is ``gallery.audit``). One function for both stores, using each
store's own write path, so a purge is one transaction like any other write.

A purged crop leaves its template (the vector still matches); only re-embedding it for a
new model becomes impossible, as for a template enrolled without a kept crop. On SQLite
the freed bytes are zeroed (``secure_delete``) and the WAL checkpointed afterwards.
"""

from __future__ import annotations

from typing import Any

DECISIONS = "DELETE FROM decisions WHERE created_at < ?"
CROPS = ("UPDATE templates SET crop = NULL, crop_geometry = NULL"
         " WHERE crop IS NOT NULL AND created_at < ?")


def purge(store: Any, *, decisions_before: float | None, crops_before: float | None) -> dict[str, int]:
    """Remove decisions and kept crops made before these unix times (None: keep); returns
    how many of each went."""
    jobs = [(what, sql, cut) for what, sql, cut in (("decisions", DECISIONS, decisions_before),
                                                    ("crops", CROPS, crops_before)) if cut is not None]
    if not jobs:
        return {}
    if hasattr(store, "_writer"):  # SQLite: under the writer lock, then shred
        with store._write_lock:
            with store._transaction() as db:
                done = {what: db.execute(sql, (cut,)).rowcount for what, sql, cut in jobs}
                store._count_stale(db)
            if any(done.values()):
                store._shred()
        return done
    with store._connection() as conn, conn.transaction():  # PostgreSQL
        return {what: conn.execute(sql.replace("?", "%s"), (cut,)).rowcount for what, sql, cut in jobs}

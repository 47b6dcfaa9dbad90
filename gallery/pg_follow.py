"""Keeping one replica's index current with the PostgreSQL gallery.

The :class:`Follower` builds the index from one snapshot (recording the last change
sequence number in that snapshot), then applies the changes after it in sequence
order. A thread LISTENs on the gallery's channel to wake up when another replica
commits, and reads by sequence number on every wake-up and at least every ``poll_s``
seconds; after losing its connection it reconnects with backoff (at most
``MAX_BACKOFF_S`` apart), replaces the pool's idle connections (dead after a restart)
and catches up before it reports ready again. Applying is idempotent (a template already indexed is
not added twice, an unknown one is not removed), so overlapping catch-ups are harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import psycopg
from facegate.core.errors import FacegateError
from facegate.gallery.pg_deadline import LONG_READ_TIMEOUT_S, connect_timeout
from facegate.gallery.pg_schema import CHANNEL
from facegate.gallery.sealed_rows import load_keys, sync_shredded

if TYPE_CHECKING:
    from facegate.gallery.postgres import PostgresGallery

log = logging.getLogger(__name__)
CATCH_UP_BATCH = 5000
CHANGES_RETENTION_S = 24 * 3600.0  # far longer than any replica should lag
PRUNE_EVERY_S = 3600.0
MAX_BACKOFF_S = 1.0
FOLLOW_TIMEOUT_S = 30.0  # one catch-up by the follower thread (a long backlog after an outage)


class GalleryUnavailable(FacegateError):
    """The gallery database cannot be reached now; nothing was written. Retry later."""

    code = "gallery_unavailable"
    status = 503


def unavailable(error: BaseException) -> GalleryUnavailable:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return GalleryUnavailable(
        f"the gallery database is unavailable ({detail}); nothing was changed, retry shortly"
    )


class Follower:
    """Applies the ``changes`` table to a gallery's :class:`IndexCache`, in order."""

    def __init__(self, gallery: PostgresGallery, url: str, *, poll_s: float) -> None:
        self.gallery = gallery
        self.url = url
        self.poll_s = poll_s
        self.seq = 0
        self.shredded = 0  # the last shredded_leaves position this replica's tree punctured
        self.stale: tuple[int, int, int] = (0, 0, 0)  # templates, identities, re-embeddable
        self._pruned = time.monotonic()
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one catch-up or rebuild at a time
        self._thread = threading.Thread(target=self._run, name="gallery-follower", daemon=True)

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    def start(self) -> None:
        self.rebuild()
        self._caught_up.set()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def rebuild(self) -> None:
        """Replace the index with one snapshot of the database."""
        g = self.gallery
        with self._lock, g._connection(LONG_READ_TIMEOUT_S) as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            (seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
            self.shredded = sync_shredded(conn, "%s", g._sealer, 0)  # the key tree's copy here
            load_keys(conn, "%s", g._sealer)  # each identity's key unwrapped once
            names = {i: g._sealer.open_text(i, "name", n)
                     for i, n in conn.execute("SELECT identity_id, name FROM identities")}
            rows = conn.execute(
                "SELECT row_id, identity_id, template_id, embedding FROM templates"
                " WHERE model_id = %s ORDER BY row_id",
                (g.model_id,),
            ).fetchall()
            keys, vectors = g._quarantine.screen(
                [(r, i, t) for r, i, t, _ in rows], [bytes(b) for *_, b in rows], full=True
            )
            g._cache.build(names, keys, vectors)
            self.stale = self._count_stale(conn)
            self.seq = seq
        log.info("gallery index built: %d templates, change sequence %d", len(rows), seq)

    def catch_up(self, timeout_s: float | None = None) -> int:
        """Apply every committed change after ``seq``; returns how many were applied.

        One snapshot: if changes this replica has not applied were pruned
        (:meth:`prune`: the oldest left is past ``seq + 1``), it rebuilds instead.
        ``timeout_s`` (default the gallery's) bounds the wait for another catch-up too."""
        g = self.gallery
        applied = 0
        rebuild = False
        with self._locked(timeout_s or g.timeout_s), g._connection(timeout_s) as conn, \
                conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            (oldest,) = conn.execute("SELECT MIN(seq) FROM changes").fetchone()
            if oldest is not None and oldest > self.seq + 1:
                log.warning("changes up to %d were pruned before this replica applied them "
                            "(it is at %d): rebuilding its index", oldest - 1, self.seq)
                rebuild = True
            while not rebuild:
                rows = conn.execute(
                    "SELECT c.seq, c.op, c.identity_id, c.row_id, i.name, t.template_id,"
                    " t.model_id, t.embedding FROM changes c"
                    " LEFT JOIN identities i ON c.op = 'identity' AND i.identity_id = c.identity_id"
                    " LEFT JOIN templates t ON c.op = 'template' AND t.row_id = c.row_id"
                    " WHERE c.seq > %s ORDER BY c.seq LIMIT %s",
                    (self.seq, CATCH_UP_BATCH),
                ).fetchall()
                if not rows:
                    break
                rebuild = self._apply(rows)
                self.seq = rows[-1][0]
                applied += len(rows)
            if applied:
                self.stale = self._count_stale(conn)
                self.shredded = sync_shredded(conn, "%s", g._sealer, self.shredded)
        if rebuild:
            self.rebuild()
        return applied

    @contextmanager
    def _locked(self, timeout_s: float) -> Iterator[None]:
        if not self._lock.acquire(timeout=timeout_s):
            raise GalleryUnavailable("another catch-up of this replica's index is still running")
        try:
            yield
        finally:
            self._lock.release()

    def prune(self, older_than_s: float = CHANGES_RETENTION_S) -> int:
        """Delete changes older than ``older_than_s``, always keeping the newest; returns how
        many. Every replica runs it about hourly; a replica that had not applied a pruned
        change rebuilds (see :meth:`catch_up`), so pruning can never lose an update."""
        with self.gallery._connection() as conn:
            return conn.execute(
                "DELETE FROM changes WHERE seq < (SELECT MAX(seq) FROM changes)"
                " AND created_at < clock_timestamp() - make_interval(secs => %s)",
                (older_than_s,),
            ).rowcount

    def _apply(self, rows: list[tuple]) -> bool:
        """Apply changes in order (consecutive additions as one batch); True if the index
        asks for a rebuild."""
        cache, model_id = self.gallery._cache, self.gallery.model_id
        quarantine = self.gallery._quarantine
        rebuild = False
        pending: list[tuple[int, str, str]] = []
        vectors: list[bytes] = []

        def flush() -> bool:
            if not pending:
                return False
            keys, good = quarantine.screen(pending, vectors)
            due = cache.add(keys, good) if keys else False
            pending.clear()
            vectors.clear()
            return due

        for _, op, identity_id, row_id, name, template_id, template_model, embedding in rows:
            if op == "template":
                if template_id is not None and template_model == model_id:  # else gone or stale
                    pending.append((row_id, identity_id, template_id))
                    vectors.append(bytes(embedding))
                continue
            rebuild = flush() or rebuild
            if op == "identity":
                cache.set_name(identity_id, self.gallery._sealer.open_text(identity_id, "name", name))
            elif op == "unidentity":
                cache.drop_identity(identity_id)
                self.gallery._sealer.forget(identity_id)
            elif op == "untemplate":
                quarantine.forget([row_id])
                rebuild = cache.remove([row_id]) or rebuild
        return flush() or rebuild

    def _count_stale(self, conn: psycopg.Connection) -> tuple[int, int, int]:
        g = self.gallery
        return conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT identity_id), COALESCE(SUM(CASE WHEN crop IS NOT NULL"
            " AND crop_geometry = %s THEN 1 ELSE 0 END), 0) FROM templates WHERE model_id <> %s",
            (g._geometry_key, g.model_id),
        ).fetchone()

    def _run(self) -> None:
        """LISTEN, catch up on every notification and every ``poll_s``; reconnect on loss."""
        g = self.gallery
        backoff = 0.2
        lost = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True,
                                     connect_timeout=connect_timeout(g.timeout_s)) as conn:
                    with g._pool.watchdog.guard(conn, time.monotonic() + g.timeout_s, g.timeout_s):
                        conn.execute(f"LISTEN {CHANNEL}")
                    if lost:  # the pool's idle connections may have died with the server
                        g._pool.drain()
                        lost = False
                    self.catch_up(FOLLOW_TIMEOUT_S)  # whatever committed while we were away
                    self._caught_up.set()
                    backoff = 0.2
                    polled = time.monotonic()
                    while not self._stop.is_set():
                        # Wait at most 1 s at a time, so stop() never waits for a long poll.
                        woke = any(conn.notifies(timeout=min(self.poll_s, 1.0), stop_after=1))
                        if woke or time.monotonic() - polled >= self.poll_s:
                            self.catch_up(FOLLOW_TIMEOUT_S)
                            polled = time.monotonic()
                        if time.monotonic() - self._pruned >= PRUNE_EVERY_S:
                            self._pruned = time.monotonic()
                            self.prune()
            except (psycopg.Error, GalleryUnavailable, TimeoutError) as e:
                if self._stop.is_set():
                    return
                if self._caught_up.is_set():
                    log.warning("gallery follower lost the database: %s; reconnecting", e)
                self._caught_up.clear()
                lost = True
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            except Exception:  # never let the follower die silently: not ready, retry
                log.exception("gallery follower failed; retrying")
                self._caught_up.clear()
                self._stop.wait(MAX_BACKOFF_S)


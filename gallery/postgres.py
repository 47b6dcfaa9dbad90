"""The gallery in PostgreSQL, shared by any number of server replicas.

PostgreSQL is the source of truth; each replica's FAISS index (:class:`IndexCache`)
is a cache of it. Every write that changes what search can find (an identity or a
template added or removed) appends rows to the ``changes`` table in the same
transaction, under one advisory lock, so change sequence numbers commit in order:
a replica that has applied every change up to ``seq`` has missed nothing below it.
The write notifies the other replicas (LISTEN/NOTIFY); each one then reads the
changes after the last sequence it applied (:class:`~facegate.gallery.pg_follow.Follower`),
and also polls, so a dropped notification or a reconnect only delays an update.

A write returns only after its transaction has committed, and after this replica's
index has caught up, so the replica that acknowledged an enrolment finds it at once.
Database errors (server down, restarting, pool exhausted) raise
:class:`GalleryUnavailable`: HTTP 503, nothing acknowledged, nothing half-written.
Every use of the database has a deadline, ``timeout_s`` (acquiring the connection
included, :mod:`~facegate.gallery.pg_deadline`), so a database that stops answering
costs a request that long, never more.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from facegate.core.align import ARCFACE_112, Geometry, as_geometry
from facegate.core.errors import DuplicateIdentity, UnknownIdentity, UnknownTemplate
from facegate.gallery.audit import CALLER, DECISIONS_PER_CALLER, best_effort, prepare_postgres
from facegate.gallery.cache import IndexCache
from facegate.gallery.crypto import PlainSealer, Sealer
from facegate.gallery.index_file import IndexFile
from facegate.gallery.integrity import Quarantine, integrity_error
from facegate.gallery.metadata import STORE_MAX_BYTES, STORE_MAX_DEPTH, check_metadata
from facegate.gallery.pg_deadline import LONG_READ_TIMEOUT_S, DeadlinePool
from facegate.gallery.pg_follow import Follower, GalleryUnavailable, unavailable
from facegate.gallery.pg_reads import PostgresReads
from facegate.gallery.pg_schema import CHANGES_LOCK, CHANNEL, migrate
from facegate.gallery.records import (
    REEMBED_BATCH,
    Identity,
    ReembedReport,
    Template,
    check_embeddings,
    decode_png,
    encode_png,
    geometry_key,
    per_row,
)
from facegate.gallery.sealed_rows import new_key, record_shred
from facegate.gallery.sealed_rows import prepare_postgres as prepare_sealing

__all__ = ["GalleryUnavailable", "PostgresGallery"]
log = logging.getLogger(__name__)


class PostgresGallery(PostgresReads):
    """The :class:`~facegate.gallery.protocol.GalleryStore` on a PostgreSQL database."""

    def __init__(
        self,
        url: str,
        *,
        model_id: str,
        embedding_size: int,
        index: str = "flat",
        keep_crops: bool = False,
        geometry: Geometry | dict | None = None,
        gpu: bool | None = None,
        decisions_per_identity: int = 200,
        sealer: Sealer | PlainSealer | None = None,
        pool_size: int = 8,
        timeout_s: float = 2.0,
        start_timeout_s: float = 30.0,
        poll_s: float = 2.0,
        index_file: str | Path | None = None,
    ) -> None:
        """Migrate the schema, build the index from the database, start following changes.

        ``pool_size``: connections this replica may hold (PostgreSQL's max_connections
        must cover every replica's pool plus one listener each); ``timeout_s``: the most
        one use of the database may take, waiting for a connection included, before 503;
        ``start_timeout_s``: for connecting and migrating at start (GalleryUnavailable
        past it); ``poll_s``: the catch-up read that runs even without a notification.
        ``sealer``: seals names, metadata, vectors and crops at rest (gallery/crypto.py).
        ``index_file``: this replica's local file of trained IVF centroids (gallery/index_file.py),
        so its restart skips k-means; None: each start trains."""
        self.url = url
        self.model_id = model_id
        self.embedding_size = embedding_size
        self.keep_crops = keep_crops
        self.geometry = as_geometry(geometry, ARCFACE_112)
        self._geometry_key = geometry_key(self.geometry)
        self.decisions_per_identity = decisions_per_identity
        self._sealer = sealer or PlainSealer()
        self._sealer.loader = self._wrapped_key
        self._cache = IndexCache(embedding_size, index, gpu=gpu, index_file=None if index_file is None
                                 else IndexFile(index_file, model_id=model_id, dim=embedding_size,
                                                sealer=self._sealer))
        self._quarantine = Quarantine(embedding_size, opener=self._sealer.open_vectors)
        self.timeout_s = timeout_s
        self._pool = DeadlinePool(url, size=pool_size, timeout_s=timeout_s, name="facegate-gallery")
        try:
            try:
                self._pool.open(start_timeout_s)
            except psycopg.OperationalError as e:  # PoolTimeout: no connection at all
                raise unavailable(e) from e
            with self._connection(start_timeout_s) as conn:
                migrate(conn)
                prepare_postgres(conn)  # the audit trail and decisions.caller (gallery/audit.py)
                prepare_sealing(conn, self._sealer)  # seals a gallery of before (sealed_rows.py)
        except BaseException:
            self._pool.close()
            raise
        self._follower = Follower(self, url, poll_s=poll_s)
        try:
            self._follower.start()  # builds the index before it returns
        except BaseException:
            self._pool.close()
            raise

    @property
    def ready(self) -> bool:
        """True while the index is known to be caught up with the database."""
        return self._follower.caught_up

    @property
    def applied_seq(self) -> int:
        """The last change sequence number this replica's index has applied."""
        return self._follower.seq

    # -- writes -------------------------------------------------------------------------

    def create_identity(
        self,
        identity_id: str | None,
        *,
        name: str | None = None,
        metadata: dict | None = None,
        embeddings: np.ndarray,
        sources: Sequence[str | None] | None = None,
        scores: Sequence[float | None] | None = None,
        crops: Any = None,
    ) -> Identity:
        """Create an identity with its first templates in one transaction."""
        metadata_text = check_metadata(
            metadata or {}, max_bytes=STORE_MAX_BYTES, max_depth=STORE_MAX_DEPTH
        )
        vectors = check_embeddings(embeddings, self.embedding_size)
        identity_id = identity_id or uuid.uuid4().hex
        created_at = time.time()
        rows = self._prepare_templates(identity_id, vectors, sources, scores, crops)
        with self._write() as conn:
            wrapped, key = new_key(conn, "%s", self._sealer, identity_id)
            inserted = conn.execute(
                "INSERT INTO identities (identity_id, name, metadata, created_at, sealed_key)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (identity_id, self._sealer.seal_text(identity_id, "name", name, key),
                 self._sealer.seal_text(identity_id, "metadata", metadata_text, key),
                 created_at, wrapped),
            ).rowcount
            if not inserted:
                raise DuplicateIdentity(f"identity {identity_id!r} already exists")
            _change(conn, "identity", identity_id)
            templates = self._insert_templates(conn, rows, key)
            self._sealer.adopt(identity_id, key)  # before the commit: the follower opens it
        return Identity(identity_id, name, dict(metadata or {}), created_at, tuple(templates))

    def add_templates(
        self,
        identity_id: str,
        embeddings: np.ndarray,
        *,
        sources: Sequence[str | None] | None = None,
        scores: Sequence[float | None] | None = None,
        crops: Any = None,
    ) -> list[Template]:
        vectors = check_embeddings(embeddings, self.embedding_size)
        rows = self._prepare_templates(identity_id, vectors, sources, scores, crops)
        with self._write() as conn:
            self._require_identity(conn, identity_id)
            return self._insert_templates(conn, rows)

    def delete_identity(self, identity_id: str) -> None:
        with self._write() as conn:
            self._require_identity(conn, identity_id)
            for (row_id,) in conn.execute(
                "DELETE FROM templates WHERE identity_id = %s RETURNING row_id", (identity_id,)
            ).fetchall():
                _change(conn, "untemplate", identity_id, row_id)
            leaf = record_shred(conn, "%s", identity_id)
            conn.execute("DELETE FROM identities WHERE identity_id = %s", (identity_id,))
            _change(conn, "unidentity", identity_id)
        self._sealer.forget(identity_id)
        self._sealer.shred([] if leaf is None else [leaf])  # other replicas: as they follow

    def delete_template(self, identity_id: str, template_id: str) -> None:
        with self._write() as conn:
            self._require_identity(conn, identity_id)
            row = conn.execute(
                "DELETE FROM templates WHERE identity_id = %s AND template_id = %s"
                " RETURNING row_id",
                (identity_id, template_id),
            ).fetchone()
            if row is None:
                raise UnknownTemplate(f"identity {identity_id!r} has no template {template_id!r}")
            _change(conn, "untemplate", identity_id, row[0])

    @best_effort  # a full or unreachable database never fails the verification (audit.py)
    def record_decision(
        self, identity_id: str, similarity: float, accepted: bool, route: str
    ) -> None:
        """Log an observed verify decision; only the last `decisions_per_identity` are kept.

        Of those, the last DECISIONS_PER_CALLER of the calling key (gallery/audit.py).
        Changes nothing search sees, so it takes no change-sequence lock."""
        caller = CALLER.get()
        try:
            with self._connection() as conn, conn.transaction():
                conn.execute(
                    "INSERT INTO decisions (identity_id, similarity, accepted, route, created_at,"
                    " caller) VALUES (%s, %s, %s, %s, %s, %s)",
                    (identity_id, float(similarity), bool(accepted), route, time.time(), caller),
                )
                conn.execute(
                    "DELETE FROM decisions WHERE identity_id = %s AND caller IS NOT DISTINCT FROM %s"
                    " AND row_id <= (SELECT row_id FROM decisions WHERE identity_id = %s AND caller"
                    " IS NOT DISTINCT FROM %s ORDER BY row_id DESC LIMIT 1 OFFSET %s)",
                    (identity_id, caller, identity_id, caller, DECISIONS_PER_CALLER),
                )
                conn.execute(
                    "DELETE FROM decisions WHERE identity_id = %s AND row_id <= ("
                    " SELECT row_id FROM decisions WHERE identity_id = %s"
                    " ORDER BY row_id DESC LIMIT 1 OFFSET %s)",
                    (identity_id, identity_id, self.decisions_per_identity),
                )
        except psycopg.errors.ForeignKeyViolation:
            raise UnknownIdentity(f"unknown identity {identity_id!r}") from None

    def reembed(self, embed_fn: Callable[[np.ndarray], np.ndarray]) -> ReembedReport:
        """Re-embed the kept crops of other-model templates (as the SQLite gallery does).

        Run once for the whole deployment, from any one machine: each batch is one
        transaction whose changes move the templates in every replica's index (out of
        replicas still on the old model, into those on this one)."""
        with self._connection(LONG_READ_TIMEOUT_S) as conn:
            rows = conn.execute(
                "SELECT row_id, identity_id, crop, template_id FROM templates WHERE model_id <> %s"
                " AND crop IS NOT NULL AND crop_geometry = %s ORDER BY row_id",
                (self.model_id, self._geometry_key),
            ).fetchall()
        for start in range(0, len(rows), REEMBED_BATCH):
            batch = rows[start : start + REEMBED_BATCH]
            vectors = check_embeddings(
                embed_fn(np.stack([decode_png(self._sealer.open(i, f"crop:{t}", crop))
                                   for _, i, crop, t in batch])), self.embedding_size
            )
            if len(vectors) != len(batch):
                raise ValueError(f"embed_fn gave {len(vectors)} rows for {len(batch)}")
            with self._write() as conn:
                for (row_id, identity_id, _, t), vector in zip(batch, vectors, strict=True):
                    conn.execute(
                        "UPDATE templates SET embedding = %s, dim = %s, model_id = %s"
                        " WHERE row_id = %s",
                        (self._sealer.seal(identity_id, f"embedding:{t}", vector.tobytes()),
                         len(vector), self.model_id, row_id),
                    )
                    _change(conn, "untemplate", identity_id, row_id)
                    _change(conn, "template", identity_id, row_id)
        with self._connection() as conn:
            return self._reembed_report(conn, len(rows))

    def close(self) -> None:
        self._follower.stop()
        self._pool.close()

    def __enter__(self) -> PostgresGallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    @contextmanager
    def _connection(self, timeout_s: float | None = None) -> Iterator[psycopg.Connection]:
        """A pooled connection for one use of at most ``timeout_s`` (default the gallery's);
        database trouble, or no answer in time, becomes GalleryUnavailable (503)."""
        try:
            with self._pool.connection(timeout_s) as conn:
                yield conn
        except GalleryUnavailable:
            raise
        except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as e:
            raise unavailable(e) from e
        except psycopg.errors.ForeignKeyViolation:  # an unknown identity: the caller says so
            raise
        except psycopg.IntegrityError as e:  # a constraint no sound gallery breaks
            raise integrity_error(e) from e

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection]:
        """A transaction that may append changes; returns once committed and applied here.

        The advisory lock makes change sequence numbers commit in order (see module doc);
        the notification is delivered by PostgreSQL only if the transaction commits."""
        with self._connection() as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
                yield conn
                conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        try:
            self._follower.catch_up()  # read-your-writes on this replica
        except GalleryUnavailable as e:  # committed: the follower applies it on reconnect
            log.warning("write committed but not yet applied to this replica's index: %s", e)

    def _prepare_templates(
        self,
        identity_id: str,
        vectors: np.ndarray,
        sources: Sequence[str | None] | None,
        scores: Sequence[float | None] | None,
        crops: Any,
    ) -> list[tuple]:
        """Insert rows for each vector (crops encoded outside the transaction)."""
        n = len(vectors)
        sources, scores = per_row(sources, n, "sources"), per_row(scores, n, "scores")
        kept = per_row(crops, n, "crops") if self.keep_crops else [None] * n
        out = []
        for vector, source, score, crop in zip(vectors, sources, scores, kept, strict=True):
            png = None if crop is None else encode_png(crop, self.geometry)
            template = Template(
                uuid.uuid4().hex, identity_id, time.time(), source,
                None if score is None else float(score),
            )
            out.append((template, vector, png))
        return out

    def _insert_templates(
        self, conn: psycopg.Connection, rows: list[tuple], key: object = None
    ) -> list[Template]:
        """Insert prepared rows, sealed with the identity's key (``key`` for a new one)."""
        out = []
        for template, vector, png in rows:
            sealed_vector, sealed_png = (
                self._sealer.seal(template.identity_id, f"{what}:{template.template_id}", data, key)
                for what, data in (("embedding", vector.tobytes()), ("crop", png))
            )
            (row_id,) = conn.execute(
                "INSERT INTO templates (template_id, identity_id, model_id, dim, embedding,"
                " created_at, source, score, crop, crop_geometry)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING row_id",
                (
                    template.template_id, template.identity_id, self.model_id, len(vector),
                    sealed_vector, template.created_at,
                    self._sealer.seal_text(template.identity_id, f"source:{template.template_id}",
                                           template.source, key),
                    template.score,
                    sealed_png, None if png is None else self._geometry_key,
                ),
            ).fetchone()
            _change(conn, "template", template.identity_id, row_id)
            out.append(template)
        return out

    def _wrapped_key(self, identity_id: str) -> bytes | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT sealed_key FROM identities WHERE identity_id = %s", (identity_id,)
            ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def _require_identity(self, conn: psycopg.Connection, identity_id: str) -> None:
        if (
            conn.execute(
                "SELECT 1 FROM identities WHERE identity_id = %s FOR UPDATE", (identity_id,)
            ).fetchone()
            is None
        ):
            raise UnknownIdentity(f"unknown identity {identity_id!r}")


def _change(conn: psycopg.Connection, op: str, identity_id: str, row_id: int | None = None) -> None:
    conn.execute(
        "INSERT INTO changes (op, identity_id, row_id) VALUES (%s, %s, %s)",
        (op, identity_id, row_id),
    )

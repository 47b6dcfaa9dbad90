"""The durable gallery: identities and their templates in SQLite, searched through FAISS.

SQLite (WAL, ``synchronous=FULL``, foreign keys on) is the source of truth; the FAISS
index (`facegate.gallery.index.TemplateIndex`) is rebuilt from it at open and holds
only templates of the current ``model_id``. A write method returns only after its
transaction has committed, so an acknowledged enrolment survives a crash or kill -9.

Concurrency: one writer at a time (a lock around every write transaction and the
index update that follows it) and many readers (each thread reads SQLite through its
own connection, WAL gives it a consistent snapshot; the index has its own RW lock).

Kept crops (``keep_crops=True``) are stored with the geometry they were made in (the
gallery's ``geometry``, the bundle's); :meth:`Gallery.reembed` re-embeds only those that
fit the current model's geometry. Schema 1 files (before crops recorded it) are
migrated in place at open: their crops were all ArcFace-template 112x112 crops.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from facegate.core.align import ARCFACE_112, Geometry, as_geometry
from facegate.core.errors import DuplicateIdentity, UnknownIdentity, UnknownTemplate
from facegate.gallery.audit import CALLER, DECISIONS_PER_CALLER, best_effort, prepare_sqlite
from facegate.gallery.cache import IndexCache
from facegate.gallery.crypto import PlainSealer, Sealer
from facegate.gallery.index_file import IndexFile
from facegate.gallery.integrity import Quarantine, integrity_error
from facegate.gallery.metadata import STORE_MAX_BYTES, STORE_MAX_DEPTH, check_metadata
from facegate.gallery.opening import check_sqlite_file
from facegate.gallery.records import (
    REEMBED_BATCH,
    Candidate,
    Identity,
    ReembedReport,
    Template,
    check_embeddings,
    decode_png,
    encode_png,
    geometry_key,
    mismatch_message,
    per_row,
)
from facegate.gallery.sealed_rows import load_keys, new_key, record_shred
from facegate.gallery.sealed_rows import prepare_sqlite as prepare_sealing
from facegate.gallery.sqlite_reads import SqliteReads
from facegate.gallery.sqlite_schema import SCHEMA, SCHEMA_VERSION, migrate
from tqdm import tqdm

__all__ = ["Candidate", "Gallery", "Identity", "ReembedReport", "Template"]
log = logging.getLogger(__name__)


class Gallery(SqliteReads):
    """Enrolled identities, durable in the SQLite file at `path`, searchable by embedding."""

    def __init__(
        self,
        path: str | Path,
        *,
        model_id: str,
        embedding_size: int,
        index: str = "flat",
        keep_crops: bool = False,
        geometry: Geometry | dict | None = None,
        gpu: bool | None = None,
        decisions_per_identity: int = 200,
        sealer: Sealer | PlainSealer | None = None,
        index_file: str | Path | None = None,
    ) -> None:
        """``geometry``: the model's crop geometry (``Bundle.geometry``; default ArcFace
        112x112, as for a bundle without one): kept crops must be in it, and
        :meth:`reembed` re-embeds only kept crops made in it. ``sealer``: seals names,
        metadata, vectors and crops at rest (gallery/crypto.py; plaintext without one).
        ``index_file``: trained IVF centroids (gallery/index_file.py); default beside the
        gallery, ``<path>.ivf``."""
        self.path = Path(path)
        self.model_id = model_id
        self.embedding_size = embedding_size
        self.keep_crops = keep_crops
        self.geometry = as_geometry(geometry, ARCFACE_112)
        self._geometry_key = geometry_key(self.geometry)
        self.decisions_per_identity = decisions_per_identity
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._sealer = sealer or PlainSealer()
        self._sealer.loader = self._wrapped_key
        check_sqlite_file(self.path, SCHEMA_VERSION)  # empty, foreign, damaged, newer: refused
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            migrate(db, self.path)
            prepare_sqlite(db)  # the audit trail and decisions.caller (gallery/audit.py)
            prepare_sealing(db, self._sealer)  # seals a gallery of before (gallery/sealed_rows.py)
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('model_id', ?)", (model_id,)
            )
        trained = IndexFile(index_file or f"{self.path}.ivf", model_id=model_id,
                            dim=embedding_size, sealer=self._sealer)
        self._cache = IndexCache(embedding_size, index, gpu=gpu, index_file=trained)
        self._index = self._cache.index
        self._quarantine = Quarantine(embedding_size, opener=self._sealer.open_vectors)
        self._stale_templates = 0
        self._stale_identities = 0
        self._stale_reembeddable = 0
        self._reload()

    @property
    def ready(self) -> bool:
        """Always True: the index is updated in the same call as each commit."""
        return True

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
        crops: np.ndarray | Sequence[np.ndarray] | None = None,
    ) -> Identity:
        """Create an identity with its first templates in one transaction.

        ``metadata`` is checked first (MetadataError): the gallery never stores a value
        it could not read back."""
        metadata_text = check_metadata(
            metadata or {}, max_bytes=STORE_MAX_BYTES, max_depth=STORE_MAX_DEPTH
        )
        vectors = self._check_embeddings(embeddings)
        identity_id = identity_id or uuid.uuid4().hex
        created_at = time.time()
        with self._write_lock:
            with self._transaction() as db:
                wrapped, key = new_key(db, "?", self._sealer, identity_id)
                try:
                    db.execute(
                        "INSERT INTO identities(identity_id, name, metadata, created_at,"
                        " sealed_key) VALUES (?, ?, ?, ?, ?)",
                        (identity_id, self._sealer.seal_text(identity_id, "name", name, key),
                         self._sealer.seal_text(identity_id, "metadata", metadata_text, key),
                         created_at, wrapped),
                    )
                except sqlite3.IntegrityError as e:
                    if "UNIQUE" not in str(e):
                        raise integrity_error(e) from e
                    raise DuplicateIdentity(f"identity {identity_id!r} already exists") from None
                rows = self._insert_templates(
                    db, identity_id, vectors, sources, scores, crops, key=key
                )
            self._sealer.adopt(identity_id, key)
            self._cache.set_name(identity_id, name)
            self._index_rows(rows, vectors)
        return Identity(
            identity_id, name, dict(metadata or {}), created_at, tuple(t for _, t in rows)
        )

    def add_templates(
        self,
        identity_id: str,
        embeddings: np.ndarray,
        *,
        sources: Sequence[str | None] | None = None,
        scores: Sequence[float | None] | None = None,
        crops: np.ndarray | Sequence[np.ndarray] | None = None,
    ) -> list[Template]:
        vectors = self._check_embeddings(embeddings)
        with self._write_lock:
            with self._transaction() as db:
                self._require_identity(db, identity_id)
                rows = self._insert_templates(db, identity_id, vectors, sources, scores, crops)
            self._index_rows(rows, vectors)
        return [t for _, t in rows]

    def delete_identity(self, identity_id: str) -> None:
        with self._write_lock:
            with self._transaction() as db:
                self._require_identity(db, identity_id)
                row_ids = [
                    r
                    for (r,) in db.execute(
                        "SELECT row_id FROM templates WHERE identity_id = ?", (identity_id,)
                    )
                ]
                leaf = record_shred(db, "?", identity_id)
                db.execute("DELETE FROM identities WHERE identity_id = ?", (identity_id,))
                self._count_stale(db)
            self._sealer.forget(identity_id)
            self._sealer.shred([] if leaf is None else [leaf])  # before the delete returns
            self._shred()
            self._cache.drop_identity(identity_id)
            self._unindex_rows(row_ids)
            self._quarantine.forget(row_ids)

    def delete_template(self, identity_id: str, template_id: str) -> None:
        with self._write_lock:
            with self._transaction() as db:
                self._require_identity(db, identity_id)
                row = db.execute(
                    "SELECT row_id FROM templates WHERE identity_id = ? AND template_id = ?",
                    (identity_id, template_id),
                ).fetchone()
                if row is None:
                    raise UnknownTemplate(
                        f"identity {identity_id!r} has no template {template_id!r}"
                    )
                db.execute("DELETE FROM templates WHERE row_id = ?", row)
                self._count_stale(db)
            self._shred()
            self._unindex_rows([row[0]])
            self._quarantine.forget([row[0]])

    @best_effort  # a full disk never fails the verification (gallery/audit.py)
    def record_decision(
        self, identity_id: str, similarity: float, accepted: bool, route: str
    ) -> None:
        """Log an observed verify decision; only the last `decisions_per_identity` are kept,
        and of those the last DECISIONS_PER_CALLER of the calling key (gallery/audit.py)."""
        caller = CALLER.get()
        with self._write_lock:
            with self._transaction() as db:
                try:
                    db.execute(
                        "INSERT INTO decisions(identity_id, similarity, accepted, route,"
                        " created_at, caller) VALUES (?, ?, ?, ?, ?, ?)",
                        (identity_id, float(similarity), int(bool(accepted)), route, time.time(),
                         caller),
                    )
                except sqlite3.IntegrityError as e:
                    if "FOREIGN KEY" not in str(e):
                        raise integrity_error(e) from e
                    raise UnknownIdentity(f"unknown identity {identity_id!r}") from None
                db.execute(
                    "DELETE FROM decisions WHERE identity_id = ? AND caller IS ? AND row_id <= ("
                    " SELECT row_id FROM decisions WHERE identity_id = ? AND caller IS ?"
                    " ORDER BY row_id DESC LIMIT 1 OFFSET ?)",
                    (identity_id, caller, identity_id, caller, DECISIONS_PER_CALLER),
                )
                db.execute(
                    "DELETE FROM decisions WHERE identity_id = ? AND row_id <= ("
                    " SELECT row_id FROM decisions WHERE identity_id = ?"
                    " ORDER BY row_id DESC LIMIT 1 OFFSET ?)",
                    (identity_id, identity_id, self.decisions_per_identity),
                )

    def reembed(self, embed_fn: Callable[[np.ndarray], np.ndarray]) -> ReembedReport:
        """Re-embed the kept crops of other-model templates with `embed_fn`; report what was done.

        `embed_fn` takes (N, S, S, 3) uint8 RGB crops in the gallery's ``geometry`` and
        returns (N, D) L2-normalised embeddings of the current model. Only crops kept in
        that geometry are re-embedded; crops of another geometry (e.g. ArcFace 112 crops
        for a dlib-chip model) are refused, and they and templates without a kept crop
        stay stale (search keeps raising ModelMismatch until they are re-enrolled or
        deleted); the report counts them and :meth:`ReembedReport.describe` says so.
        """
        with self._write_lock:
            rows = self._writer.execute(
                "SELECT row_id, identity_id, template_id, crop FROM templates WHERE model_id != ?"
                " AND crop IS NOT NULL AND crop_geometry = ? ORDER BY row_id",
                (self.model_id, self._geometry_key),
            ).fetchall()
            try:
                for start in tqdm(
                    range(0, len(rows), REEMBED_BATCH),
                    desc="re-embed",
                    unit="batch",
                    disable=not rows,
                ):
                    batch = rows[start : start + REEMBED_BATCH]
                    vectors = self._check_embeddings(
                        embed_fn(np.stack([
                            decode_png(self._sealer.open(i, f"crop:{t}", blob))
                            for _, i, t, blob in batch
                        ]))
                    )
                    if len(vectors) != len(batch):
                        raise ValueError(f"embed_fn gave {len(vectors)} rows for {len(batch)}")
                    with self._transaction() as db:
                        db.executemany(
                            "UPDATE templates SET embedding = ?, dim = ?, model_id = ?"
                            " WHERE row_id = ?",
                            [
                                (self._sealer.seal(i, f"embedding:{t}", v.tobytes()), len(v),
                                 self.model_id, r)
                                for (r, i, t, _), v in zip(batch, vectors, strict=True)
                            ],
                        )
            finally:
                if rows:
                    self._reload()
            return self._reembed_report(self._writer, len(rows))

    def reembed_status(self) -> ReembedReport:
        """What :meth:`reembed` can do now (``reembedded`` = 0); changes nothing."""
        return self._reembed_report(self._reader(), 0)

    # -- reads --------------------------------------------------------------------------

    def close(self) -> None:
        with self._write_lock, self._connections_lock:
            self._closed = True
            for db in self._connections:
                db.close()
            self._connections.clear()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        with self._connections_lock:
            if self._closed:
                raise RuntimeError("gallery is closed")
            db = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA secure_delete=ON")  # deleted rows are zeroed, not left in pages
            self._connections.append(db)
            return db

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (WAL readers see the last committed snapshot)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the writer connection; committed (durably) on exit."""
        db = self._writer
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _check_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return check_embeddings(embeddings, self.embedding_size)

    def _insert_templates(
        self,
        db: sqlite3.Connection,
        identity_id: str,
        vectors: np.ndarray,
        sources: Sequence[str | None] | None,
        scores: Sequence[float | None] | None,
        crops: np.ndarray | Sequence[np.ndarray] | None,
        key: object = None,
    ) -> list[tuple[int, Template]]:
        """Insert one template per row of `vectors` (sealed with the identity's key, or
        ``key`` for a new identity); returns (row id, Template) pairs."""
        n = len(vectors)
        sources = per_row(sources, n, "sources")
        scores = per_row(scores, n, "scores")
        kept_crops = per_row(crops, n, "crops") if self.keep_crops else [None] * n
        kept = [None if c is None else encode_png(c, self.geometry) for c in kept_crops]
        out: list[tuple[int, Template]] = []
        for vector, source, score, crop in zip(vectors, sources, scores, kept, strict=True):
            template = Template(
                uuid.uuid4().hex,
                identity_id,
                time.time(),
                source,
                None if score is None else float(score),
            )
            cursor = db.execute(
                "INSERT INTO templates(template_id, identity_id, model_id, dim, embedding,"
                " created_at, source, score, crop, crop_geometry)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    template.template_id,
                    identity_id,
                    self.model_id,
                    len(vector),
                    self._sealer.seal(identity_id, f"embedding:{template.template_id}",
                                      vector.tobytes(), key),
                    template.created_at,
                    self._sealer.seal_text(identity_id, f"source:{template.template_id}",
                                           source, key),
                    template.score,
                    self._sealer.seal(identity_id, f"crop:{template.template_id}", crop, key),
                    None if crop is None else self._geometry_key,
                ),
            )
            if cursor.lastrowid is None:
                raise RuntimeError("SQLite returned no row id for an inserted template")
            out.append((cursor.lastrowid, template))
        return out

    def _index_rows(self, rows: list[tuple[int, Template]], vectors: np.ndarray) -> None:
        """After commit: make the new templates searchable."""
        keys = [(r, t.identity_id, t.template_id) for r, t in rows]
        if self._cache.add(keys, vectors):
            self._rebuild_index()

    def _unindex_rows(self, row_ids: list[int]) -> None:
        """After commit: drop deleted templates from search."""
        if self._cache.remove(row_ids):
            self._rebuild_index()

    def _reload(self) -> None:
        """Rebuild names, id map, stale counts and the index from SQLite."""
        db = self._writer
        self._count_stale(db)
        self._rebuild_index()

    def _shred(self) -> None:
        """After a delete: copy the WAL into the file (whose freed pages secure_delete has
        zeroed) and truncate it, so no deleted row survives in the -wal while we run. The
        delete has committed: a checkpoint that fails (full disk) is retried by the next."""
        try:
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            log.warning("WAL checkpoint after a delete failed (%s); the next delete retries it", e)

    def _wrapped_key(self, identity_id: str) -> bytes | None:
        row = self._reader().execute(
            "SELECT sealed_key FROM identities WHERE identity_id = ?", (identity_id,)
        ).fetchone()
        return None if row is None else row[0]

    def _rebuild_index(self) -> None:
        db = self._writer
        load_keys(db, "?", self._sealer)
        rows = db.execute(
            "SELECT row_id, identity_id, template_id, embedding FROM templates"
            " WHERE model_id = ? ORDER BY row_id",
            (self.model_id,),
        ).fetchall()
        keys, vectors = self._quarantine.screen(
            [(r, i, t) for r, i, t, _ in rows], [b for *_, b in rows], full=True
        )
        names = {i: self._sealer.open_text(i, "name", n)
                 for i, n in db.execute("SELECT identity_id, name FROM identities")}
        self._cache.build(names, keys, vectors)

    def _count_stale(self, db: sqlite3.Connection) -> None:
        self._stale_templates, self._stale_identities, self._stale_reembeddable = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT identity_id),"
            " COALESCE(SUM(crop IS NOT NULL AND crop_geometry = ?), 0)"
            " FROM templates WHERE model_id != ?",
            (self._geometry_key, self.model_id),
        ).fetchone()

    def _mismatch_message(self) -> str:
        return mismatch_message(
            self.model_id,
            self.geometry,
            self._stale_templates,
            self._stale_identities,
            self._stale_reembeddable,
            command="`facegate gallery reembed --bundle BUNDLE --gallery GALLERY` (server stopped)",
            fresh="or start with a fresh gallery file",
        )

    def _reembed_report(self, db: sqlite3.Connection, reembedded: int) -> ReembedReport:
        groups = db.execute(
            "SELECT crop IS NOT NULL, crop_geometry, COUNT(*) FROM templates"
            " WHERE model_id != ? GROUP BY 1, 2",
            (self.model_id,),
        ).fetchall()
        stale_identities, blocked_identities = db.execute(
            "SELECT COUNT(DISTINCT identity_id), COUNT(DISTINCT CASE WHEN crop IS NULL"
            " OR crop_geometry IS NULL OR crop_geometry != ? THEN identity_id END)"
            " FROM templates WHERE model_id != ?",
            (self._geometry_key, self.model_id),
        ).fetchone()
        return ReembedReport.from_counts(
            self.model_id, self.geometry, self._geometry_key, reembedded, groups,
            stale_identities, blocked_identities,
        )

    def _require_identity(self, db: sqlite3.Connection, identity_id: str) -> None:
        if (
            db.execute("SELECT 1 FROM identities WHERE identity_id = ?", (identity_id,)).fetchone()
            is None
        ):
            raise UnknownIdentity(f"unknown identity {identity_id!r}")

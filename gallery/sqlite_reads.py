"""Reads of the SQLite gallery: search from the index, the rest from this thread's
read connection (WAL gives it the last committed snapshot without blocking the writer)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import numpy as np
from facegate.core.errors import ModelMismatch, UnknownIdentity
from facegate.gallery.cache import IndexCache
from facegate.gallery.crypto import PlainSealer, Sealer, open_identity_rows
from facegate.gallery.index import TemplateIndex
from facegate.gallery.integrity import Quarantine, QuarantinedTemplate
from facegate.gallery.metadata import load_stored_metadata
from facegate.gallery.records import Candidate, Identity, Template


class SqliteReads:
    """Read methods of :class:`~facegate.gallery.store.Gallery`."""

    model_id: str
    embedding_size: int
    keep_crops: bool
    _cache: IndexCache
    _index: TemplateIndex
    _quarantine: Quarantine
    _sealer: Sealer | PlainSealer
    _stale_templates: int
    _stale_identities: int
    _reader: Callable[[], sqlite3.Connection]
    _mismatch_message: Callable[[], str]
    _require_identity: Callable[[sqlite3.Connection, str], None]

    def get_identity(self, identity_id: str) -> Identity:
        db = self._reader()
        row = db.execute(
            "SELECT identity_id, name, metadata, created_at FROM identities WHERE identity_id = ?",
            (identity_id,),
        ).fetchone()
        if row is None:
            raise UnknownIdentity(f"unknown identity {identity_id!r}")
        return self._identities(db, [row])[0]

    def list_identities(self, *, offset: int = 0, limit: int = 50) -> tuple[list[Identity], int]:
        """A page of identities in enrolment order, and the total count."""
        db = self._reader()
        total = db.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
        rows = db.execute(
            "SELECT identity_id, name, metadata, created_at FROM identities"
            " ORDER BY created_at, identity_id LIMIT ? OFFSET ?",
            (max(0, limit), min(max(0, offset), 2**62)),
        ).fetchall()
        return self._identities(db, rows), total

    def composition(self) -> dict[int, int]:
        """{templates per identity: identities} of the searchable (current-model) templates."""
        return self._cache.composition()

    def search(self, query: np.ndarray, k: int = 5) -> list[Candidate]:
        """The `k` identities whose best template is most similar to `query`, best first."""
        if self._stale_templates:
            raise ModelMismatch(self._mismatch_message())
        return self._cache.search(query, k)

    def identity_embeddings(self, identity_id: str) -> np.ndarray:
        """The current-model template embeddings of one identity, (N, D) float32, less
        quarantined ones (409 templates_quarantined when that leaves none)."""
        db = self._reader()
        self._require_identity(db, identity_id)
        rows = db.execute(
            "SELECT row_id, identity_id, template_id, embedding FROM templates"
            " WHERE identity_id = ? AND model_id = ? ORDER BY row_id",
            (identity_id, self.model_id),
        ).fetchall()
        return self._quarantine.identity_vectors(
            identity_id, [(r, i, t) for r, i, t, _ in rows], [b for *_, b in rows]
        )

    def embeddings(self) -> tuple[np.ndarray, list[str]]:
        """All usable current-model template embeddings (N, D) and the identity id of each
        row (quarantined ones left out)."""
        rows = (
            self._reader()
            .execute(
                "SELECT row_id, identity_id, template_id, embedding FROM templates"
                " WHERE model_id = ? ORDER BY row_id",
                (self.model_id,),
            )
            .fetchall()
        )
        keys, vectors = self._quarantine.screen(
            [(r, i, t) for r, i, t, _ in rows], [b for *_, b in rows]
        )
        return vectors, [i for _, i, _ in keys]

    def quarantined(self) -> list[QuarantinedTemplate]:
        """Stored templates found unusable (see gallery/integrity.py), oldest first."""
        return self._quarantine.rows()

    def decisions(self) -> dict[str, list[tuple[float, bool]]]:
        """Observed (similarity, accepted) decisions per identity, oldest first."""
        out: dict[str, list[tuple[float, bool]]] = {}
        for identity_id, sim, accepted in self._reader().execute(
            "SELECT identity_id, similarity, accepted FROM decisions ORDER BY row_id"
        ):
            out.setdefault(identity_id, []).append((sim, bool(accepted)))
        return out

    def stats(self) -> dict:
        db = self._reader()
        identities = db.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
        templates = db.execute("SELECT COUNT(*) FROM templates").fetchone()[0]
        return {
            "identities": identities,
            "templates": templates,
            "indexed_templates": len(self._index),
            "index": self._index.kind,
            "index_backend": self._index.backend,
            "gpu": self._index.on_gpu,
            "model_id": self.model_id,
            "embedding_size": self.embedding_size,
            "stale_templates": self._stale_templates,
            "stale_identities": self._stale_identities,
            "quarantined_templates": len(self._quarantine),
            "keep_crops": self.keep_crops,
        }

    def _identities(self, db: sqlite3.Connection, rows: list[tuple]) -> list[Identity]:
        """Identities for (identity_id, name, metadata, created_at) rows, with their templates."""
        templates: dict[str, list[Template]] = {row[0]: [] for row in rows}
        ids = list(templates)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for template_id, identity_id, created_at, source, score in db.execute(
                "SELECT template_id, identity_id, created_at, source, score FROM templates"
                f" WHERE identity_id IN ({marks}) ORDER BY row_id",
                chunk,
            ):
                source = self._sealer.open_text(identity_id, f"source:{template_id}", source)
                templates[identity_id].append(
                    Template(template_id, identity_id, created_at, source, score)
                )
        return [
            Identity(i, name, load_stored_metadata(meta), created_at, tuple(templates[i]))
            for i, name, meta, created_at in open_identity_rows(self._sealer, rows)
        ]

"""Reads of the PostgreSQL gallery: search from this replica's index, everything else
from the database (so listings, the consistency report and /metrics see the whole
shared gallery, whichever replica answers)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import numpy as np
import psycopg
from facegate.core.align import Geometry
from facegate.core.errors import ModelMismatch, UnknownIdentity
from facegate.gallery.crypto import PlainSealer, Sealer, open_identity_rows
from facegate.gallery.integrity import Quarantine, QuarantinedTemplate
from facegate.gallery.metadata import load_stored_metadata
from facegate.gallery.records import (
    Candidate,
    Identity,
    ReembedReport,
    Template,
    mismatch_message,
)

if TYPE_CHECKING:
    from facegate.gallery.cache import IndexCache
    from facegate.gallery.pg_follow import Follower


class PostgresReads:
    """Read methods of :class:`~facegate.gallery.postgres.PostgresGallery`."""

    model_id: str
    embedding_size: int
    geometry: Geometry
    keep_crops: bool
    _geometry_key: str
    _cache: IndexCache
    _follower: Follower
    _quarantine: Quarantine
    _sealer: Sealer | PlainSealer
    _connection: Callable[[], AbstractContextManager[psycopg.Connection]]

    def get_identity(self, identity_id: str) -> Identity:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT identity_id, name, metadata, created_at FROM identities"
                " WHERE identity_id = %s",
                (identity_id,),
            ).fetchone()
            if row is None:
                raise UnknownIdentity(f"unknown identity {identity_id!r}")
            return _identities(conn, self._sealer, open_identity_rows(self._sealer, [row]))[0]

    def list_identities(self, *, offset: int = 0, limit: int = 50) -> tuple[list[Identity], int]:
        """A page of identities in enrolment order, and the total count (one snapshot)."""
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            (total,) = conn.execute("SELECT COUNT(*) FROM identities").fetchone()
            rows = conn.execute(
                "SELECT identity_id, name, metadata, created_at FROM identities"
                " ORDER BY created_at, identity_id LIMIT %s OFFSET %s",
                (max(0, limit), min(max(0, offset), 2**62)),
            ).fetchall()
            return _identities(conn, self._sealer, open_identity_rows(self._sealer, rows)), total

    def composition(self) -> dict[int, int]:
        """{templates per identity: identities} of the searchable (current-model) templates."""
        return self._cache.composition()

    def search(self, query: np.ndarray, k: int = 5) -> list[Candidate]:
        """The `k` identities whose best template is most similar to `query`, best first.

        Answered from this replica's index; it lags the database by at most the
        propagation delay (docs/deploy.md)."""
        stale = self._follower.stale
        if stale[0]:
            raise ModelMismatch(
                mismatch_message(
                    self.model_id, self.geometry, *stale,
                    command="`facegate gallery reembed --bundle BUNDLE --gallery URL` once "
                    "(from any one machine, not per replica)",
                    fresh="or start with a fresh database",
                )
            )
        return self._cache.search(query, k)

    def identity_embeddings(self, identity_id: str) -> np.ndarray:
        """The current-model template embeddings of one identity, (N, D) float32, less
        quarantined ones (409 templates_quarantined when that leaves none)."""
        with self._connection() as conn:
            if not conn.execute(
                "SELECT 1 FROM identities WHERE identity_id = %s", (identity_id,)
            ).fetchone():
                raise UnknownIdentity(f"unknown identity {identity_id!r}")
            rows = conn.execute(
                "SELECT row_id, identity_id, template_id, embedding FROM templates"
                " WHERE identity_id = %s AND model_id = %s ORDER BY row_id",
                (identity_id, self.model_id),
            ).fetchall()
        return self._quarantine.identity_vectors(
            identity_id, [(r, i, t) for r, i, t, _ in rows], [bytes(b) for *_, b in rows]
        )

    def embeddings(self) -> tuple[np.ndarray, list[str]]:
        """All usable current-model template embeddings (N, D) and the identity id of each
        row (quarantined ones left out)."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT row_id, identity_id, template_id, embedding FROM templates"
                " WHERE model_id = %s ORDER BY row_id",
                (self.model_id,),
            ).fetchall()
        keys, vectors = self._quarantine.screen(
            [(r, i, t) for r, i, t, _ in rows], [bytes(b) for *_, b in rows]
        )
        return vectors, [i for _, i, _ in keys]

    def quarantined(self) -> list[QuarantinedTemplate]:
        """Stored templates this replica found unusable (gallery/integrity.py), oldest first."""
        return self._quarantine.rows()

    def decisions(self) -> dict[str, list[tuple[float, bool]]]:
        """Observed (similarity, accepted) decisions per identity, oldest first."""
        out: dict[str, list[tuple[float, bool]]] = {}
        with self._connection() as conn:
            for identity_id, sim, accepted in conn.execute(
                "SELECT identity_id, similarity, accepted FROM decisions ORDER BY row_id"
            ):
                out.setdefault(identity_id, []).append((sim, bool(accepted)))
        return out

    def stats(self) -> dict:
        """The SQLite gallery's fields (counts from the database) plus this replica's
        change sequence position and readiness."""
        with self._connection() as conn:
            identities, templates = conn.execute(
                "SELECT (SELECT COUNT(*) FROM identities), (SELECT COUNT(*) FROM templates)"
            ).fetchone()
        stale_templates, stale_identities, _ = self._follower.stale
        index = self._cache.index
        return {
            "identities": identities,
            "templates": templates,
            "indexed_templates": len(index),
            "index": index.kind,
            "index_backend": index.backend,
            "gpu": index.on_gpu,
            "model_id": self.model_id,
            "embedding_size": self.embedding_size,
            "stale_templates": stale_templates,
            "stale_identities": stale_identities,
            "quarantined_templates": len(self._quarantine),
            "keep_crops": self.keep_crops,
            "backend": "postgresql",
            "applied_seq": self._follower.seq,
            "caught_up": self._follower.caught_up,
        }

    def reembed_status(self) -> ReembedReport:
        """What :meth:`reembed` can do now (``reembedded`` = 0); changes nothing."""
        with self._connection() as conn:
            return self._reembed_report(conn, 0)

    def _reembed_report(self, conn: psycopg.Connection, reembedded: int) -> ReembedReport:
        groups = conn.execute(
            "SELECT crop IS NOT NULL, crop_geometry, COUNT(*) FROM templates"
            " WHERE model_id <> %s GROUP BY 1, 2",
            (self.model_id,),
        ).fetchall()
        stale_identities, blocked_identities = conn.execute(
            "SELECT COUNT(DISTINCT identity_id), COUNT(DISTINCT CASE WHEN crop IS NULL"
            " OR crop_geometry IS NULL OR crop_geometry <> %s THEN identity_id END)"
            " FROM templates WHERE model_id <> %s",
            (self._geometry_key, self.model_id),
        ).fetchone()
        return ReembedReport.from_counts(
            self.model_id, self.geometry, self._geometry_key, reembedded, groups,
            stale_identities, blocked_identities,
        )


def _identities(conn: psycopg.Connection, sealer: Sealer | PlainSealer,
                rows: list[tuple]) -> list[Identity]:
    """Identities for (identity_id, name, metadata, created_at) rows, with their templates."""
    templates: dict[str, list[Template]] = {row[0]: [] for row in rows}
    if templates:
        for template_id, identity_id, created_at, source, score in conn.execute(
            "SELECT template_id, identity_id, created_at, source, score FROM templates"
            " WHERE identity_id = ANY(%s) ORDER BY row_id",
            (list(templates),),
        ):
            source = sealer.open_text(identity_id, f"source:{template_id}", source)
            templates[identity_id].append(Template(template_id, identity_id, created_at, source, score))
    return [
        Identity(i, name, load_stored_metadata(meta), created_at, tuple(templates[i]))
        for i, name, meta, created_at in rows
    ]

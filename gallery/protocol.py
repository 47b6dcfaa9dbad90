"""The one interface the server, the CLI and the consistency report use, whichever
database holds the gallery, and :func:`open_gallery`, which picks the backend from
``FACEGATE_GALLERY``: a ``postgresql://`` URL, or else a SQLite file path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from facegate.gallery.integrity import QuarantinedTemplate
from facegate.gallery.records import Candidate, Identity, ReembedReport, Template

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


class GalleryStore(Protocol):
    """Identities and templates, durable before a write returns, searchable by embedding."""

    model_id: str
    embedding_size: int

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
    ) -> Identity: ...

    def add_templates(
        self,
        identity_id: str,
        embeddings: np.ndarray,
        *,
        sources: Sequence[str | None] | None = None,
        scores: Sequence[float | None] | None = None,
        crops: Any = None,
    ) -> list[Template]: ...

    def delete_identity(self, identity_id: str) -> None: ...

    def delete_template(self, identity_id: str, template_id: str) -> None: ...

    def record_decision(
        self, identity_id: str, similarity: float, accepted: bool, route: str
    ) -> None: ...

    def reembed(self, embed_fn: Callable[[np.ndarray], np.ndarray]) -> ReembedReport: ...

    def reembed_status(self) -> ReembedReport: ...

    def get_identity(self, identity_id: str) -> Identity: ...

    def list_identities(
        self, *, offset: int = 0, limit: int = 50
    ) -> tuple[list[Identity], int]: ...

    def composition(self) -> dict[int, int]:
        """{n: identities with n searchable templates}: the gallery as open-set search sees it."""
        ...

    def search(self, query: np.ndarray, k: int = 5) -> list[Candidate]: ...

    def identity_embeddings(self, identity_id: str) -> np.ndarray: ...

    def embeddings(self) -> tuple[np.ndarray, list[str]]: ...

    def decisions(self) -> dict[str, list[tuple[float, bool]]]: ...

    def quarantined(self) -> list[QuarantinedTemplate]:
        """Stored templates whose vector failed the checks (never indexed or compared)."""
        ...

    def stats(self) -> dict: ...

    @property
    def ready(self) -> bool:
        """True when search answers from an index caught up with the database."""
        ...

    def close(self) -> None: ...


def open_gallery(location: str | Path, **options: Any) -> GalleryStore:
    """The SQLite :class:`~facegate.gallery.store.Gallery` for a path, the PostgreSQL
    :class:`~facegate.gallery.postgres.PostgresGallery` for a ``postgresql://`` URL.

    ``options`` are the common keywords (model_id, embedding_size, index, index_file,
    keep_crops, geometry, gpu, decisions_per_identity); PostgreSQL also takes ``pool_size`` and
    ``timeout_s``."""
    if is_postgres_url(location):
        from facegate.gallery.postgres import PostgresGallery

        return PostgresGallery(str(location), **options)
    from facegate.gallery.store import Gallery

    options.pop("pool_size", None)
    options.pop("timeout_s", None)
    return Gallery(location, **options)

"""Stored data is checked where it is read, not trusted.

A vector enters the gallery through :func:`~facegate.gallery.records.check_embeddings`,
but whoever can write the database (a file, a shared PostgreSQL) can also plant a row:
a template scaled x100 scores up to 100 against every probe (a universal match), NaN
compares false everywhere and turns sums into NaN, a short blob shifts every later row.
So every read of stored vectors goes through :meth:`Quarantine.screen`: a row that is
not finite, not ``embedding_size`` float32 values or not of unit norm (within
``NORM_TOLERANCE``) is left out (never indexed, never compared), logged once, counted
(``stats()``, ``/metrics``) and listed (``/v1/consistency``).

A database constraint that fails where none is expected is a damaged or tampered
database, reported as such (:class:`GalleryIntegrityError`), never as a missing identity.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from facegate.core.errors import FacegateError

log = logging.getLogger(__name__)
NORM_TOLERANCE = 1e-3


class QuarantinedTemplates(FacegateError):
    """Every stored template of the identity failed the vector checks: nothing to compare."""

    code = "templates_quarantined"
    status = 409


class GalleryIntegrityError(FacegateError):
    """A database constraint failed where the gallery expects none: a damaged database."""

    code = "gallery_integrity_error"
    status = 500


def integrity_error(error: BaseException) -> GalleryIntegrityError:
    return GalleryIntegrityError(
        f"the gallery database violates its own constraints ({error}); nothing was changed. "
        "Check the database for damage or tampering"
    )


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Per row of a float (N, D) array: finite and of unit L2 norm within NORM_TOLERANCE."""
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    return np.isfinite(vectors).all(axis=1) & (np.abs(norms - 1.0) <= NORM_TOLERANCE)


def vector_problems(blobs: Sequence[bytes], embedding_size: int) -> tuple[np.ndarray, list[str | None]]:
    """(N, D) float32 rows of ``blobs`` (zeros where unreadable) and, per row, what is wrong
    with it (None when it is a usable unit vector)."""
    width = 4 * embedding_size
    sized = [len(b) == width for b in blobs]
    vectors = np.zeros((len(blobs), embedding_size), np.float32)
    if any(sized):
        good = b"".join(b for b, ok in zip(blobs, sized, strict=True) if ok)
        vectors[np.flatnonzero(sized)] = np.frombuffer(good, np.float32).reshape(-1, embedding_size)
    unit = unit_rows(vectors)
    problems: list[str | None] = []
    for blob, ok, is_unit, row in zip(blobs, sized, unit, vectors, strict=True):
        if not ok:
            problems.append(f"{len(blob)} bytes, expected {width} ({embedding_size} float32)")
        elif not np.isfinite(row).all():
            problems.append("not finite (NaN or infinity)")
        elif not is_unit:
            problems.append(f"norm {float(np.linalg.norm(row.astype(np.float64))):.6g}, expected 1")
        else:
            problems.append(None)
    return vectors, problems


@dataclass(frozen=True)
class QuarantinedTemplate:
    row_id: int
    identity_id: str
    template_id: str
    reason: str

    def to_dict(self) -> dict:
        return {"identity_id": self.identity_id, "template_id": self.template_id,
                "reason": self.reason}


Key = tuple[int, str, str]  # (row id, identity id, template id)


class Quarantine:
    """The stored templates found unusable so far, by row id; safe from any thread."""

    def __init__(
        self, embedding_size: int,
        opener: Callable[[Sequence[Key], Sequence[bytes]], list[bytes]] | None = None,
    ) -> None:
        """``opener``: stored blobs to vector bytes (the sealer's, gallery/crypto.py; b""
        for one that fails to open, which is then quarantined like any unusable row)."""
        self.embedding_size = embedding_size
        self._opener = opener
        self._lock = threading.Lock()
        self._rows: dict[int, QuarantinedTemplate] = {}

    def screen(
        self, keys: Sequence[Key], blobs: Sequence[bytes], *, full: bool = False
    ) -> tuple[list[Key], np.ndarray]:
        """The keys and (n, D) float32 vectors of the usable rows; the others are recorded
        (and logged the first time). ``full``: these are all the rows (an index build), so
        the record is replaced rather than added to."""
        if self._opener is not None:
            blobs = self._opener(keys, blobs)
        vectors, problems = vector_problems(blobs, self.embedding_size)
        bad = [QuarantinedTemplate(k[0], k[1], k[2], p)
               for k, p in zip(keys, problems, strict=True) if p is not None]
        with self._lock:
            new = [q for q in bad if q.row_id not in self._rows]
            if full:
                self._rows = {}
            self._rows.update((q.row_id, q) for q in bad)
        for q in new:
            log.warning("template %s of identity %r quarantined: its stored vector is %s; "
                        "it is never matched (delete it and re-enrol)",
                        q.template_id, q.identity_id, q.reason)
        keep = [i for i, p in enumerate(problems) if p is None]
        return [keys[i] for i in keep], vectors[keep]

    def identity_vectors(
        self, identity_id: str, keys: Sequence[Key], blobs: Sequence[bytes]
    ) -> np.ndarray:
        """:meth:`screen` for one identity's templates; 409 when it has some and none is usable."""
        _, vectors = self.screen(keys, blobs)
        if keys and not len(vectors):
            raise QuarantinedTemplates(
                f"every template of identity {identity_id!r} ({len(keys)}) is quarantined: its "
                "stored vector is damaged (see /v1/consistency); delete them and re-enrol"
            )
        return vectors

    def forget(self, row_ids: Iterable[int]) -> None:
        """Deleted rows leave the record."""
        with self._lock:
            for row_id in row_ids:
                self._rows.pop(row_id, None)

    def rows(self) -> list[QuarantinedTemplate]:
        with self._lock:
            return sorted(self._rows.values(), key=lambda q: q.row_id)

    def __len__(self) -> int:
        return len(self._rows)

"""What both gallery stores hand out and share: records, the re-embed report, crop and
embedding checks, and the 409 message. SQL-free, so the SQLite and PostgreSQL stores
behave the same by construction."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from facegate.core.align import Geometry
from facegate.gallery.integrity import unit_rows

REEMBED_BATCH = 64

@dataclass(frozen=True)
class ReembedReport:
    """What :meth:`Gallery.reembed` did, or (:meth:`Gallery.reembed_status`) can do.

    Counts are of templates of another model than ``model_id`` ("stale" ones), except
    ``reembedded`` (done by this call) and the identity counts.
    """

    model_id: str
    geometry: Geometry  # the crops the current model takes
    reembedded: int  # templates re-embedded by this call (0 for reembed_status)
    reembeddable: int  # stale templates whose kept crop is in `geometry` (left to re-embed)
    other_geometry: dict[str, int]  # stale templates whose kept crop is in another geometry
    without_crop: int  # stale templates without a kept crop
    stale_identities: int  # identities that still hold stale templates
    blocked_identities: int  # identities holding a stale template that cannot be re-embedded

    @classmethod
    def from_counts(
        cls,
        model_id: str,
        geometry: Geometry,
        geometry_key: str,
        reembedded: int,
        groups: Iterable[tuple[bool, str | None, int]],
        stale_identities: int,
        blocked_identities: int,
    ) -> ReembedReport:
        """The report from a store's grouped count of stale templates: rows of (has a kept
        crop, the crop's geometry key, count), the same query in every backend."""
        reembeddable = without_crop = 0
        other: dict[str, int] = {}
        for has_crop, key, count in groups:
            if not has_crop:
                without_crop += count
            elif key == geometry_key:
                reembeddable += count
            else:
                label = geometry_label(key)
                other[label] = other.get(label, 0) + count
        return cls(
            model_id, geometry, reembedded, reembeddable, other, without_crop,
            stale_identities, blocked_identities,
        )

    @property
    def refused(self) -> int:
        """Kept crops refused because they are not in the current model's geometry."""
        return sum(self.other_geometry.values())

    @property
    def blocked(self) -> int:
        """Stale templates re-embedding cannot fix (other geometry or no crop)."""
        return self.refused + self.without_crop

    @property
    def stale(self) -> int:
        return self.reembeddable + self.blocked

    def describe(self) -> str:
        """What was done and, for what is left, what to do: plain sentences, one per line."""
        lines = []
        if self.reembedded:
            lines.append(
                f"re-embedded {self.reembedded} templates with model {self.model_id} "
                f"({self.geometry} crops)"
            )
        if self.reembeddable:
            lines.append(
                f"{self.reembeddable} templates have kept {self.geometry} crops and can be "
                "re-embedded (`facegate gallery reembed`)"
            )
        if self.refused:
            kinds = ", ".join(f"{n} {g}" for g, n in sorted(self.other_geometry.items()))
            lines.append(
                f"refused {self.refused} kept crops of another geometry ({kinds}): model "
                f"{self.model_id} takes {self.geometry} crops, which cannot be made from them"
            )
        if self.without_crop:
            lines.append(f"{self.without_crop} templates have no kept crop")
        if self.blocked:
            lines.append(
                f"re-enrol {self.blocked_identities} identities ({self.blocked} templates) from "
                "their photos (delete them and enrol again), or start with a fresh gallery file"
            )
        if not self.stale:
            lines.append(f"every template is of model {self.model_id}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Template:
    """One enrolled embedding of an identity (the vector itself stays in the store)."""

    template_id: str
    identity_id: str
    created_at: float
    source: str | None
    score: float | None


@dataclass(frozen=True)
class Identity:
    identity_id: str
    name: str | None
    metadata: dict = field(hash=False)
    created_at: float
    templates: tuple[Template, ...]


@dataclass(frozen=True)
class Candidate:
    """A search hit: an identity and the similarity of its best-matching template."""

    identity_id: str
    name: str | None
    similarity: float
    template_id: str


def check_embeddings(embeddings: np.ndarray, embedding_size: int) -> np.ndarray:
    """(N>=1, D) float32 C-contiguous rows, each finite and L2-normalised, or ValueError."""
    vectors = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or len(vectors) < 1 or vectors.shape[1] != embedding_size:
        raise ValueError(f"embeddings must be (N>=1, {embedding_size}), got {vectors.shape}")
    if not unit_rows(vectors).all():
        raise ValueError("embeddings must be finite and L2-normalised")
    return vectors


def mismatch_message(
    model_id: str,
    geometry: Geometry,
    stale_templates: int,
    stale_identities: int,
    reembeddable: int,
    *,
    command: str,
    fresh: str,
) -> str:
    """ModelMismatch's message: what is stale, then the way forward in one sentence."""
    stale = (
        f"{stale_identities} identities ({stale_templates} templates) were "
        f"enrolled with another model than {model_id!r}"
    )
    if reembeddable == stale_templates:
        return f"{stale}; their kept crops fit this model: run {command} to re-embed them"
    if reembeddable:
        return (
            f"{stale}; run {command} to re-embed the {reembeddable} whose kept crops fit this "
            f"model, then re-enrol the others from their photos, {fresh}"
        )
    return (
        f"{stale}; they have no kept crops this model can use ({geometry}), so "
        f"re-enrol them from their photos (delete and enrol again), {fresh}"
    )


def per_row(values: Sequence | np.ndarray | None, n: int, what: str) -> list:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} embeddings")
    return values


def geometry_key(geometry: Geometry) -> str:
    """How a kept crop's geometry is stored: its manifest form as canonical JSON."""
    return json.dumps(geometry.to_dict(), sort_keys=True, separators=(",", ":"))


def geometry_label(key: str | None) -> str:
    if key is None:
        return "unknown geometry"
    try:
        return str(Geometry.from_dict(json.loads(key)))
    except ValueError:  # json.JSONDecodeError is a ValueError
        return key


def encode_png(crop: np.ndarray, geometry: Geometry) -> bytes:
    crop = np.asarray(crop, dtype=np.uint8)
    if crop.shape != (geometry.size, geometry.size, 3):
        raise ValueError(
            f"a kept crop must be ({geometry.size}, {geometry.size}, 3) RGB ({geometry}), "
            f"got {crop.shape}"
        )
    ok, buf = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode crop of shape {crop.shape} as PNG")
    return buf.tobytes()


def decode_png(blob: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(blob, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("a kept crop is not a readable PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

"""Enrolment review (``FACEGATE_ENROL_REVIEW``): bad enrolment photos are where false
rejections come from, so each photo is checked before it becomes a template, and each
refused one says why with a stable code:

- ``no_face``, ``multiple_faces``: from the face path itself (every mode);
- ``face_too_small``: eyes closer than the mode's minimum (px in the photo);
- ``extreme_pose``: the nose far off the eye midpoint (yaw) or the eye line tilted (roll);
- ``low_quality``: the bundle's quality score (``core.quality``) under the score of its
  worst 2% (standard) or 5% (strict) of calibration photos;
- ``identity_conflict`` (strict): the photo matches another enrolled identity better than
  its own templates (and the request's other photos), or a search of the gallery would
  find it as another enrolled identity (at the gallery's open-set threshold): adding it
  would make two identities one person. It refuses some genuine photos (a look-alike
  scoring higher than the person's own photos) to catch nearly every other person's
  photo: docs/results.md measures both (``train.quality_eval.conflict_rates``).

Multi-photo enrolment keeps the good photos; the answer says how many more to take.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from facegate.core.errors import UnknownIdentity
from facegate.core.quality import REVIEW_RULES, QualityModel, ReviewRules, Signals
from facegate.gallery.protocol import GalleryStore
from facegate.server import schemas
from facegate.server.pipeline import PreparedFace
from facegate.server.services import Services

__all__ = ["REVIEW_CODES", "advice", "conflict", "review_face", "review_photos"]

REVIEW_CODES = ("no_face", "multiple_faces", "face_too_small", "extreme_pose", "low_quality",
                "identity_conflict")


def review_face(rules: ReviewRules, model: QualityModel | None, prepared: PreparedFace,
                stability: float) -> schemas.ErrorDetail | None:
    """Why one face should not be enrolled (size, pose, quality), or None."""
    face = prepared.face
    signals = Signals.of(prepared.crop, face.landmarks, stability, face.stage)
    if signals.eye_distance < rules.min_eye_distance:
        return schemas.ErrorDetail(code="face_too_small", message=(
            f"the eyes are {signals.eye_distance:.0f} px apart, under {rules.min_eye_distance:g}:"
            " move closer or use a larger photo"))
    if signals.yaw > rules.max_yaw or signals.roll > rules.max_roll:
        return schemas.ErrorDetail(code="extreme_pose", message=(
            f"the face is turned (yaw {signals.yaw:.2f} eye distances, roll "
            f"{np.degrees(signals.roll):.0f} degrees): face the camera"))
    if model is not None:
        quality, cut = model.assess(signals), model.cut(rules.quality_fraction)
        if quality.score < cut:
            weakest = min(quality.components, key=quality.components.__getitem__)
            return schemas.ErrorDetail(code="low_quality", message=(
                f"quality {quality.score:.3f} is under {cut:.3f} (the worst "
                f"{rules.quality_fraction:.0%} of calibration photos); weakest: {weakest}"))
    return None


def conflict(embedding: np.ndarray, own: np.ndarray, others: Sequence[tuple[str, float]],
             found_at: float) -> schemas.ErrorDetail | None:
    """Identity conflict of one photo: ``own`` (k, D) are its identity's other vectors
    (maybe none), ``others`` (identity id, similarity) the nearest other enrolled
    identities, ``found_at`` the gallery's search threshold (a photo over it is *found* as
    that person; a verify threshold would not do: at FAR 1% per identity, most genuine
    photos verify as one of 200 other people)."""
    own_best = float((own @ embedding).max()) if len(own) else None
    for other_id, similarity in others:
        if similarity >= found_at:
            return schemas.ErrorDetail(code="identity_conflict", message=(
                f"a search finds this photo as enrolled identity {other_id!r} (similarity "
                f"{similarity:.3f} >= the gallery's threshold {found_at:.3f}): it would make "
                "two identities one person"))
        if own_best is not None and similarity > own_best:
            return schemas.ErrorDetail(code="identity_conflict", message=(
                f"the photo matches enrolled identity {other_id!r} ({similarity:.3f}) better "
                f"than its own photos ({own_best:.3f}): is it the right person?"))
    return None


async def _conflicts(services: Services, identity_id: str | None, embeddings: np.ndarray,
                     ) -> list[schemas.ErrorDetail | None]:
    """Each photo's identity conflict, if any (the request's other photos count as its own)."""
    def gather(g: GalleryStore) -> tuple[np.ndarray | None, list, dict[int, int]]:
        try:
            own = g.identity_embeddings(identity_id) if identity_id is not None else None
        except UnknownIdentity:
            own = None
        hits = [[h for h in g.search(e, 3) if h.identity_id != identity_id] for e in embeddings]
        return own, hits, g.composition()

    own, hits, composition = await services.gallery.call(gather)
    found_at = services.thresholds.search(composition).threshold
    out = []
    for i, e in enumerate(embeddings):
        mine = [np.delete(embeddings, i, axis=0)] + ([own] if own is not None else [])
        others = [(h.identity_id, h.similarity) for h in hits[i]]
        out.append(conflict(e, np.concatenate(mine), others, found_at))
    return out


async def review_photos(services: Services, identity_id: str | None,
                        prepared: Sequence[PreparedFace], embeddings: np.ndarray,
                        stability: np.ndarray) -> list[schemas.ErrorDetail | None]:
    """Each prepared photo's refusal under the server's review mode, or None to keep it."""
    mode = services.settings.enrol_review
    if mode == "off" or not prepared:
        return [None] * len(prepared)
    rules = REVIEW_RULES[mode]
    found = [review_face(rules, services.quality_model, p, float(s))
             for p, s in zip(prepared, stability, strict=True)]
    if rules.conflicts:
        kept = [i for i, r in enumerate(found) if r is None]
        if kept:
            for i, reason in zip(kept, await _conflicts(services, identity_id, embeddings[kept]),
                                 strict=True):
                found[i] = reason
    return found


ADVICE = {
    "no_face": "a photo where the whole face is visible",
    "multiple_faces": "a photo of the person alone",
    "face_too_small": "a closer photo",
    "extreme_pose": "a photo facing the camera",
    "low_quality": "a sharp, evenly lit photo without sunglasses or a hand near the face",
    "identity_conflict": "photos of this person only (check the refused one is them)",
}


def advice(mode: str, refused: Sequence[str], templates: int, target: int) -> schemas.EnrolReview:
    """The review's summary: how many photos were refused and how many more to take."""
    more = max(0, target - templates)
    tips = sorted({ADVICE[c] for c in refused if c in ADVICE})
    text = None
    if more:
        text = f"take {more} more photo{'s' if more > 1 else ''}" + (
            f": {'; '.join(tips)}" if tips else " (facing the camera, in even light)")
    elif refused:
        text = f"{len(refused)} photo(s) refused; the identity has enough good photos"
    return schemas.EnrolReview(mode=mode, refused=len(refused), more_photos=more, advice=text)  # type: ignore[arg-type]

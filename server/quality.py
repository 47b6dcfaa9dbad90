"""Each served face's recognition quality (``core.quality``), and the probe's verdict on it.

The score needs the raw outputs of the crop and of its mirror, which the embedder makes
anyway (``core.embed.embed_with_stability``), so scoring costs only the crop statistics
(bench: ``python -m bench.quality``). A bundle without a quality model serves faces
without a quality (null), and probes are never called too poor to decide.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from facegate.core.quality import Quality, QualityModel, Signals
from facegate.server import schemas
from facegate.server.pipeline import PreparedFace

__all__ = ["assess", "face_info", "min_probe_quality", "probe_verdict"]


def assess(model: QualityModel | None, prepared: PreparedFace, stability: float | None
           ) -> Quality | None:
    """The face's quality by the bundle's model; None without one."""
    if model is None:
        return None
    face = prepared.face
    return model.assess(Signals.of(prepared.crop, face.landmarks, stability, face.stage))


def face_info(model: QualityModel | None, prepared: PreparedFace, stability: float | None,
              cls: type[schemas.FaceInfo] = schemas.FaceInfo, **extra: object) -> schemas.FaceInfo:
    """The response's description of one face, its quality included."""
    quality = assess(model, prepared, stability)
    return cls(**prepared.face_dict(), stage=prepared.face.stage,
               quality=None if quality is None else schemas.FaceQuality(**quality.to_dict()),
               **extra)


def min_probe_quality(model: QualityModel | None, setting: float | None) -> float | None:
    """The score under which a probe is too poor to decide on: the operator's
    FACEGATE_PROBE_MIN_QUALITY, else the bundle's 2% quantile of calibration photos
    (None: no model, or the operator turned it off with 0)."""
    if model is None or setting == 0:
        return None
    return model.cut(0.02) if setting is None else setting


def probe_verdict(faces: Sequence[schemas.FaceInfo | None], cut: float | None
                  ) -> schemas.ProbeQuality:
    """Whether any photo probe's score is below ``cut``: its decision is then unreliable
    (flagged, never silently a no-match)."""
    scores = [f.quality.score for f in faces if f is not None and f.quality is not None]
    low = cut is not None and any(s < cut for s in scores)
    return schemas.ProbeQuality(
        sufficient=not low, min_quality=cut,
        score=float(np.min(scores)) if scores else None,
    )


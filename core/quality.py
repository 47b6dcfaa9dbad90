"""How likely a face photo is to be falsely rejected: a recognition quality score in [0, 1]
(ISO/IEC 29794-1's sense: a score that predicts comparison errors, not beauty). Pure
numpy, no I/O; ``facegate calibrate`` fits it (``train.quality_fit``) on training
identities and writes it into the bundle, the server scores every face with it.

The signals are ones the face path already has, each cheap:

- **stability**: cosine between the model's raw outputs for the crop and for its mirror
  (the server computes both and sums them anyway). A frontal, well-lit, sharp face
  looks like its mirror to the model; a profile, sunglasses, an extreme expression or a
  misdetection does not. The best single predictor measured (docs/results.md).
- **stage**: which detector step found the face (dlib HOG at upsample 0, at 1, the MMOD
  fallback): each later step means a smaller, harder or less frontal face.
- **size** (inter-ocular distance in the photo's pixels), **sharpness** (variance of the
  crop's Laplacian), **brightness** (mean grey of the crop's centre) and **pose** (nose
  offset from the eye midpoint, in eye distances, and the eye line's roll).

``QualityModel`` is a small L2-regularised logistic model over transformed signals:
``p = sigmoid(b + w . x)`` is the chance that the photo's genuine comparisons fall below
the served threshold (more than the median photo's); the score is ``1 - p`` scaled so the
calibration set's median photo scores 0.5... (see ``score``). Each component is also
reported alone as a score in [0, 1] (its own one-signal fit), so a caller can say why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

FORM = "logistic-signals"
STAGES = ("hog0", "hog1", "mmod")  # core.detect's stage names, in order of difficulty
COMPONENTS = ("size", "sharpness", "brightness", "pose", "stability")


@dataclass(frozen=True)
class ReviewRules:
    """What enrolment review (``server.review``) refuses, per FACEGATE_ENROL_REVIEW mode."""

    min_eye_distance: float  # px between the eye centres, in the photo
    max_yaw: float  # nose offset from the eye midpoint, in eye distances
    max_roll: float  # radians
    quality_fraction: float  # refuse scores under this share of the calibration photos'
    conflicts: bool  # also refuse identity conflicts (needs the gallery)


# On the shared photos 1% of faces have eyes under 13.5 px apart, 5% under 18 px; 1% a yaw
# over 0.16, 5% a roll over 0.36 rad (python -m facegate.train.quality_eval prints them).
REVIEW_RULES = {
    "standard": ReviewRules(min_eye_distance=12.0, max_yaw=0.45, max_roll=0.6,
                            quality_fraction=0.02, conflicts=False),
    "strict": ReviewRules(min_eye_distance=16.0, max_yaw=0.3, max_roll=0.45,
                          quality_fraction=0.05, conflicts=True),
}


class QualityModelError(ValueError):
    """A manifest's quality_model section that cannot be used."""


# ---------------------------------------------------------------- signals (pure numpy)


def _grey(crop: np.ndarray) -> np.ndarray:
    c = crop.astype(np.float32)
    return 0.299 * c[..., 0] + 0.587 * c[..., 1] + 0.114 * c[..., 2]


def _centre(grey: np.ndarray) -> np.ndarray:
    h, w = grey.shape
    return grey[h // 4: h - h // 4, w // 4: w - w // 4]


def sharpness(crop: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the crop's centre (grey levels squared)."""
    g = _centre(_grey(crop))
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def brightness(crop: np.ndarray) -> float:
    """Mean grey level (0-255) of the crop's centre."""
    return float(_centre(_grey(crop)).mean())


def geometry_signals(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(inter-ocular distance px, yaw proxy, roll radians) from the ArcFace five points
    (left eye, right eye, nose tip, mouth corners): yaw is the nose's horizontal offset
    from the eye midpoint in eye distances, rotated into the eye line's frame."""
    p = np.asarray(landmarks, dtype=np.float64)
    eye = p[1] - p[0]
    dist = float(math.hypot(*eye))
    if dist <= 1e-6:
        return 0.0, 1.0, 0.0
    roll = math.atan2(eye[1], eye[0])
    axis = eye / dist
    yaw = float(np.dot(p[2] - (p[0] + p[1]) / 2.0, axis)) / dist
    return dist, abs(yaw), abs(roll)


def stability(raw_crop: np.ndarray, raw_mirror: np.ndarray) -> float:
    """Cosine between the model's raw outputs for a crop and for its mirror."""
    a, b = np.asarray(raw_crop, np.float64), np.asarray(raw_mirror, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@dataclass(frozen=True)
class Signals:
    """What the face path knows about one face, raw (``signal_row`` transforms them)."""

    eye_distance: float  # px in the photo
    sharpness: float
    brightness: float
    yaw: float
    roll: float
    stability: float | None  # None where the embedder gave no mirror output
    stage: str | None  # core.detect stage; None for detectors without stages

    @classmethod
    def of(cls, crop: np.ndarray, landmarks: np.ndarray, stability: float | None,
           stage: str | None) -> Signals:
        dist, yaw, roll = geometry_signals(landmarks)
        return cls(dist, sharpness(crop), brightness(crop), yaw, roll, stability, stage)


# Each component's transformed features (columns of ``signal_row``), and the score's.
FEATURES = ("log_size", "log_sharpness", "brightness_dev", "yaw", "roll", "instability",
            "stage_hog1", "stage_mmod")
COMPONENT_FEATURES = {
    "size": ("log_size",),
    "sharpness": ("log_sharpness",),
    "brightness": ("brightness_dev",),
    "pose": ("yaw", "roll"),
    "stability": ("instability",),
}
SCORE_FEATURES = ("instability", "stage_hog1", "stage_mmod")


def signal_row(s: Signals, neutral_instability: float) -> dict[str, float]:
    """The transformed features of one face (what the logistic models read)."""
    instability = (neutral_instability if s.stability is None
                   else math.log(max(1.0 - s.stability, 0.0) + 1e-3))
    return {
        "log_size": math.log(max(s.eye_distance, 1.0)),
        "log_sharpness": math.log1p(max(s.sharpness, 0.0)),
        "brightness_dev": abs(s.brightness - 128.0) / 64.0,
        "yaw": s.yaw,
        "roll": s.roll,
        "instability": instability,
        "stage_hog1": float(s.stage == "hog1"),
        "stage_mmod": float(s.stage == "mmod"),
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class Logistic:
    """p(false rejection) = sigmoid(bias + sum_k weight_k * (x_k - mean_k) / std_k)."""

    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    bias: float

    def p(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(self.bias + ((x - self.mean) / self.std) @ self.weight)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "mean": _floats(self.mean),
                "std": _floats(self.std), "weight": _floats(self.weight),
                "bias": round(float(self.bias), 7)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Logistic:
        if not isinstance(d, Mapping):
            raise QualityModelError(f"quality_model: {where} must be an object")
        features = d.get("features")
        if not isinstance(features, list) or not features or any(f not in FEATURES for f in features):
            raise QualityModelError(f"quality_model: {where}.features must name some of {FEATURES}")
        try:
            arrays = [np.asarray(d.get(k), dtype=np.float64) for k in ("mean", "std", "weight")]
            bias = float(d.get("bias"))
        except (TypeError, ValueError) as exc:
            raise QualityModelError(f"quality_model: {where} needs numbers") from exc
        if any(a.shape != (len(features),) or not np.isfinite(a).all() for a in arrays) \
                or not math.isfinite(bias) or (arrays[1] <= 0).any():
            raise QualityModelError(f"quality_model: {where}: mean/std/weight must be finite, "
                                    "one per feature, std > 0")
        return cls(tuple(features), arrays[0], arrays[1], arrays[2], bias)


def _floats(a: np.ndarray) -> list[float]:
    return [round(float(v), 7) for v in a]


def fit_logistic(x: np.ndarray, y: np.ndarray, features: tuple[str, ...], l2: float = 1.0,
                 iterations: int = 50) -> Logistic:
    """L2-regularised logistic regression on soft targets ``y`` in [0, 1] (Newton steps on
    standardised features; the bias is not penalised). ``l2`` is per sample count."""
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    z = np.column_stack([np.ones(len(x)), (x - mean) / std])
    w = np.zeros(z.shape[1])
    w[0] = math.log(max(y.mean(), 1e-6) / max(1.0 - y.mean(), 1e-6))
    penalty = np.full(z.shape[1], l2 * len(x) / 100.0)
    penalty[0] = 0.0
    for _ in range(iterations):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return Logistic(features, mean, std, w[1:], float(w[0]))


@dataclass(frozen=True)
class Quality:
    """One face's score and components, each 1 - P(a genuine comparison is rejected)."""

    score: float
    components: dict[str, float]
    stage: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"score": round(self.score, 4),
                "components": {k: round(v, 4) for k, v in self.components.items()}}


@dataclass(frozen=True)
class QualityModel:
    """The bundle's quality model: the score's logistic model, one per component, and the
    score's quantiles on the calibration photos (review and probe cut-offs start there)."""

    score: Logistic
    components: dict[str, Logistic]
    neutral_instability: float  # used where no mirror output exists
    quantiles: dict[str, float]  # "0.05" -> score below which 5% of calibration photos fall

    def features(self, signals: Signals) -> dict[str, float]:
        return signal_row(signals, self.neutral_instability)

    def assess(self, signals: Signals) -> Quality:
        row = self.features(signals)

        def good(model: Logistic) -> float:
            x = np.array([row[f] for f in model.features])
            return float(1.0 - model.p(x))

        return Quality(good(self.score), {k: good(m) for k, m in self.components.items()},
                       signals.stage)

    def scores(self, rows: np.ndarray, columns: tuple[str, ...] = FEATURES) -> np.ndarray:
        """Scores of many faces' feature rows (columns named by ``columns``)."""
        index = [columns.index(f) for f in self.score.features]
        return 1.0 - self.score.p(rows[:, index])

    def cut(self, fraction: float) -> float:
        """The score below which ``fraction`` of the calibration photos fall."""
        return self.quantiles[f"{fraction:g}"]

    def to_manifest(self, provenance: dict[str, Any]) -> dict[str, Any]:
        return {
            "form": FORM,
            "score": self.score.to_dict(),
            "components": {k: m.to_dict() for k, m in self.components.items()},
            "neutral_instability": round(self.neutral_instability, 7),
            "quantiles": {k: round(float(v), 7) for k, v in self.quantiles.items()},
            **provenance,
        }

    @classmethod
    def from_manifest(cls, section: Any) -> QualityModel:
        if not isinstance(section, Mapping) or section.get("form") != FORM:
            raise QualityModelError(f"quality_model: 'form' must be {FORM!r}")
        components = section.get("components")
        if not isinstance(components, Mapping) or set(components) != set(COMPONENTS):
            raise QualityModelError(f"quality_model: 'components' must be {list(COMPONENTS)}")
        quantiles = section.get("quantiles")
        neutral = section.get("neutral_instability")
        if not isinstance(quantiles, Mapping) or not all(
                isinstance(v, int | float) and 0.0 <= v <= 1.0 for v in quantiles.values()):
            raise QualityModelError("quality_model: 'quantiles' must map fractions to scores in [0, 1]")
        if not isinstance(neutral, int | float) or not math.isfinite(neutral):
            raise QualityModelError("quality_model: 'neutral_instability' must be a number")
        return cls(Logistic.from_dict(section.get("score"), "score"),
                   {k: Logistic.from_dict(components[k], k) for k in COMPONENTS},
                   float(neutral), {str(k): float(v) for k, v in quantiles.items()})


QUANTILES = (0.02, 0.05, 0.1, 0.2)


def fit_quality_model(rows: np.ndarray, rejected: np.ndarray, l2: float = 1.0) -> QualityModel:
    """Fit on training identities' photos: ``rows`` (N, len(FEATURES)) transformed features,
    ``rejected`` (N,) each photo's share of genuine comparisons below the served threshold."""
    def fit(features: tuple[str, ...]) -> Logistic:
        cols = [FEATURES.index(f) for f in features]
        return fit_logistic(rows[:, cols], rejected, features, l2)

    score = fit(SCORE_FEATURES)
    components = {k: fit(f) for k, f in COMPONENT_FEATURES.items()}
    scores = 1.0 - score.p(rows[:, [FEATURES.index(f) for f in SCORE_FEATURES]])
    quantiles = {f"{q:g}": float(np.quantile(scores, q)) for q in QUANTILES}
    neutral = float(np.median(rows[:, FEATURES.index("instability")]))
    return QualityModel(score, components, neutral, quantiles)

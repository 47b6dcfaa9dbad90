"""Face alignment: the crop geometry a model was trained with, applied to detected landmarks.

Which crop a model takes belongs to the model: a bundle's manifest names a
:class:`Geometry` (absent: the ArcFace 112x112 template), and
:func:`facegate.core.face.align_face` dispatches on it, so training and serving make
the same crop.

Two geometries:

``arcface_template``
    The five ArcFace points (eye centres, nose tip, mouth corners) warped onto the
    insightface 112x112 template (scaled for other sizes) by a least-squares
    similarity. :func:`align`.
``dlib_chip``
    dlib's "face chip" (``dlib.get_face_chip(img, shape5, size, padding)``), the input
    of dlib's face-recognition ResNet (150x150, padding 0.25): :mod:`facegate.core.dlib_chip`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

__all__ = [
    "ARCFACE_112",
    "ARCFACE_SIZE",
    "ARCFACE_TEMPLATE",
    "DLIB_CHIP_150",
    "GEOMETRY_METHODS",
    "Geometry",
    "align",
    "apply_transform",
    "as_geometry",
    "similarity_transform",
    "template_for",
]

# Canonical landmark positions for a 112x112 crop (insightface / ArcFace), in the
# order left eye, right eye, nose tip, left mouth corner, right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)
ARCFACE_SIZE = 112

GeometryMethod = Literal["arcface_template", "dlib_chip"]
GEOMETRY_METHODS: tuple[str, ...] = ("arcface_template", "dlib_chip")
_MIN_SIZE, _MAX_SIZE = 16, 1024
_MAX_PADDING = 2.0


@dataclass(frozen=True)
class Geometry:
    """How a model's input crop is made from a face: method, crop side and (dlib) padding.

    ``Geometry("arcface_template", 112)`` is the ArcFace template crop (what a bundle
    without a ``geometry`` section means); ``Geometry("dlib_chip", 150, 0.25)`` is the
    crop dlib's face-recognition ResNet takes. Invalid values raise ``ValueError``.
    """

    method: GeometryMethod
    size: int
    padding: float | None = None

    def __post_init__(self) -> None:
        if self.method not in GEOMETRY_METHODS:
            raise ValueError(f"method must be one of {list(GEOMETRY_METHODS)}, got {self.method!r}")
        if not isinstance(self.size, int) or isinstance(self.size, bool):
            raise ValueError(f"size must be an integer, got {self.size!r}")
        if not _MIN_SIZE <= self.size <= _MAX_SIZE:
            raise ValueError(f"size must be in [{_MIN_SIZE}, {_MAX_SIZE}], got {self.size}")
        if self.method == "arcface_template":
            if self.padding is not None:
                raise ValueError("padding applies to dlib_chip only; the ArcFace template has none")
            return
        padding = self.padding
        if (
            not isinstance(padding, int | float)
            or isinstance(padding, bool)
            or not math.isfinite(padding)
            or not 0.0 <= padding <= _MAX_PADDING
        ):
            raise ValueError(f"dlib_chip needs a padding in [0, {_MAX_PADDING}], got {padding!r}")
        object.__setattr__(self, "padding", float(padding))

    @classmethod
    def from_dict(cls, data: Any) -> Geometry:
        """Strictly parse ``{"method", "size"[, "padding"]}`` (a manifest's ``geometry``)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"must be an object, got {data!r}")
        method = data.get("method")
        if method not in GEOMETRY_METHODS:
            raise ValueError(f"method must be one of {list(GEOMETRY_METHODS)}, got {method!r}")
        allowed = {"method", "size"} | ({"padding"} if method == "dlib_chip" else set())
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown keys {unknown} for method {method!r} (allowed: {sorted(allowed)})")
        missing = sorted(allowed - set(data))
        if missing:
            raise ValueError(f"method {method!r} needs {missing}")
        return cls(method=method, size=data["size"], padding=data.get("padding"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the inverse of :meth:`from_dict`."""
        out: dict[str, Any] = {"method": self.method, "size": self.size}
        if self.method == "dlib_chip":
            out["padding"] = self.padding
        return out

    @property
    def input_size(self) -> list[int]:
        """The crop's [height, width], as a manifest's ``input.size`` must state it."""
        return [self.size, self.size]

    def __str__(self) -> str:
        if self.method == "dlib_chip":
            return f"dlib_chip {self.size}x{self.size} padding {self.padding:g}"
        return f"arcface_template {self.size}x{self.size}"


ARCFACE_112 = Geometry("arcface_template", ARCFACE_SIZE)
DLIB_CHIP_150 = Geometry("dlib_chip", 150, 0.25)


def as_geometry(value: Geometry | Mapping[str, Any] | None, default: Geometry = ARCFACE_112) -> Geometry:
    """A :class:`Geometry` from itself, its dict form, or ``None`` (-> ``default``)."""
    if value is None:
        return default
    if isinstance(value, Geometry):
        return value
    return Geometry.from_dict(value)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst.

    Umeyama (1991) closed form, without outlier rejection: with five landmarks
    from a detector there is nothing to reject, and RANSAC would make the crop
    depend on a random seed. Returns a (2, 3) float64 matrix for cv2.warpAffine.
    The fit is not symmetric: ``similarity_transform(a, b)`` minimises the error in
    b's frame, and is not in general the inverse of ``similarity_transform(b, a)``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 0:
        raise ValueError("source points are all identical")
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    # Reflection guard: force a proper rotation (det = +1).
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float((sigma * d).sum() / src_var)
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` (N, 2) mapped by the (2, 3) affine ``matrix``."""
    return np.asarray(points, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]


def template_for(size: int = ARCFACE_SIZE) -> np.ndarray:
    """The ArcFace template scaled to a square crop of `size` pixels."""
    return ARCFACE_TEMPLATE * (size / ARCFACE_SIZE)


def align(image: np.ndarray, landmarks: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """Warp `image` so its five `landmarks` land on the ArcFace template; (size, size, 3) uint8."""
    landmarks = np.asarray(landmarks, dtype=np.float32)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks must be (5, 2), got {landmarks.shape}")
    matrix = similarity_transform(landmarks, template_for(size))
    return cv2.warpAffine(
        image,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )

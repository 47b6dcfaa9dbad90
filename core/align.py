"""Five-point face alignment onto the ArcFace 112x112 template.

Every crop the model sees, in training and in serving, is made here, so the
embedding network always receives faces in the same canonical pose and scale.
"""

from __future__ import annotations

import cv2
import numpy as np

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


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src to dst.

    Umeyama (1991) closed form, without outlier rejection: with five landmarks
    from a detector there is nothing to reject, and RANSAC would make the crop
    depend on a random seed. Returns a (2, 3) float64 matrix for cv2.warpAffine.
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

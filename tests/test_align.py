"""Alignment: the similarity transform is exact on hand-made points and puts real faces on the template."""

from __future__ import annotations

import numpy as np
import pytest
from facegate.core.align import ARCFACE_TEMPLATE, align, similarity_transform
from facegate.core.detect import DlibDetector
from PIL import Image


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_similarity_transform_recovers_known_similarity():
    # scale 2, rotation 90 degrees, translation (10, -5): (x, y) -> (-2y + 10, 2x - 5)
    src = np.array([[0, 0], [1, 0], [0, 1], [3, 2], [-1, 4]], dtype=np.float64)
    dst = np.array([[10, -5], [10, -3], [8, -5], [6, 1], [2, -7]], dtype=np.float64)
    matrix = similarity_transform(src, dst)
    expected = np.array([[0.0, -2.0, 10.0], [2.0, 0.0, -5.0]])
    np.testing.assert_allclose(matrix, expected, atol=1e-9)


def test_similarity_transform_is_least_squares_not_exact_fit():
    # Noisy correspondences: the fit must beat the identity guess and stay a similarity.
    rng = np.random.default_rng(0)
    src = ARCFACE_TEMPLATE.astype(np.float64) * 3 + 40
    true = similarity_transform(src, ARCFACE_TEMPLATE)
    noisy = _apply(true, src) + rng.normal(0, 0.5, src.shape)
    m = similarity_transform(src, noisy)
    a, b = m[0, 0], m[1, 0]
    np.testing.assert_allclose(m[:, :2], [[a, -b], [b, a]], atol=1e-9)  # rotation+scale only
    residual = np.abs(_apply(m, src) - noisy).max()
    assert residual < 1.5


def test_similarity_transform_never_reflects():
    src = np.array([[0, 0], [1, 0], [0, 1]], dtype=np.float64)
    mirrored = src * [-1, 1]
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_align_moves_landmarks_onto_template_pixels():
    # A synthetic image with bright dots at known landmark positions.
    image = np.zeros((300, 400, 3), np.uint8)
    landmarks = ARCFACE_TEMPLATE * 2.2 + [120, 50]
    for x, y in landmarks.round().astype(int):
        image[y - 1 : y + 2, x - 1 : x + 2] = 255
    crop = align(image, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for x, y in ARCFACE_TEMPLATE.round().astype(int):
        assert crop[y, x].max() > 100


@pytest.fixture(scope="module")
def real_faces(celeba_index):
    """(image, landmarks) for the first detected face in 25 photos of distinct people."""
    detector = DlibDetector(landmarks="68")  # measured ArcFace points (the figures below)
    seen, out = set(), []
    for path, identity in celeba_index:
        if identity in seen:
            continue
        seen.add(identity)
        image = np.asarray(Image.open(path).convert("RGB"))
        faces = detector.detect(image)
        if faces:
            out.append((image, faces[0].landmarks))
        if len(out) == 25:
            break
    return out


def test_real_faces_land_on_template(real_faces):
    assert len(real_faces) >= 20
    errors = []
    for image, landmarks in real_faces:
        m = similarity_transform(landmarks, ARCFACE_TEMPLATE)
        mapped = _apply(m, landmarks.astype(np.float64))
        errors.append(np.linalg.norm(mapped - ARCFACE_TEMPLATE, axis=1))
        crop = align(image, landmarks)
        assert crop.shape == (112, 112, 3)
        assert crop[40:100, 30:82].mean() > 20  # the face, not the black border, fills the centre
    errors = np.array(errors)
    # Measured on these 25 faces: median error per point (px) about
    # [2.2, 2.0, 5.5, 3.7, 3.7]; the nose tip varies most with head pose.
    # Eye centres must sit within a few px of the template for nearly every face.
    assert np.median(errors[:, :2]) < 3.0
    assert np.percentile(errors[:, :2], 95) < 6.0
    assert np.median(errors) < 5.0

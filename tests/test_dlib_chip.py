"""Crop geometries: dlib chips against dlib itself, the ArcFace <-> dlib point mappings,
align_face's dispatch and the one prepare path."""

from __future__ import annotations

import argparse

import cv2
import dlib
import numpy as np
import pytest
from facegate.core.align import ARCFACE_112, DLIB_CHIP_150, Geometry, align, as_geometry
from facegate.core.detect import DlibDetector, Face, dlib_model_file, five_points_from_68
from facegate.core.dlib_chip import (
    ARCFACE_IN_DLIB_FRAME,
    DLIB5_TEMPLATE,
    arcface_from_dlib5,
    dlib_chip,
    dlib_chip_transform,
)
from facegate.core.errors import NoFaceError
from facegate.core.face import (
    add_geometry_arguments,
    align_face,
    geometry_from_args,
    landmarks_for,
    prepare_face,
)
from PIL import Image


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def shapes(celeba_index):
    """(image, dlib 5-point shape, 68-point ArcFace five) of 40 photos of distinct people.

    As the brief of dlib.get_face_chip has it: HOG detector, then the 5-point predictor.
    """
    hog = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
    sp68 = dlib.shape_predictor(str(dlib_model_file("shape_predictor_68_face_landmarks.dat")))
    seen, out = set(), []
    for path, identity in celeba_index:
        if identity in seen:
            continue
        seen.add(identity)
        image = _rgb(path)
        rects = hog(image, 1)
        if not rects:
            continue
        shape = sp5(image, rects[0])
        p68 = np.array([(p.x, p.y) for p in sp68(image, rects[0]).parts()], np.float32)
        out.append((image, shape, five_points_from_68(p68)))
        if len(out) == 40:
            break
    return out


def _parts(shape) -> np.ndarray:
    return np.array([(p.x, p.y) for p in shape.parts()], np.float64)


def test_dlib_chip_matches_dlib_get_face_chip(shapes):
    # Measured (dlib 20.0.1, 40 CelebA photos, 150 px, padding 0.25): identical, mean
    # absolute difference 0.0 grey levels, max 0. The tolerance allows a one-level
    # truncation flip where float rounding differs.
    assert len(shapes) >= 30
    diffs = []
    for image, shape, _ in shapes:
        ours = dlib_chip(image, _parts(shape), 150, 0.25)
        theirs = dlib.get_face_chip(image, shape, 150, 0.25)
        assert ours.shape == theirs.shape == (150, 150, 3) and ours.dtype == np.uint8
        d = np.abs(ours.astype(int) - theirs.astype(int))
        diffs.append(d.mean())
        assert d.max() <= 1
    assert np.mean(diffs) < 0.01


@pytest.mark.parametrize(("size", "padding"), [(112, 0.0), (200, 0.6)])
def test_dlib_chip_matches_other_sizes_and_paddings(shapes, size, padding):
    for image, shape, _ in shapes[:8]:
        ours = dlib_chip(image, _parts(shape), size, padding)
        theirs = dlib.get_face_chip(image, shape, size, padding)
        assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 0.01


@pytest.mark.parametrize("factor", [3, 6])
def test_dlib_chip_pyramid_path_matches_dlib(shapes, factor):
    # Upscaled photos: the face covers > 4x the chip's area, so dlib samples from its
    # pyramid_down<2> levels (1 and 2 levels at 3x, up to 3 at 6x), which dlib_chip
    # reproduces (same filter, integer arithmetic and rect_down mapping).
    # Measured: mean absolute difference 0.0 grey levels, max 1.
    sp5 = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
    diffs = []
    for image, shape, _ in shapes[:4]:
        big = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
        r = shape.rect
        rect = dlib.rectangle(r.left() * factor, r.top() * factor, r.right() * factor, r.bottom() * factor)
        big_shape = sp5(big, rect)
        ours = dlib_chip(big, _parts(big_shape))
        theirs = dlib.get_face_chip(big, big_shape, 150, 0.25)
        d = np.abs(ours.astype(int) - theirs.astype(int))
        diffs.append(d.mean())
        assert d.max() <= 1
    assert np.mean(diffs) < 0.01


def test_dlib_chip_zero_outside_the_image():
    image = np.full((120, 100, 3), 200, np.uint8)
    # A face at the left edge: part of the chip samples outside and must be 0, as in dlib.
    shape = DLIB5_TEMPLATE * 80 + [-30, 20]
    chip = dlib_chip(image, shape)
    assert (chip[:, :5] == 0).all() and (chip[75, 120:] == 200).all()
    # Entirely outside: all zeros.
    assert not dlib_chip(image, shape + 1000).any()


def test_dlib_chip_transform_puts_dlib_points_on_the_template():
    rng = np.random.default_rng(3)
    for _ in range(5):
        angle, scale = rng.uniform(-0.5, 0.5), rng.uniform(0.5, 3)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        chip_pts = (0.25 + DLIB5_TEMPLATE) / 1.5 * 150
        shape = chip_pts @ rot.T + rng.uniform(50, 300, 2)
        m = dlib_chip_transform(shape, 150, 0.25)
        mapped = chip_pts @ m[:, :2].T + m[:, 2]
        # Exact similarity: the chip pixel grid is dlib's (width - 1 convention), so a point's
        # image position differs from the fitted one by at most (1 - k/scale) of its offset.
        np.testing.assert_allclose(mapped, shape, atol=0.01 * scale * 150)


def test_arcface_from_dlib5_is_close_to_the_68_point_five(shapes):
    # Held-out figures from `python -m facegate.core.geometry_fit` (461 faces, px of the
    # 112 ArcFace crop): median error eyes 0.6, nose tip 4.5, mouth corners 4.4.
    errors = []
    for _, shape, five68 in shapes:
        derived = arcface_from_dlib5(_parts(shape))
        assert derived.shape == (5, 2) and derived.dtype == np.float32
        eye_distance = np.linalg.norm(five68[1] - five68[0])
        errors.append(np.linalg.norm(derived - five68, axis=1) / eye_distance * 35.2)  # 112-crop px
    errors = np.array(errors)
    assert np.median(errors[:, :2]) < 1.5
    assert np.median(errors[:, 2:]) < 7.0


def test_arcface_in_dlib_frame_is_consistent():
    # On the average face the two point sets map onto each other exactly.
    shape = DLIB5_TEMPLATE * 200 + 40
    np.testing.assert_allclose(arcface_from_dlib5(shape), ARCFACE_IN_DLIB_FRAME * 200 + 40, atol=1e-3)
    # The ArcFace five lie where a face's features are: eyes above nose above mouth.
    a = ARCFACE_IN_DLIB_FRAME
    assert a[0, 0] < a[2, 0] < a[1, 0] and a[:2, 1].max() < a[2, 1] < a[3:, 1].min()


def test_align_face_with_arcface_only_face_is_close_to_dlib5_chip(shapes):
    # A detector giving only ArcFace points (SCRFD) still gets a dlib chip, through
    # ARCFACE_IN_DLIB_FRAME. Measured on these 40 faces (ArcFace points from the 68-point
    # predictor): mean absolute difference to the exact dlib-5 chip 16.9 grey levels
    # (held-out 461 faces: mean 15.6, p90 23.9; a chip grid shift of ~4 px of 150); for
    # scale, jittering dlib's five by N(0, 1 px) alone moves the chip by ~8 levels, and
    # chips of two different people differ by ~67.
    diffs, others = [], []
    for k, (image, shape, five68) in enumerate(shapes):
        with_dlib5 = Face(box=(0, 0, 1, 1), score=1.0, landmarks=five68, dlib5=_parts(shape).astype(np.float32))
        arcface_only = Face(box=(0, 0, 1, 1), score=1.0, landmarks=five68)
        exact = align_face(image, with_dlib5, DLIB_CHIP_150).astype(int)
        approx = align_face(image, arcface_only, DLIB_CHIP_150).astype(int)
        assert approx.shape == (150, 150, 3)
        diffs.append(np.abs(exact - approx).mean())
        other_image, other_shape, _ = shapes[(k + 1) % len(shapes)]
        others.append(np.abs(exact - dlib_chip(other_image, _parts(other_shape)).astype(int)).mean())
    print(f"ArcFace-only dlib chip vs dlib5 chip: mean abs diff {np.mean(diffs):.2f} "
          f"(median {np.median(diffs):.2f}); different people: {np.mean(others):.2f}")
    assert np.median(diffs) < 25
    assert np.mean(diffs) < 0.6 * np.mean(others)


def test_align_face_dispatches_on_geometry(shapes):
    image, shape, five68 = shapes[0]
    face = Face(box=(0, 0, 1, 1), score=1.0, landmarks=five68, dlib5=_parts(shape).astype(np.float32))
    np.testing.assert_array_equal(align_face(image, face, ARCFACE_112), align(image, five68))
    np.testing.assert_array_equal(
        align_face(image, face, Geometry("arcface_template", 96)), align(image, five68, 96)
    )
    np.testing.assert_array_equal(align_face(image, face, DLIB_CHIP_150), dlib.get_face_chip(image, shape))
    assert align_face(image, face, Geometry("dlib_chip", 200, 0.5)).shape == (200, 200, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1], "must be an object"),
        ({"method": "mtcnn", "size": 112}, "method must be one of"),
        ({"method": "dlib_chip", "size": 150}, r"needs \['padding'\]"),
        ({"method": "arcface_template", "size": 112, "padding": 0.1}, "unknown keys"),
        ({"method": "dlib_chip", "size": 150, "padding": 0.25, "crop": 1}, "unknown keys"),
        ({"method": "dlib_chip", "size": "150", "padding": 0.25}, "size must be an integer"),
        ({"method": "dlib_chip", "size": True, "padding": 0.25}, "size must be an integer"),
        ({"method": "dlib_chip", "size": 8, "padding": 0.25}, r"size must be in \[16, 1024\]"),
        ({"method": "dlib_chip", "size": 150, "padding": -0.1}, "padding in"),
        ({"method": "dlib_chip", "size": 150, "padding": float("nan")}, "padding in"),
        ({"method": "arcface_template"}, r"needs \['size'\]"),
    ],
)
def test_geometry_from_dict_is_strict(data, message):
    with pytest.raises(ValueError, match=message):
        Geometry.from_dict(data)


def test_geometry_round_trip_and_defaults():
    for g in (ARCFACE_112, DLIB_CHIP_150, Geometry("dlib_chip", 150, 0)):
        assert Geometry.from_dict(g.to_dict()) == g
        assert as_geometry(g.to_dict()) == g and as_geometry(g) is g
    assert DLIB_CHIP_150.to_dict() == {"method": "dlib_chip", "size": 150, "padding": 0.25}
    assert ARCFACE_112.to_dict() == {"method": "arcface_template", "size": 112}
    assert as_geometry(None) == ARCFACE_112 and DLIB_CHIP_150.input_size == [150, 150]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_geometry_arguments(parser)
    return parser.parse_args(list(argv))


def test_geometry_command_line_options(tmp_path):
    assert geometry_from_args(_args()) == DLIB_CHIP_150
    assert geometry_from_args(_args("--geometry", "arcface_template")) == ARCFACE_112
    assert geometry_from_args(_args("--geometry", "arcface_template", "--size", "128")) == Geometry(
        "arcface_template", 128
    )
    assert geometry_from_args(_args("--size", "200", "--padding", "0.5")) == Geometry("dlib_chip", 200, 0.5)
    with pytest.raises(ValueError, match="padding applies"):
        geometry_from_args(_args("--geometry", "arcface_template", "--padding", "0.2"))
    with pytest.raises(ValueError, match="do not combine"):
        geometry_from_args(_args("--bundle", str(tmp_path), "--size", "112"))


def test_prepare_face_crops_by_geometry(celeba_index):
    data = celeba_index[0][0].read_bytes()
    detector = DlibDetector()
    chip = prepare_face(data, detector, DLIB_CHIP_150)
    assert chip.crop.shape == (150, 150, 3) and chip.geometry == DLIB_CHIP_150
    assert chip.image is None and set(chip.timings) == {"decode", "detect", "align"}
    assert chip.face.dlib5 is not None
    np.testing.assert_array_equal(chip.crop, dlib_chip(_rgb(celeba_index[0][0]), chip.face.dlib5))
    template = prepare_face(data, detector, ARCFACE_112, keep_image=True)
    assert template.crop.shape == (112, 112, 3) and template.image is not None
    np.testing.assert_array_equal(template.crop, align(template.image, template.face.landmarks))
    blank = cv2.imencode(".png", np.full((100, 100, 3), 128, np.uint8))[1].tobytes()
    with pytest.raises(NoFaceError):
        prepare_face(blank, detector, DLIB_CHIP_150)


def test_landmarks_follow_the_geometry_unless_chosen():
    assert landmarks_for(DLIB_CHIP_150) == "5"  # dlib chips need only dlib's five (public domain)
    assert landmarks_for(ARCFACE_112) == "68"  # measured mouth corners and nose tip
    assert landmarks_for(ARCFACE_112, "5") == "5" and landmarks_for(DLIB_CHIP_150, "68") == "68"
    with pytest.raises(ValueError, match="landmarks must be one of"):
        landmarks_for(ARCFACE_112, "21")

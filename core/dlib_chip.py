"""dlib's face chip: ``dlib.get_face_chip(img, shape5, size, padding)``, the input of dlib's
face-recognition ResNet (150x150, padding 0.25).

:func:`dlib_chip` reproduces dlib's algorithm step by step in NumPy, including its image
pyramid for faces much larger than the chip, so a chip can be made from points dlib's
predictor did not give: a face that has only the ArcFace five points (SCRFD) is mapped
onto the chip through :data:`ARCFACE_IN_DLIB_FRAME`, a template fitted on real photos
(:mod:`facegate.core.geometry_fit`). :func:`face_chip` (what serving uses) lets dlib
make the chip when the points are a shape predictor's whole pixels: the same chip, faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from facegate.core.align import Geometry, apply_transform, similarity_transform

__all__ = [
    "ARCFACE_IN_DLIB_FRAME",
    "DLIB5_TEMPLATE",
    "arcface_from_dlib5",
    "dlib_chip",
    "dlib_chip_from_arcface",
    "dlib_chip_transform",
    "face_chip",
]

# dlib's five chip points (get_face_chip_details in dlib/image_transforms/interpolation.h),
# in the order of shape_predictor_5_face_landmarks' parts: image-right eye outer and
# inner corner, image-left eye outer and inner corner, base of the nose (subnasale).
# Unit face frame: x, y in [0, 1] before padding; a chip of `size` with `padding` puts
# a point p at (padding + p) / (2 * padding + 1) * size.
DLIB5_TEMPLATE = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ],
    dtype=np.float64,
)

# The ArcFace five points (as `detect.five_points_from_68` makes them from dlib's
# 68-point predictor: eye centres = mean of each eye's six contour points, nose tip =
# point 30, mouth corners = 48 and 54), ArcFace order, in the same unit face frame as
# DLIB5_TEMPLATE: for each photo the similarity that maps its dlib 5-point parts onto
# DLIB5_TEMPLATE (the chip's own transform) was applied to its ArcFace five, and the
# results averaged. Fitted by `python -m facegate.core.geometry_fit` (function
# `fit_arcface_in_dlib_frame`) on 466 HOG-detected faces (up to 4 photos each of every
# other identity) of the shared CelebA subset, with dlib 20.0.1's predictors. dlib's
# own 68-point mean face (get_face_chip_details) gives nearly the same points (within
# 0.004); on the 461 held-out faces these fitted ones are slightly closer.
# Used both ways: to place a face that has only ArcFace points (SCRFD) on a dlib chip,
# and (`arcface_from_dlib5`) to derive ArcFace points from dlib's five.
ARCFACE_IN_DLIB_FRAME = np.array(
    [
        [0.226859, 0.217366],
        [0.753774, 0.216951],
        [0.493598, 0.519035],
        [0.249539, 0.776606],
        [0.727587, 0.776732],
    ],
    dtype=np.float64,
)




def _chip_points(unit_points: np.ndarray, size: int, padding: float) -> np.ndarray:
    """Unit-face-frame points -> chip pixel frame of a `size` chip with `padding` (dlib's rule)."""
    return (padding + np.asarray(unit_points, dtype=np.float64)) / (2 * padding + 1) * size


@dataclass(frozen=True)
class _ChipDetails:
    """dlib's chip_details: an axis-aligned rect (l, t, r, b; drectangle, inclusive) rotated by angle."""

    rect: tuple[float, float, float, float]
    angle: float
    rows: int
    cols: int


def _chip_details(chip_points: np.ndarray, img_points: np.ndarray, size: int) -> _ChipDetails:
    """dlib's ``chip_details(chip_points, img_points, chip_dims(size, size))``."""
    tform = similarity_transform(chip_points, img_points)  # chip -> image, as dlib fits it
    p = tform[:, :2] @ np.array([1.0, 0.0])
    angle = math.atan2(p[1], p[0])
    scale = math.hypot(p[0], p[1])
    cx, cy = apply_transform(tform, np.array([[size / 2.0, size / 2.0]]))[0]
    # centered_drect(centre, w, h) subtracts 1 from w and h (drectangle widths are r - l + 1).
    half_w = (size * scale - 1) / 2
    half_h = (size * scale - 1) / 2
    return _ChipDetails((cx - half_w, cy - half_h, cx + half_w, cy + half_h), angle, size, size)


def dlib_chip_transform(
    shape5: np.ndarray, size: int = 150, padding: float = 0.25, template: np.ndarray = DLIB5_TEMPLATE
) -> np.ndarray:
    """(2, 3) affine map from chip pixel (u, v) to image point (x, y) of ``dlib_chip``
    (at full resolution, i.e. ignoring the pyramid level dlib samples from). ``template``:
    where ``shape5`` lie in the unit chip frame (dlib's five parts by default; e.g.
    ``ARCFACE_IN_DLIB_FRAME`` for ArcFace points)."""
    return _chip_affine(_check5(template), _check5(shape5), size, padding)


def _chip_affine(unit_points: np.ndarray, img_points: np.ndarray, size: int, padding: float) -> np.ndarray:
    details = _chip_details(_chip_points(unit_points, size, padding), img_points, size)
    return _rect_to_affine(details.rect, details.angle, details.rows, details.cols)


def _rect_to_affine(rect: tuple[float, float, float, float], angle: float, rows: int, cols: int) -> np.ndarray:
    """Chip pixel -> point: (0,0) to the rotated rect's top-left, (cols-1, 0) to its top-right,
    (0, rows-1) to its bottom-left (dlib's find_affine_transform of those three pairs)."""
    left, top, right, bottom = rect
    cx, cy = (left + right) / 2, (top + bottom) / 2
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])

    def rotated(x: float, y: float) -> np.ndarray:
        return rot @ np.array([x - cx, y - cy]) + np.array([cx, cy])

    tl, tr, bl = rotated(left, top), rotated(right, top), rotated(left, bottom)
    ex = (tr - tl) / max(cols - 1, 1)
    ey = (bl - tl) / max(rows - 1, 1)
    return np.column_stack([ex, ey, tl])


def _area(rect: tuple[float, float, float, float]) -> float:
    left, top, right, bottom = rect
    if top > bottom or left > right:
        return 0.0
    return (right - left + 1) * (bottom - top + 1)


def _rect_down(rect: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """pyramid_down<2>::rect_down: each corner p -> p / 2 - (1.25, 0.75)."""
    left, top, right, bottom = rect
    return (left / 2 - 1.25, top / 2 - 0.75, right / 2 - 1.25, bottom / 2 - 0.75)


def _pyramid_down2(image: np.ndarray) -> np.ndarray:
    """dlib's pyramid_down<2> on an RGB image: 5-tap [1 4 6 4 1] filter, every other pixel,
    no border (output (rows-3)//2 x (cols-3)//2), integer sums truncated by /256."""
    rows, cols = image.shape[:2]
    if rows <= 8 or cols <= 8:
        return np.zeros((0, 0, 3), np.uint8)
    out_r, out_c = (rows - 3) // 2, (cols - 3) // 2
    a = image.astype(np.uint16)

    def col(k: int) -> np.ndarray:
        return a[:, k : k + 2 * out_c : 2]

    temp = col(0) + 4 * col(1) + 6 * col(2) + 4 * col(3) + col(4)  # <= 4080: fits uint16

    def row(k: int) -> np.ndarray:
        return temp[k : k + 2 * out_r : 2]

    down = row(0) + 4 * row(1) + 6 * row(2) + 4 * row(3) + row(4)  # <= 65280: fits uint16
    return (down // 256).astype(np.uint8)


def _bilinear_truncating(image: np.ndarray, matrix: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """dlib's transform_image with interpolate_bilinear: each chip pixel samples `image` at
    matrix @ (u, v, 1); 0 where the 2x2 neighbourhood leaves the image; values truncated."""
    v, u = np.mgrid[:rows, :cols].astype(np.float64)
    x = matrix[0, 0] * u + matrix[0, 1] * v + matrix[0, 2]
    y = matrix[1, 0] * u + matrix[1, 1] * v + matrix[1, 2]
    left, top = np.floor(x), np.floor(y)
    h, w = image.shape[:2]
    valid = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
    out = np.zeros((rows, cols, 3), np.uint8)
    if not valid.any():
        return out
    xi, yi = left[valid].astype(np.intp), top[valid].astype(np.intp)
    fx, fy = (x[valid] - left[valid])[:, None], (y[valid] - top[valid])[:, None]
    # Gather the four neighbours first, then widen only them: converting the whole
    # source image to float64 cost 10x the sampling itself.
    tl, tr = image[yi, xi].astype(np.float64), image[yi, xi + 1].astype(np.float64)
    bl, br = image[yi + 1, xi].astype(np.float64), image[yi + 1, xi + 1].astype(np.float64)
    value = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
    out[valid] = np.clip(value, 0, 255).astype(np.uint8)  # static_cast: truncation
    return out


def _extract_chip(image: np.ndarray, details: _ChipDetails) -> np.ndarray:
    """dlib's ``extract_image_chip(img, details, chip)`` with bilinear interpolation."""
    image = _check_rgb(image)
    size = details.rows * details.cols
    # Pyramid depth: halve (rect_down) while the rect still covers more than the chip.
    depth, grow = 0, 2.0
    down = _rect_down(details.rect)
    while _area(down) > size:
        down = _rect_down(down)
        depth += 1
        grow = grow * 2 + 2
    # Bounding box of the rotated rect, grown by `grow` px, clipped to the image, rounded.
    left, top, right, bottom = details.rect
    cx, cy = (left + right) / 2, (top + bottom) / 2
    c, s = math.cos(details.angle), math.sin(details.angle)
    corners = np.array([[left, top], [right, top], [left, bottom], [right, bottom]]) - (cx, cy)
    rotated = corners @ np.array([[c, s], [-s, c]]) + (cx, cy)
    h, w = image.shape[:2]
    box = (
        max(rotated[:, 0].min() - grow, 0.0),
        max(rotated[:, 1].min() - grow, 0.0),
        min(rotated[:, 0].max() + grow, w - 1.0),
        min(rotated[:, 1].max() + grow, h - 1.0),
    )
    if box[0] > box[2] or box[1] > box[3]:  # the chip lies entirely outside the image
        return np.zeros((details.rows, details.cols, 3), np.uint8)
    bl, bt, br, bb = (_lround(v) for v in box)
    source = image[bt : bb + 1, bl : br + 1]
    # The level to sample from, in the bounding box's coordinates.
    rect = (left - bl, top - bt, right - bl, bottom - bt)
    level = -1
    while _area(_rect_down(rect)) > size:
        level += 1
        rect = _rect_down(rect)
    for _ in range(level + 1):
        source = _pyramid_down2(source)
    matrix = _rect_to_affine(rect, details.angle, details.rows, details.cols)
    return _bilinear_truncating(source, matrix, details.rows, details.cols)


def _lround(value: float) -> int:
    """std::lround: halves away from zero."""
    return int(math.floor(abs(value) + 0.5)) * (1 if value >= 0 else -1)


def _check_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be an (H, W, 3) uint8 array")
    return image


def _check5(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"need (5, 2) landmarks, got {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("landmarks must be finite")
    return points


def dlib_chip(image: np.ndarray, shape5: np.ndarray, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """``dlib.get_face_chip(image, shape5, size, padding)`` in NumPy; (size, size, 3) uint8.

    ``shape5`` is the (5, 2) parts of dlib's ``shape_predictor_5_face_landmarks`` in dlib's
    order. The steps are dlib's (``get_face_chip_details``, ``chip_details``,
    ``extract_image_chips`` in dlib/image_transforms/interpolation.h):

    1. chip points = ``DLIB5_TEMPLATE`` padded and scaled to the chip; a least-squares
       similarity from the chip points to ``shape5`` (Umeyama, chip -> image);
    2. angle and scale of that similarity, and the rect ``centered_drect(tform(size/2,
       size/2), size*scale, size*scale)`` (width - 1 and height - 1), so chip pixel (0, 0)
       samples the rotated rect's top-left corner and (size-1, 0) its top-right;
    3. when the rect covers more than 4x the chip's area, dlib's ``pyramid_down<2>``
       (5-tap [1 4 6 4 1] filter, integer arithmetic) is applied to the bounding box of the
       rotated rect (grown by dlib's border) as many times as dlib would, with dlib's
       ``rect_down`` coordinate mapping (p / 2 - (1.25, 0.75));
    4. bilinear sampling in float64, truncated to uint8 as dlib's ``static_cast`` does,
       and 0 wherever a sample's 2x2 neighbourhood leaves the (cropped) image.

    What may differ from dlib: floating-point rounding of the transform (an SVD here,
    dlib's own there), which moves a pixel's truncated value by one grey level where the
    interpolated value lies within ~1e-9 of an integer; dlib's shortcut for an
    unrotated, unscaled chip (an integer copy) is not taken, which only matters for
    an exactly axis-aligned chip at scale 1.
    """
    shape5 = _check5(shape5)
    _check_chip_args(size, padding)
    details = _chip_details(_chip_points(DLIB5_TEMPLATE, size, padding), shape5, size)
    return _extract_chip(image, details)


def dlib_chip_from_arcface(
    image: np.ndarray,
    landmarks: np.ndarray,
    size: int = 150,
    padding: float = 0.25,
    template: np.ndarray | None = None,
) -> np.ndarray:
    """A dlib chip made from the five ArcFace points instead of dlib's five.

    The chip points are :data:`ARCFACE_IN_DLIB_FRAME` (where the ArcFace points of real
    faces lie, on average, in dlib's chip frame) and the extraction is :func:`dlib_chip`'s.
    Approximate: a face whose mouth or nose sits away from the average moves the fit
    (dlib's five points are all eye corners and nose base, so dlib's chip ignores the
    mouth). For detectors that give only ArcFace points (SCRFD). ``template`` replaces
    ``ARCFACE_IN_DLIB_FRAME`` (unit chip frame), e.g. to evaluate a re-fitted one.
    """
    landmarks = _check5(landmarks)
    _check_chip_args(size, padding)
    unit = ARCFACE_IN_DLIB_FRAME if template is None else _check5(template)
    details = _chip_details(_chip_points(unit, size, padding), landmarks, size)
    return _extract_chip(image, details)


def _check_chip_args(size: int, padding: float) -> None:
    Geometry("dlib_chip", size, padding)  # raises ValueError when out of range


def arcface_from_dlib5(shape5: np.ndarray, template: np.ndarray | None = None) -> np.ndarray:
    """The five ArcFace points (float32, ArcFace order) derived from dlib's five parts.

    dlib's 5-point predictor gives eye corners and the nose base, not the ArcFace
    points (eye centres, nose tip, mouth corners). A least-squares similarity maps
    ``DLIB5_TEMPLATE`` onto the detected parts; the ArcFace points are that similarity
    applied to :data:`ARCFACE_IN_DLIB_FRAME`, except that each eye centre is then moved
    by the fit's residual at that eye's two corners (the detected corners locate the
    eye better than the whole-face fit). The nose tip and mouth corners are the
    average face's: expression and pose are not seen, so ArcFace-template crops from
    these points are approximate. ``template`` replaces ``ARCFACE_IN_DLIB_FRAME``.
    """
    shape5 = _check5(shape5)
    tform = similarity_transform(DLIB5_TEMPLATE, shape5)
    fitted = apply_transform(tform, ARCFACE_IN_DLIB_FRAME if template is None else _check5(template))
    detected_mid = np.stack([(shape5[2] + shape5[3]) / 2, (shape5[0] + shape5[1]) / 2])
    template_mid = apply_transform(
        tform,
        np.stack(
            [
                (DLIB5_TEMPLATE[2] + DLIB5_TEMPLATE[3]) / 2,
                (DLIB5_TEMPLATE[0] + DLIB5_TEMPLATE[1]) / 2,
            ]
        ),
    )
    fitted[:2] += detected_mid - template_mid
    return fitted.astype(np.float32)


def face_chip(image: np.ndarray, shape5: np.ndarray, size: int, padding: float) -> np.ndarray:
    """:func:`dlib_chip`, made by ``dlib.get_face_chip`` itself when the points are whole pixels
    (a shape predictor's always are): the same chip (tests/test_dlib_chip.py), about 15x
    faster than the NumPy path, whose float64 sampling cost ~10 ms a face on this CPU."""
    points = _check5(shape5)
    _check_chip_args(size, padding)
    if not np.array_equal(points, np.round(points)):
        return dlib_chip(image, points, size, padding)
    import dlib

    xs, ys = points[:, 0].astype(int), points[:, 1].astype(int)
    box = dlib.rectangle(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    shape = dlib.full_object_detection(box, [dlib.point(int(x), int(y)) for x, y in zip(xs, ys, strict=True)])
    return np.asarray(dlib.get_face_chip(np.ascontiguousarray(_check_rgb(image)), shape, size, padding))

"""dlib's MMOD CNN face detector run by ONNX Runtime: numpy pre- and post-processing.

``dlib.cnn_face_detection_model_v1(mmod_human_face_detector.dat)(img, upsample)``
rebuilt without dlib or torch at run time. The network (``mmod_human_face_detector.dat``,
dlib-models, public domain / CC0 1.0) is exported to ONNX by ``facegate.export.mmod``
(the export of face_recognition_models' file ships in the package: ``mmod_onnx``),
which stores everything else the detector needs in the ONNX file's metadata (detector
window, NMS thresholds, channel means, pyramid layout, how output cells map to input
pixels). What dlib does, and this module repeats (dlib 20.0.1's ``dnn/input.h``,
``dnn/loss.h``, ``image_transforms/{image_pyramid,interpolation}.h``):

* ``upsample`` times ``pyramid_up``: a bilinear resize of the uint8 image to
  (2h+1, 2w+2), whose float arithmetic and truncation are emulated bit for bit.
* ``input_rgb_image_pyramid<pyramid_down<6>>``: ``(pixel - mean) / 256``, then levels
  of 5/6 the size (floor) down to 5 rows, tiled into one zero-padded image (10 px
  between levels, 11 around), each level resized bilinearly from the previous one.
  The whole tiled image goes through the network in one run, as in dlib, so windows
  near a level's border see the same neighbours and padding as dlib's do.
* ``loss_mmod``: every output cell scoring above ``adjust_threshold`` is a window
  centred on its input pixel, moved to the nearest level and scaled up by 6/5 per
  level, rounded to integers; greedy NMS (highest score first) drops a window whose
  intersection with a kept one exceeds ``nms_iou`` of their bounding box's area or
  ``nms_covered`` of either's area (dlib's ``test_box_overlap``).

Boxes are dlib's inclusive integer rectangles (x1, y1, x2, y2), like ``dlib.rectangle``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facegate.core.errors import FacegateError
from facegate.core.ort_session import default_providers, session_options

__all__ = [
    "METADATA_KEY",
    "MmodDetector",
    "MmodModelError",
    "MmodSpec",
    "decode_windows",
    "mmod_nms",
    "mmod_onnx",
    "pyramid_up",
    "tiled_pyramid",
    "tiled_pyramid_rects",
]

METADATA_KEY = "facegate.mmod"
MODEL_FILE = "mmod_human_face_detector.dat"  # dlib-models, public domain / CC0 1.0
Rect = tuple[int, int, int, int]  # left, top, right, bottom, inclusive (dlib.rectangle)
Detection = tuple[float, float, float, float, float]  # x1, y1, x2, y2, score
_U64 = 1 << 64


class MmodModelError(FacegateError):
    """An MMOD ONNX file without (valid) detector metadata, or a bad detector input."""

    code = "mmod_model_invalid"
    status = 500


@dataclass(frozen=True)
class MmodSpec:
    """Everything besides the network's weights that dlib's detector runs with."""

    windows: tuple[tuple[int, int], ...]  # (width, height) per output channel
    nms_iou: float
    nms_covered: float
    mean_rgb: tuple[float, float, float]
    pyramid_n: int  # pyramid_down<N>: each level is (N-1)/N of the previous
    padding: int
    outer_padding: int
    min_level_rows: int
    stride: int  # output cell (c, r) is centred on input pixel (stride*c + offset, ...)
    offset: int
    min_input: int  # the smallest tiled image side that yields one output cell

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> MmodSpec:
        try:
            raw = json.loads(text)
            raw["windows"] = tuple(tuple(int(v) for v in w) for w in raw["windows"])
            raw["mean_rgb"] = tuple(float(v) for v in raw["mean_rgb"])
            return cls(**raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise MmodModelError(f"bad {METADATA_KEY} metadata: {exc}") from exc


def _lround(x: np.ndarray | float) -> np.ndarray:
    """C's lround: halves away from zero (numpy's round goes to even)."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


# ---------------------------------------------------------------- bilinear resizes


def _accumulate(start: float, step: float, n: int) -> np.ndarray:
    """start + step, start + 2*step, ... summed one step at a time, as dlib's loops do."""
    return np.add.accumulate(np.concatenate([[start], np.full(n, step)]))[1:]


def _rows(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top/bottom source rows and the double weight of the bottom one."""
    scale = (n_in - 1) / max(n_out - 1, 1)
    y = _accumulate(-scale, scale, n_out)
    top = np.floor(y).astype(np.int64)
    return top, np.minimum(top + 1, n_in - 1), y - top


def _columns(n_in: int, n_out: int) -> tuple[np.ndarray, int]:
    """Source x per output column and how many dlib computes in its float32 SIMD loop.

    The SIMD loop keeps 4 lanes of float32 x, adds float32(4*scale) each step, and stops
    at the first group whose last right neighbour would leave the image; the remaining
    columns are computed in double (x += scale).
    """
    scale = (n_in - 1) / max(n_out - 1, 1)
    lanes = np.float32([-4 * scale + j * scale for j in range(4)])
    steps = np.full((n_out // 4 + 1, 4), np.float32(4 * scale), np.float32)
    simd_x = np.add.accumulate(np.vstack([lanes, steps]), axis=0, dtype=np.float32)[1:]
    n_simd = min(4 * int(np.argmin(simd_x[:, 3].astype(np.int64) + 1 < n_in)), n_out)
    tail = _accumulate(-scale + n_simd * scale, scale, n_out - n_simd)
    return np.concatenate([simd_x.reshape(-1)[:n_simd].astype(np.float64), tail]), n_simd


def _x_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Left/right source columns and their float32 weights, as dlib's SIMD loop computes them."""
    x = _columns(n_in, n_out)[0].astype(np.float32)
    left = x.astype(np.int64)
    rx = x - left.astype(np.float32)
    return left, np.minimum(left + 1, n_in - 1), np.float32(1) - rx, rx


def _bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W, C) -> (out_h, out_w, C) float32: dlib's corner-aligned SIMD bilinear resize,
    with its float32 weights (1-fy)(1-fx), (1-fy)fx, fy(1-fx), fy*fx and order of sums."""
    top, bottom, fy = _rows(img.shape[0], out_h)
    left, right, lx, rx = _x_weights(img.shape[1], out_w)
    lx, rx = lx[None, :, None], rx[None, :, None]
    ty, by = (1 - fy).astype(np.float32)[:, None, None], fy.astype(np.float32)[:, None, None]
    src = img.astype(np.float32, copy=False)  # float32 gathers beat uint8 RGB ones by far
    cols_l, cols_r = np.take(src, left, axis=1), np.take(src, right, axis=1)
    out = (ty * lx) * np.take(cols_l, top, axis=0)
    out += (ty * rx) * np.take(cols_r, top, axis=0)
    out += (by * lx) * np.take(cols_l, bottom, axis=0)
    out += (by * rx) * np.take(cols_r, bottom, axis=0)
    return out


def _resize_level(planes: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, out_h, out_w): dlib's pyramid-level resize, done separably
    (rows, then columns). That moves float32 rounding only (about 1e-7 of the values): these
    values are never truncated, and it halves the work."""
    top, bottom, fy = _rows(planes.shape[1], out_h)
    left, right, lx, rx = _x_weights(planes.shape[2], out_w)
    ty, by = (1 - fy).astype(np.float32)[:, None], fy.astype(np.float32)[:, None]
    rows = np.take(planes, top, axis=1)
    rows *= ty
    rows += by * np.take(planes, bottom, axis=1)
    out = np.take(rows, left, axis=2)
    out *= lx
    out += rx * np.take(rows, right, axis=2)
    return out


def pyramid_up(image: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_up(img, pyramid_down<2>)`` of a uint8 RGB image, bit for bit.

    The output is (2h+1, 2w+2): dlib sizes it from ``rect_up`` of the image rectangle.
    Its RGB resize truncates (never rounds): float32 sums in the SIMD columns, double
    ``(1-fy)((1-fx)tl + fx tr) + fy((1-fx)bl + fx br)`` in the last few.
    """
    h, w = image.shape[:2]
    out_h, out_w = 2 * h + 1, 2 * w + 2
    x, n_simd = _columns(w, out_w)
    top, bottom, fy = _rows(h, out_h)
    left = np.floor(x[n_simd:]).astype(np.int64)
    fx = (x[n_simd:] - left)[None, :, None]
    fy = fy[:, None, None]
    cols_l = image[:, left].astype(np.float64)
    cols_r = image[:, np.minimum(left + 1, w - 1)].astype(np.float64)
    tail = (1 - fy) * ((1 - fx) * cols_l[top] + fx * cols_r[top]) + fy * (
        (1 - fx) * cols_l[bottom] + fx * cols_r[bottom]
    )
    simd = _bilinear(image, out_h, out_w)[:, :n_simd]
    return np.concatenate([simd.astype(np.int32), tail.astype(np.int32)], axis=1).astype(np.uint8)


def rect_down(rect: Rect, levels: int) -> Rect:
    """Map a box found on an image upsampled ``levels`` times back (pyramid_down<2>)."""
    corners = np.array(rect, dtype=np.float64)
    for _ in range(levels):
        corners = corners / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])
    return tuple(int(v) for v in _lround(corners))  # type: ignore[return-value]


# ---------------------------------------------------------------- the tiled pyramid


def tiled_pyramid_rects(nr: int, nc: int, spec: MmodSpec) -> tuple[list[Rect], tuple[int, int]]:
    """Where dlib's ``compute_tiled_image_pyramid_details`` puts each level, and the tile size.

    Level 0 and the following ones go down the left column until the rest fit in a
    second column, right-aligned and stacked upwards from the bottom. dlib's layout test
    mixes signed and unsigned longs; the wrap-arounds (``% 2**64``) are part of it.
    """
    if nr * nc == 0 or nc < spec.padding:  # narrower: the wrap-around breaks dlib's layout
        return [], (0, 0)
    rate, pad, outer = (spec.pyramid_n - 1.0) / spec.pyramid_n, spec.padding, spec.outer_padding
    sizes = [(nr, nc)]
    while True:
        nr, nc = math.floor(rate * nr), math.floor(rate * nc)
        if nr * nc == 0 or nr < spec.min_level_rows:
            break
        sizes.append((nr, nc))
    h0, w0 = sizes[0]
    total = sum(h + pad for h, _ in sizes) - 2 * pad
    height = prev_width = 0
    for h, w in sizes:
        fits_beside = w <= (w0 - prev_width - pad) % _U64
        if fits_beside and (2 * (height - h0)) % _U64 >= (total - h0) % _U64:
            break
        height, prev_width = height + h + pad, w
    height -= pad
    rects: list[Rect] = []
    y = outer
    while y < height + outer and len(rects) < len(sizes):
        h, w = sizes[len(rects)]
        rects.append((outer, y, outer + w - 1, y + h - 1))
        y += h + pad
    y -= pad
    right = outer + w0 - 1
    for h, w in sizes[len(rects) :]:
        rect = (right - w + 1, y - h, right, y - 1)
        if _intersection(rects[0], rect) > 0:
            break
        rects.append(rect)
        y -= h + pad
    return rects, (height + 2 * outer, w0 + 2 * outer)


def tiled_pyramid(image: np.ndarray, spec: MmodSpec) -> tuple[np.ndarray, list[Rect]]:
    """The network input (3, H, W) float32 for a uint8 RGB image, and each level's rect."""
    rects, (rows, cols) = tiled_pyramid_rects(image.shape[0], image.shape[1], spec)
    tile = np.zeros((3, rows, cols), np.float32)
    if rects:
        mean = np.float32(spec.mean_rgb)[:, None, None]
        level = (image.transpose(2, 0, 1).astype(np.float32) - mean) / np.float32(256)
        for i, (left, top, right, bottom) in enumerate(rects):
            if i:
                level = _resize_level(level, bottom - top + 1, right - left + 1)
            tile[:, top : bottom + 1, left : right + 1] = level
    return tile, rects


# ---------------------------------------------------------------- windows and NMS


def _intersection(a: Rect, b: Rect) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    return w * h if w > 0 and h > 0 else 0


def _area(r: Rect) -> int:
    return max(0, r[2] - r[0] + 1) * max(0, r[3] - r[1] + 1)


def _nearest_level(rects: list[Rect], x: float, y: float) -> int:
    """dlib's ``nearest_rect``: the first rect containing the point, else the closest one."""
    best, best_dist = 0, math.inf
    for i, (left, top, right, bottom) in enumerate(rects):
        dx, dy = x - min(max(x, left), right), y - min(max(y, top), bottom)
        if dx == 0 and dy == 0:
            return i
        if math.hypot(dx, dy) < best_dist:
            best, best_dist = i, math.hypot(dx, dy)
    return best


def decode_windows(
    scores: np.ndarray, rects: list[Rect], spec: MmodSpec, adjust_threshold: float = 0.0
) -> list[tuple[Rect, float]]:
    """Windows (tiled-pyramid cells scoring above the threshold) as image rects, best first.

    ``scores`` is the network output (k, R, C), one channel per detector window.
    """
    found: list[tuple[Rect, float]] = []
    ratio = spec.pyramid_n / (spec.pyramid_n - 1.0)
    for k, (width, height) in enumerate(spec.windows):
        for r, c in zip(*np.nonzero(scores[k] > adjust_threshold), strict=True):
            x, y = spec.stride * int(c) + spec.offset, spec.stride * int(r) + spec.offset
            level = _nearest_level(rects, x, y)
            left, top = rects[level][:2]
            corners = np.array([x - (width - 1) / 2 - left, y - (height - 1) / 2 - top,
                                x + (width - 1) / 2 - left, y + (height - 1) / 2 - top])
            for _ in range(level):
                corners = corners * ratio + 0.3
            found.append((tuple(int(v) for v in _lround(corners)), float(scores[k, r, c])))
    order = sorted(range(len(found)), key=lambda i: -found[i][1])
    return [found[i] for i in order]  # type: ignore[misc]


def mmod_nms(windows: list[tuple[Rect, float]], spec: MmodSpec) -> list[tuple[Rect, float]]:
    """Greedy NMS over windows sorted best first, with dlib's ``test_box_overlap``.

    Its "IoU" divides by the area of the two boxes' bounding box, not their union.
    """
    kept: list[tuple[Rect, float]] = []
    for rect, score in windows:
        for other, _ in kept:
            inner = _intersection(rect, other)
            if inner == 0:
                continue
            hull = (min(rect[0], other[0]), min(rect[1], other[1]),
                    max(rect[2], other[2]), max(rect[3], other[3]))
            if (inner / _area(hull) > spec.nms_iou or inner / _area(rect) > spec.nms_covered
                    or inner / _area(other) > spec.nms_covered):
                break
        else:
            kept.append((rect, score))
    return kept


# ---------------------------------------------------------------- the detector


class MmodDetector:
    """ONNX Runtime session over an MMOD ONNX file from ``facegate.export.mmod``.

    ``detect(rgb_uint8, upsample)`` returns what ``cnn_face_detection_model_v1(img,
    upsample)`` does: [(x1, y1, x2, y2, confidence)], best first. A session serves
    concurrent calls (ONNX Runtime's ``run`` is thread-safe).
    """

    def __init__(
        self,
        onnx_path: str | Path,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self._session = ort.InferenceSession(
            str(onnx_path), sess_options=session_options(intra_op_threads),
            providers=providers or default_providers(),
        )
        meta = self._session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise MmodModelError(f"{onnx_path}: no {METADATA_KEY} metadata (not an MMOD export)")
        self.spec = MmodSpec.from_json(meta[METADATA_KEY])
        self._input = self._session.get_inputs()[0].name

    def scores(self, tile: np.ndarray) -> np.ndarray:
        """Network output (k, R, C) for one tiled pyramid (3, H, W)."""
        return self._session.run(None, {self._input: tile[None]})[0][0]

    def detect(
        self, image: np.ndarray, upsample: int = 0, adjust_threshold: float = 0.0
    ) -> list[Detection]:
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            raise MmodModelError("image must be an (H, W, 3) uint8 RGB array")
        if upsample < 0:
            raise MmodModelError(f"upsample must be >= 0, got {upsample}")
        for _ in range(upsample):
            image = pyramid_up(image)
        tile, rects = tiled_pyramid(image, self.spec)
        if min(tile.shape[1:]) < self.spec.min_input:
            return []
        windows = decode_windows(self.scores(tile), rects, self.spec, adjust_threshold)
        return [
            (*(float(v) for v in rect_down(rect, upsample)), score)  # type: ignore[misc]
            for rect, score in mmod_nms(windows, self.spec)
        ]


PACKAGED = Path(__file__).parent / "models"  # the export of the .dat that face_recognition_models ships
CACHE = Path.home() / ".cache" / "facegate"  # exports of any other .dat


def mmod_onnx(folder: str | Path | None = None, dat_path: str | Path | None = None) -> Path:
    """The detector's ONNX file for ``dat_path`` (default: face_recognition_models' .dat).

    Named after the .dat's sha256, so another model file needs its own export. Looked up
    in ``folder``, or by default in the package (which ships the export of
    face_recognition_models' file, so a server needs no torch) and then ``CACHE``. A
    missing file raises MmodModelError with the command that makes it
    (``python -m facegate.export.mmod export``, which needs torch).
    """
    if dat_path is None:
        from facegate.core.detect import dlib_model_file

        dat_path = dlib_model_file(MODEL_FILE)
    digest = hashlib.sha256(Path(dat_path).read_bytes()).hexdigest()[:16]
    name = f"{Path(dat_path).stem}-{digest}.onnx"
    places = [Path(folder)] if folder is not None else [PACKAGED, CACHE]
    for place in places:
        if (place / name).exists():
            return place / name
    raise MmodModelError(
        f"no ONNX export of {dat_path} in {', '.join(map(str, places))}; make it with "
        f"`python -m facegate.export.mmod export {places[-1] / name} --dat {dat_path}` "
        "(needs torch: facegate[train])"
    )

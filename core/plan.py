"""Detection planned by face size, not photo size (photos larger than the detector's working size).

dlib's HOG and MMOD find faces whose box is at least their 80 px window wide, and their
time grows with the pixels they scan (HOG on this machine: ~60 ms per grey megapixel,
4x that at upsample 1). So instead of scanning a fixed-size copy of the photo,
:func:`plan` lists steps from coarse to fine, each finding faces down to a size in the
*original* photo's pixels, and :func:`locate_faces` runs them in order until one finds a
face:

1. HOG on the grey photo at the detector's working size (longer side ``max_side``,
   1024, snapped down to a DCT scale within 0.8x, so the decode is scanned as it is):
   faces >= 80 * longer side / 1024 px (a 12 MP photo, at 1/4: >= 320 px). A photo
   at least twice that size is first glanced at half this scale (12 MP: 1/8, ~12 ms of
   HOG), and each face the glance finds is looked at again at the working size in a
   region half a box side around it (a face just under the glance's window comes back
   with a loose box, and a low score may be no face): a phone portrait stops there,
   with the working size's box, for a fraction of the whole step's scan.
2. HOG at scale 0.8: faces >= 100 px at any photo size (early exit before step 3).
3. HOG at upsample 1 at full resolution: faces >= ``MIN_FACE`` (40 px), for photos of
   up to ``FINE_PIXELS`` (12.5 MP: a 4032x3024 phone photo); a larger photo is scanned
   at the scale that holds it to ``FINE_PIXELS``, finding faces >= 40 px *
   sqrt(pixels / FINE_PIXELS) (40 MP: 72 px), so this step never scans more than
   4 x 12.5 upsampled megapixels. :func:`smallest_face` is the guarantee for a photo.
4. Within the budget only: dlib's MMOD CNN at the working size on colour (faces HOG's
   frontal filters miss, >= step 1's size, ~10x HOG's cost per pixel); before step 3
   where it costs under half of it (photos of ~4 MP and more), else after.

Steps 1-3 are required, so a photo with no face costs all of them: ~0.4 s of one core
per megapixel here up to 12.5 MP (12 MP: ~5 s, most of it step 3). The budget
(``budget_s``, the server's ``FACEGATE_DETECT_BUDGET_S``) counts from the start of the
photo's decode. An optional step runs only if its time, estimated from the first
step's measured seconds per scanned pixel on this photo (so a loaded machine estimates
high), fits what is left of the budget. Required steps run past the budget, but not
past ``HARD_STOP`` budgets (checked before each step and between the bands of a scan):
then :class:`WorkBudgetExceeded` (503), so one upload cannot hold a worker for long on
an overloaded machine. HOG scans over ``BAND_PIXELS`` run in overlapping bands of rows,
which bounds their memory and the time between those checks; scans over
``SPLIT_PIXELS`` are cut in two bands at least, and a photo's bands run on its worker's
thread and one helper thread (dlib's HOG releases the GIL), so on an idle machine one
photo's scan uses both cores. A non-JPEG photo over the pixel budget has no pixels
finer than its reduced decode; no step goes finer than that (its smallest face: 40 px /
that scale). What it cannot find: faces under :func:`smallest_face`, faces the HOG
frontal filters miss that are smaller than step 1's size, and smaller faces of a photo
in which a step found a larger one.

Boxes found at a reduced scale are mapped to the original; landmarks and the crop are
taken from the photo's pixels around each box at the coarsest DCT scale where the box
is still ``CROP_FACE_PX`` wide (full resolution for smaller faces), so crops keep the
detail of the upload.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from facegate.core.detect import Box, DlibDetector, Face, mmod_upsample
from facegate.core.errors import WorkBudgetExceeded
from facegate.core.photo import Photo

HOG_WINDOW = 80  # px: the smallest box dlib's HOG (and MMOD) return at upsample 0
GUARANTEED_FACE = 100  # px of the original: step 2 finds faces this large at any photo size
MIN_FACE = 40  # px of the original: step 3 (HOG at upsample 1) finds faces this large ...
FINE_PIXELS = 12_500_000  # ... in photos of up to this many pixels (larger: see smallest_face)
MMOD_COST = 10.0  # MMOD on colour over HOG on grey, per pixel (1024x768: ~0.62 s vs ~0.07 s here)
# Landmarks and crops come from pixels where the face box is at least this wide
# (1.2x the ~100 px face of a 150 px dlib chip, so crops are reduced, never enlarged),
# or from full resolution.
CROP_FACE_PX = 120
# Required steps still run past the budget (their cost is bounded by the photo's pixels),
# but not once a photo has taken this many budgets: the machine is overloaded.
HARD_STOP = 4.0
# HOG scans larger than this many (grey, upsampled) pixels run in bands of rows (_banded_hog).
BAND_PIXELS = 8_000_000
# ... and scans over this many in two bands at least, on two threads (_banded_hog).
SPLIT_PIXELS = 2_000_000
_helpers = threading.local()


@dataclass(frozen=True)
class Step:
    """One detector pass: ``finder`` on the photo at ``scale`` with ``upsample``."""

    finder: Literal["hog", "mmod"]
    scale: float
    upsample: int
    required: bool
    glance: bool = False

    @property
    def min_face(self) -> float:
        """The smallest face (box side, px of the original) this step finds."""
        return HOG_WINDOW / self.scale / 2**self.upsample

    def units(self, pixels: int) -> float:
        """Scanned pixels, weighted by the finder's cost per pixel (HOG at upsample 0 = 1)."""
        return pixels * self.scale**2 * 4**self.upsample * (MMOD_COST if self.finder == "mmod" else 1.0)


@dataclass(frozen=True)
class Located:
    """A face in the original photo's pixels, and the pixels its crop is made from."""

    face: Face
    pixels: np.ndarray  # RGB around the face
    local: Face  # the same face in ``pixels``' coordinates


def plan(width: int, height: int, detector: DlibDetector, max_scale: float = 1.0) -> list[Step]:
    """The steps for a ``width`` x ``height`` photo (coarse to fine; see the module doc),
    none finer than ``max_scale`` (a non-JPEG photo over the pixel budget has no finer pixels)."""
    working = min(1.0, max_scale, detector.max_side / max(width, height))
    coarse = _snap(working)
    steps = []
    if working <= 0.5:  # at least twice the working size: glance at a quarter of the pixels first
        steps.append(Step("hog", _snap(working / 2), 0, required=True, glance=True))
    steps.append(Step("hog", coarse, 0, required=True))
    guaranteed = min(max_scale, HOG_WINDOW / GUARANTEED_FACE)
    if coarse < guaranteed:
        steps.append(Step("hog", guaranteed, 0, required=True))
    last = []
    if detector.upsample >= 1:
        fine = Step("hog", min(max_scale, math.sqrt(FINE_PIXELS / (width * height))), 1, required=True)
        if fine.min_face < min(s.min_face for s in steps):
            last.append(fine)
    if detector.boxes == "hog+mmod":
        up = mmod_upsample((round(height * coarse), round(width * coarse)), detector.upsample)
        mmod = Step("mmod", coarse, up, required=False)
        # Before the fine step where it costs under half of it (large photos), else after.
        cheap = not last or 2 * mmod.units(width * height) <= last[0].units(width * height)
        last.insert(0 if cheap else 1, mmod)
    return steps + last


def smallest_face(width: int, height: int, detector: DlibDetector, max_scale: float = 1.0) -> float:
    """The smallest face (box side, px of the original) the plan always searches for:
    ``MIN_FACE`` up to ``FINE_PIXELS``, then growing with the square root of the pixels."""
    return min(s.min_face for s in plan(width, height, detector, max_scale)
               if s.required and s.finder == "hog")


def _snap(scale: float) -> float:
    """A JPEG DCT scale (1/2, 1/4, 1/8) just under ``scale`` (down to 0.8x), else ``scale``:
    the step then scans the reduced decode itself, with no resize and no finer decode."""
    for k in (2, 4, 8):
        if 0.8 * scale <= 1 / k <= scale:
            return 1 / k
    return scale


def locate_faces(photo: Photo, detector: DlibDetector, *, budget_s: float,
                 started: float) -> tuple[list[Located], list[Step]]:
    """The faces of the first step that finds any (largest first), and the steps run."""
    steps = plan(photo.width, photo.height, detector, photo.max_scale)
    deadline = started + HARD_STOP * budget_s
    seconds_per_unit: float | None = None
    done: list[Step] = []
    for i, step in enumerate(steps):
        units = step.units(photo.pixels)
        elapsed = time.perf_counter() - started
        if step.required and elapsed > HARD_STOP * budget_s:
            raise _overloaded(elapsed, budget_s, step)
        if not step.required and seconds_per_unit is not None \
                and elapsed + seconds_per_unit * units > budget_s:
            continue
        decoding = photo.decode_s
        t0 = time.perf_counter()
        largest = 1.25 * min(d.min_face for d in done) if done else float(max(photo.width, photo.height))
        boxes = _boxes(photo, step, largest, deadline, budget_s)
        if step.finder == "hog":  # this photo's HOG rate on this machine, now
            scan = time.perf_counter() - t0 - (photo.decode_s - decoding)
            seconds_per_unit = scan / max(units, 1.0)
        done.append(step)
        if step.glance:  # looked at again at the next (working) size, around each find
            boxes = _confirm(photo, steps[i + 1], boxes) if boxes else []
        if boxes:
            stage = f"hog{step.upsample}" if step.finder == "hog" else "mmod"  # Face.stage
            located = [_landmarks(photo, detector, box, score, stage) for box, score in boxes]
            located.sort(key=lambda f: f.face.area(), reverse=True)
            return located, done
    return [], done


def _overloaded(elapsed: float, budget_s: float, step: Step) -> WorkBudgetExceeded:
    return WorkBudgetExceeded(
        f"{elapsed:.1f} s spent, {HARD_STOP:g}x the {budget_s:g} s detection budget, "
        f"before faces >= {step.min_face:.0f} px were searched: the server is overloaded")


def _boxes(photo: Photo, step: Step, max_face: float, deadline: float,
           budget_s: float) -> list[tuple[Box, float]]:
    """The step's boxes, in the original photo's pixels; faces over ``max_face`` (px of
    the original) were looked for by an earlier step and need not be whole in one band."""
    if step.finder == "hog":
        # The glance scans a reduction of the working size's decode, which the next step
        # and the crops of large faces then reuse: one entropy decode, not two.
        image = photo.gray(step.scale, decode_at=2 * step.scale if step.glance else None)
        found = _banded_hog(image, step.upsample, max_face * image.shape[1] / photo.width,
                            lambda: _over_time(deadline, budget_s, step))
    else:
        image = photo.view("RGB", step.scale)
        found = DlibDetector.mmod_boxes(image, step.upsample)
    s = image.shape[1] / photo.width  # the realised scale, one for both axes (as _downscale)
    return [((x1 / s, y1 / s, x2 / s, y2 / s), score) for (x1, y1, x2, y2), score in found]


def _over_time(deadline: float, budget_s: float, step: Step) -> None:
    now = time.perf_counter()
    if now > deadline:
        raise _overloaded(now - deadline + HARD_STOP * budget_s, budget_s, step)


def _confirm(photo: Photo, step: Step, glanced: list[tuple[Box, float]]) -> list[tuple[Box, float]]:
    """HOG at ``step``'s scale in a region half a box side around each of ``glanced`` (the
    glance's finds, original pixels), or none when the regions would cost the whole step."""
    image = photo.gray(step.scale)
    h, w = image.shape
    s = w / photo.width
    regions = []
    for (x1, y1, x2, y2), _ in glanced:
        side = 0.5 * max(x2 - x1, y2 - y1)
        regions.append((max(0, math.floor((x1 - side) * s)), max(0, math.floor((y1 - side) * s)),
                        min(w, math.ceil((x2 + side) * s)), min(h, math.ceil((y2 + side) * s))))
    if sum((r - left) * (b - top) for left, top, r, b in regions) >= h * w:
        return []
    found = []
    for left, top, right, bottom in regions:
        crop = np.ascontiguousarray(image[top:bottom, left:right])
        found += [(((bx1 + left) / s, (by1 + top) / s, (bx2 + left) / s, (by2 + top) / s), score)
                  for (bx1, by1, bx2, by2), score in DlibDetector.hog_boxes(crop, 0)]
    return _distinct(found)


def _landmarks(photo: Photo, detector: DlibDetector, box: Box, score: float,
               stage: str) -> Located:
    """Landmarks fitted on the photo's own pixels around ``box``, mapped to the original."""
    pixels, (ox, oy), scale = photo.region(box, CROP_FACE_PX)
    x1, y1, x2, y2 = box
    local_box = ((x1 - ox) * scale, (y1 - oy) * scale, (x2 - ox) * scale, (y2 - oy) * scale)
    local = detector.fit_landmarks(pixels, [(local_box, score)], stage)[0]
    offset = np.array([ox, oy], np.float32)
    face = replace(
        local,
        box=box,
        landmarks=local.landmarks / np.float32(scale) + offset,
        dlib5=None if local.dlib5 is None else local.dlib5 / np.float32(scale) + offset,
    )
    return Located(face, pixels, local)


def _banded_hog(image: np.ndarray, upsample: int, largest: float,
                check: Callable[[], None]) -> list[tuple[Box, float]]:
    """HOG over ``image`` in bands of rows of at most ``BAND_PIXELS`` (upsampled; overlapping
    by the ``largest`` face sought, px of ``image``), so a 40 MP scan neither holds its whole
    feature pyramid (~7 bytes per upsampled pixel) nor its worker past the budget (``check``
    runs before each band). A scan of over ``SPLIT_PIXELS`` is split into at least two bands,
    and the bands run on this thread and its helper (dlib releases Python's GIL while it
    scans), so one photo's scan takes both cores of an idle machine; duplicates from the
    overlaps go."""
    h, w = image.shape
    overlap = int(largest * 1.3) + 1
    rows = max(BAND_PIXELS // (w * 4**upsample), 2 * overlap)
    if rows >= h and h * w * 4**upsample >= SPLIT_PIXELS and h >= 3 * overlap:
        rows = -(-(h + overlap) // 2)
    if rows >= h:
        return DlibDetector.hog_boxes(image, upsample)

    def scan(top: int) -> list[tuple[Box, float]]:
        check()
        band = np.ascontiguousarray(image[top:min(h, top + rows)])
        return [((x1, y1 + top, x2, y2 + top), s) for (x1, y1, x2, y2), s in
                DlibDetector.hog_boxes(band, upsample)]

    tops = list(range(0, h - overlap, rows - overlap))
    helped = [_helper().submit(scan, top) for top in tops[1::2]]
    try:
        found = [box for top in tops[::2] for box in scan(top)]
        found += [box for f in helped for box in f.result()]
    finally:
        for f in helped:
            f.cancel()
    return _distinct(found)


def _helper() -> ThreadPoolExecutor:
    """This thread's helper for banded scans: one thread, kept (with its own HOG detector,
    ~0.5 s to build) for the life of the calling thread, so threads scanning at once stay
    at most twice the face workers."""
    pool = getattr(_helpers, "pool", None)
    if pool is None:
        pool = _helpers.pool = ThreadPoolExecutor(1, thread_name_prefix="hog-band")
    return pool


def warm_up() -> None:
    """Build this thread's helper and its HOG detector, so a request does not pay for it."""
    _helper().submit(DlibDetector.hog_boxes, np.zeros((64, 64), np.uint8), 0).result()


def _distinct(found: list[tuple[Box, float]]) -> list[tuple[Box, float]]:
    """The boxes by score, less any mostly inside a better one (a face cut by a band edge,
    or found again from another glance)."""
    kept: list[tuple[Box, float]] = []
    for box, score in sorted(found, key=lambda b: b[1], reverse=True):
        if all(_overlap(box, other) < 0.5 for other, _ in kept):
            kept.append((box, score))
    return kept


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area (a face cut by a band edge is inside the whole one)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller if smaller > 0 else 0.0

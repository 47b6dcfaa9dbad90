"""Detection planned by face size, not photo size (photos larger than the detector's working size).

dlib's HOG and MMOD find faces whose box is at least their 80 px window wide, and their
time grows with the pixels they scan (HOG on this machine: ~60 ms per grey megapixel).
So instead of scanning a fixed-size copy of the photo, :func:`plan` lists steps from
coarse to fine, each finding faces down to a size in the *original* photo's pixels, and
:func:`locate_faces` runs them in order until one finds a face:

1. HOG on the grey photo at the detector's working size (longer side ``max_side``,
   1024, snapped down to a DCT scale within 0.8x, so the decode is scanned as it is):
   faces >= 80 * longer side / 1024 px (a 12 MP photo, at 1/4: >= 320 px). A photo
   at least twice that size is first glanced at half this scale (12 MP: 1/8, faces
   >= 640 px, ~15 ms of HOG; only confident finds count): a phone portrait stops there.
2. HOG at scale 0.8: faces >= ``GUARANTEED_FACE`` (100 px) at any photo size. Always
   run (a 40 MP photo: 26 grey megapixels, ~1.6 s). A non-JPEG photo over the pixel
   budget has no pixels finer than its reduced decode; no step goes finer than that.
3. Within the budget only: HOG at full resolution (>= 80 px), dlib's MMOD CNN at the
   working size on colour (faces HOG's frontal filters miss, >= step 1's size, ~10x
   HOG's cost per pixel), then HOG at upsample 1 (>= 40 px).

The budget (``budget_s``, the server's ``FACEGATE_DETECT_BUDGET_S``) counts from the
start of the photo's decode. Each step's time is estimated from the first step's
measured seconds per scanned pixel on this photo, so a loaded machine estimates high.
An optional step that does not fit is skipped (the photo's smallest searched face is
then larger). Required steps run past the budget (their cost is bounded by the photo's
pixels), unless ``HARD_STOP`` budgets are already spent: then :class:`WorkBudgetExceeded`
(503). HOG scans over ``BAND_PIXELS`` run in overlapping bands of rows, which bounds
their memory and lets other threads have Python's GIL between bands. What it cannot
find: faces under 100 px (under 80 px where the budget allows the full-resolution
step, under 40 px at all), and non-frontal faces HOG misses that are smaller than step
1's size.

Boxes found at a reduced scale are mapped to the original; landmarks and the crop are
taken from the photo's pixels around each box at the coarsest DCT scale where the box
is still ``CROP_FACE_PX`` wide (full resolution for smaller faces), so crops keep the
detail of the upload.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from facegate.core.detect import Box, DlibDetector, Face, mmod_upsample
from facegate.core.errors import WorkBudgetExceeded
from facegate.core.photo import Photo

HOG_WINDOW = 80  # px: the smallest box dlib's HOG (and MMOD) return at upsample 0
GUARANTEED_FACE = 100  # px of the original: searched at any photo size (step 2)
MMOD_COST = 10.0  # MMOD on colour over HOG on grey, per pixel (1024x768: ~0.62 s vs ~0.07 s here)
# Landmarks and crops come from pixels where the face box is at least this wide
# (1.5x the face in a 150 px dlib chip, so crops are reduced, never enlarged),
# or from full resolution.
CROP_FACE_PX = 150
# Required steps still run past the budget (their cost is bounded by the photo's pixels),
# but not once a photo has taken this many budgets: the machine is overloaded.
HARD_STOP = 4.0
# The glance keeps only confident faces (HOG's SVM margin; real faces score ~0.5-2.5): a
# face just under its window size comes back with a loose box, which the next step mends.
GLANCE_MIN_SCORE = 0.5
# HOG scans larger than this many (grey, upsampled) pixels run in bands of rows (_banded_hog).
BAND_PIXELS = 8_000_000


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
    if coarse < max_scale and guaranteed < max_scale:
        steps.append(Step("hog", max_scale, 0, required=False))
    if detector.boxes == "hog+mmod":
        up = mmod_upsample((round(height * coarse), round(width * coarse)), detector.upsample)
        steps.append(Step("mmod", coarse, up, required=False))
    if detector.upsample >= 1:
        steps.append(Step("hog", max_scale, 1, required=False))
    return steps


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
    seconds_per_unit: float | None = None
    done: list[Step] = []
    for step in steps:
        units = step.units(photo.pixels)
        elapsed = time.perf_counter() - started
        if step.required and elapsed > HARD_STOP * budget_s:
            raise WorkBudgetExceeded(
                f"{elapsed:.1f} s spent, {HARD_STOP:g}x the {budget_s:g} s detection budget, "
                f"before faces >= {step.min_face:.0f} px were searched: the server is overloaded")
        if not step.required and seconds_per_unit is not None \
                and elapsed + seconds_per_unit * units > budget_s:
            continue
        decoding = photo.decode_s
        t0 = time.perf_counter()
        largest = 1.25 * min(d.min_face for d in done) if done else float(max(photo.width, photo.height))
        boxes = _boxes(photo, step, max_face=largest)
        if step.finder == "hog":  # this photo's HOG rate on this machine, now
            scan = time.perf_counter() - t0 - (photo.decode_s - decoding)
            seconds_per_unit = scan / max(units, 1.0)
        done.append(step)
        if step.glance:  # a face near the window's size at 1/8 gets a loose box: look again
            boxes = [b for b in boxes if b[1] >= GLANCE_MIN_SCORE]
        if boxes:
            stage = f"hog{step.upsample}" if step.finder == "hog" else "mmod"  # Face.stage
            located = [_landmarks(photo, detector, box, score, stage) for box, score in boxes]
            located.sort(key=lambda f: f.face.area(), reverse=True)
            return located, done
    return [], done


def _boxes(photo: Photo, step: Step, max_face: float) -> list[tuple[Box, float]]:
    """The step's boxes, in the original photo's pixels; faces over ``max_face`` (px of
    the original) were looked for by an earlier step and need not be whole in one band."""
    if step.finder == "hog":
        # The glance scans a reduction of the working size's decode, which the next step
        # and the crops of large faces then reuse: one entropy decode, not two.
        image = photo.gray(step.scale, decode_at=2 * step.scale if step.glance else None)
        found = _banded_hog(image, step.upsample, largest=max_face * step.scale * 2**step.upsample)
    else:
        image = photo.view("RGB", step.scale)
        found = DlibDetector.mmod_boxes(image, step.upsample)
    s = image.shape[1] / photo.width  # the realised scale, one for both axes (as _downscale)
    return [((x1 / s, y1 / s, x2 / s, y2 / s), score) for (x1, y1, x2, y2), score in found]


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


def _banded_hog(image: np.ndarray, upsample: int, largest: float) -> list[tuple[Box, float]]:
    """HOG over ``image`` in bands of rows of at most ``BAND_PIXELS`` (overlapping by the
    ``largest`` face sought), so a 40 MP scan neither holds its whole feature pyramid
    (~6 bytes per pixel) nor Python's GIL for seconds; duplicates from the overlaps go."""
    h, w = image.shape
    overlap = int(largest * 1.3) + 1
    rows = max(BAND_PIXELS // (w * 4**upsample), 2 * overlap)
    if rows >= h:
        return DlibDetector.hog_boxes(image, upsample)
    found: list[tuple[Box, float]] = []
    for top in range(0, h - overlap, rows - overlap):
        band = np.ascontiguousarray(image[top:min(h, top + rows)])
        found += [((x1, y1 + top, x2, y2 + top), s) for (x1, y1, x2, y2), s in
                  DlibDetector.hog_boxes(band, upsample)]
    found.sort(key=lambda b: b[1], reverse=True)
    kept: list[tuple[Box, float]] = []
    for box, score in found:
        if all(_overlap(box, other) < 0.5 for other, _ in kept):
            kept.append((box, score))
    return kept


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area (a face cut by a band edge is inside the whole one)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller if smaller > 0 else 0.0

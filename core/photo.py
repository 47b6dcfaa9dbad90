"""An upload opened once and decoded at the scale each step asks for.

Detecting a face in a 12 MP phone photo needs a grey image of a few hundred thousand
pixels first, and full-resolution colour only around the face, so :class:`Photo`
never makes the full-size RGB array a whole-image decode would. JPEG is decoded by
libjpeg's DCT scaling (1/2, 1/4, 1/8) and, for detection, as luminance only (3-4x
faster than RGB: a 12 MP photo in ~13 ms on this machine); each (mode, scale) is
decoded once and kept for the photo's life. Other formats cannot be decoded at
reduced scale, so they are decoded once (over ``max_detect_pixels``: reduced in
bands as :func:`facegate.core.image.decode_scaled` does) and every view comes from that.

Geometry no face can be found in (a side under ``MIN_SIDE`` pixels, or an aspect
ratio over ``MAX_ASPECT``) is refused from the header, before any pixel is decoded:
a 38 KB PNG declaring 39,000,000 x 1 pixels used to cost ~10 s of CPU.
"""

from __future__ import annotations

import io
import math
import time

import cv2
import numpy as np
from facegate.core.errors import ImageDecodeError, ImageDegenerate
from facegate.core.image import _flatten, _open, decode_scaled
from PIL import Image

# The smallest face the detectors find is 40 px wide (HOG or MMOD at upsample 1); an
# image narrower than that holds no findable face.
MIN_SIDE = 40
# Wider than any panorama a phone makes (about 1:4); past it an image is a strip.
MAX_ASPECT = 20.0
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError)


def check_face_geometry(width: int, height: int) -> None:
    """Refuse (ImageDegenerate, 422) sizes no face can be found in."""
    short, long = sorted((width, height))
    if short < MIN_SIDE:
        raise ImageDegenerate(f"image is {width}x{height} pixels: a side under {MIN_SIDE} px "
                              "cannot hold a face the detector finds")
    if long / short > MAX_ASPECT:
        raise ImageDegenerate(f"image is {width}x{height} pixels: an aspect ratio over "
                              f"{MAX_ASPECT:g}:1 is not a photo of a face")


class Photo:
    """One upload, checked from its header (size, pixel limit, face geometry), decoded lazily.

    ``width`` x ``height`` is the upright size (EXIF orientation applied). Scales are
    relative to it, the same on both axes.
    """

    def __init__(self, data: bytes, *, max_bytes: int, max_pixels: int,
                 max_detect_pixels: int | None) -> None:
        img, self.format = _open(data, max_bytes, max_pixels)
        check_face_geometry(*img.size)
        self._orientation = _orientation(img)
        raw_w, raw_h = img.size
        swap = self._orientation in (5, 6, 7, 8)
        self.width, self.height = (raw_h, raw_w) if swap else (raw_w, raw_h)
        img.close()
        self._data = bytes(data)
        self._limits = {"max_bytes": max_bytes, "max_pixels": max_pixels,
                        "max_detect_pixels": max_detect_pixels}
        self._decoded: dict[tuple[str, int], Image.Image] = {}
        self._base: tuple[np.ndarray, float] | None = None
        self.decode_s = 0.0  # seconds spent decoding so far

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def max_scale(self) -> float:
        """The finest scale there are pixels for: 1, or for a non-JPEG photo over
        ``max_detect_pixels`` the scale it is decoded at (finer views would be enlargements)."""
        budget = self._limits["max_detect_pixels"]
        if self.format == "JPEG" or budget is None or self.pixels <= budget:
            return 1.0
        return math.sqrt(budget / self.pixels)

    def gray(self, scale: float, decode_at: float | None = None) -> np.ndarray:
        """The photo's luminance at ``scale`` (<= 1) of its upright size, (H, W) uint8."""
        return self.view("L", scale, decode_at)

    def view(self, mode: str, scale: float, decode_at: float | None = None) -> np.ndarray:
        """The whole photo at ``scale`` (<= 1) of its upright size, as "L" (H, W) or "RGB"
        (H, W, 3) uint8: the coarsest decode at least that large (or at least ``decode_at``,
        a finer one a later step will reuse), then an area resize."""
        size = (max(1, round(self.width * scale)), max(1, round(self.height * scale)))
        if self.format == "JPEG":
            source = _as(self._jpeg(self._reduction(max(scale, decode_at or 0.0))), mode)
        else:
            source, _ = self._base_rgb()
            if mode == "L":
                source = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)
        if (source.shape[1], source.shape[0]) == size:
            return np.ascontiguousarray(source)
        interpolation = cv2.INTER_AREA if source.shape[1] > size[0] else cv2.INTER_LINEAR
        return cv2.resize(source, size, interpolation=interpolation)

    def region(self, box: tuple[float, float, float, float], face_px: float,
               margin: float = 1.0) -> tuple[np.ndarray, tuple[float, float], float]:
        """RGB pixels around ``box`` (upright original pixels, grown by ``margin`` box sides
        each way), at the coarsest scale where the box is still ``face_px`` wide (or the
        finest there is): (pixels, their top-left corner in the original, their scale)."""
        x1, y1, x2, y2 = box
        side = max(x2 - x1, y2 - y1, 1.0)
        if self.format == "JPEG":
            k = self._reduction(min(1.0, face_px / side))
            finer = [done for done in self._decoded if done <= k]  # no second decode if one will do
            img = self._jpeg(max(finer) if finer else k)
            scale = img.width / self.width
        else:
            base, scale = self._base_rgb()
        left = max(0, math.floor((x1 - margin * side) * scale))
        top = max(0, math.floor((y1 - margin * side) * scale))
        right = min(round(self.width * scale), math.ceil((x2 + margin * side) * scale))
        bottom = min(round(self.height * scale), math.ceil((y2 + margin * side) * scale))
        if self.format == "JPEG":
            pixels = _as(img.crop((left, top, right, bottom)), "RGB")
        else:
            pixels = np.ascontiguousarray(base[top:bottom, left:right])
        return pixels, (left / scale, top / scale), scale

    def _reduction(self, scale: float) -> int:
        """libjpeg's coarsest DCT reduction (1, 2, 4 or 8) still at least ``scale``."""
        k = 1
        while k < 8 and 1.0 / (2 * k) >= scale:
            k *= 2
        return k

    def _jpeg(self, k: int) -> Image.Image:
        """The JPEG decoded at 1/k, upright, as YCbCr (L for greyscale JPEGs): one
        entropy decode gives both detection's luminance and the crops' colour."""
        if k not in self._decoded:
            t0 = time.perf_counter()
            img = Image.open(io.BytesIO(self._data), formats=["JPEG"])
            # The whole file to libjpeg in one call, so Python's GIL is released and taken
            # back once, not once per 64 KB block: beside a busy thread (the verify's other
            # photo) each retake can wait out the 5 ms switch interval (a 12 MP decode took
            # 2.5x as long as alone then; in one block, no longer than the CPU share allows).
            img.decodermaxblock = len(self._data) + 1
            try:
                img.draft("YCbCr", (-(-img.width // k), -(-img.height // k)))
                img.load()
                if img.mode not in ("YCbCr", "L"):  # CMYK: as RGB, then the same views
                    img = _flatten(img).convert("YCbCr")
            except _DECODE_ERRORS as e:
                raise ImageDecodeError(f"corrupt or truncated JPEG image: {e}") from e
            transpose = _TRANSPOSE.get(self._orientation)
            self._decoded[k] = img.transpose(transpose) if transpose is not None else img
            self.decode_s += time.perf_counter() - t0
        return self._decoded[k]

    def _base_rgb(self) -> tuple[np.ndarray, float]:
        """A non-JPEG photo decoded once (reduced to ``max_detect_pixels`` when over it)."""
        if self._base is None:
            t0 = time.perf_counter()
            self._base = decode_scaled(self._data, **self._limits)
            self.decode_s += time.perf_counter() - t0
        return self._base


def _as(img: Image.Image, mode: str) -> np.ndarray:
    """A YCbCr or L image as an "L" (its Y channel: the JPEG's own luminance) or "RGB" array."""
    if mode == "L":
        return np.array(img.getchannel(0) if img.mode == "YCbCr" else img)
    return np.array(img.convert("RGB"))


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation the header holds (1 when none), without loading pixels
    (PIL's ``getexif`` on a PNG decodes the whole image to look for a late eXIf chunk)."""
    try:
        if img.format == "JPEG":
            return int(img.getexif().get(0x0112, 1))
        raw = img.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    except _DECODE_ERRORS:
        return 1

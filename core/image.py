"""Untrusted image bytes -> (H, W, 3) uint8 RGB, or a typed error.

Uploads reach this function before anything else, so it refuses oversized
payloads and decompression bombs before allocating pixels: encoded size first,
then the dimensions read from the header (PIL opens lazily), and only then the
pixel data. A file of 100 KB can declare 36 M pixels (150 MB in PIL), so callers
that only need a face may ask for a pixel budget: such images are then decoded at
reduced scale (:func:`decode_scaled`).
"""

from __future__ import annotations

import io
import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
from facegate.core.errors import ImageDecodeError, ImageTooLarge, UnsupportedImage
from PIL import Image, ImageOps, UnidentifiedImageError

# decode() enforces its own pixel limit from the header before any pixel is
# allocated; PIL's global bomb check would otherwise warn or raise its own error
# type at a different limit.
Image.MAX_IMAGE_PIXELS = None

SUPPORTED = ("JPEG", "PNG", "WEBP", "BMP")
# Pixels converted at once when flattening a large image band by band (4 MB as RGBA).
_BAND_PIXELS = 1 << 20

# Formats we recognise but do not accept: (magic prefix, offset, name).
_KNOWN_UNSUPPORTED: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"%PDF", 0, "PDF"),
    (b"8BPS", 0, "PSD"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\xff\x0a", 0, "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "JPEG XL"),
    (b"ftyp", 4, "HEIF/AVIF/MP4"),
    (b"qoif", 0, "QOI"),
    (b"\x76\x2f\x31\x01", 0, "OpenEXR"),
    (b"PK\x03\x04", 0, "ZIP"),
)


def sniff_format(data: bytes) -> str:
    """The container format from magic bytes: one of SUPPORTED, else a typed error."""
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM") and len(head) >= 26:
        return "BMP"
    for magic, offset, name in _KNOWN_UNSUPPORTED:
        if head[offset : offset + len(magic)] == magic:
            raise UnsupportedImage(f"{name} images are not supported (use JPEG, PNG, WebP or BMP)")
    if head.startswith(b"RIFF"):
        raise UnsupportedImage("RIFF container that is not WebP")
    text = head.lstrip().lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype", b"<html")):
        raise UnsupportedImage("SVG/XML/HTML documents are not supported (use JPEG, PNG, WebP or BMP)")
    raise ImageDecodeError("not a recognisable image (unknown signature)")


def decode(
    data: bytes,
    *,
    max_bytes: int = 10_000_000,
    max_pixels: int = 40_000_000,
    max_detect_pixels: int | None = None,
) -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP bytes to an upright (H, W, 3) uint8 RGB array.

    EXIF orientation is applied. Transparent pixels are composited over white
    (how browsers show them, and a neutral background for a cut-out portrait).
    16-bit images are scaled to 8 bits, not clipped. Images over ``max_detect_pixels``
    come out reduced (see :func:`decode_scaled`, which also says by how much).
    """
    image, _ = decode_scaled(
        data, max_bytes=max_bytes, max_pixels=max_pixels, max_detect_pixels=max_detect_pixels
    )
    return image


def decode_scaled(
    data: bytes,
    *,
    max_bytes: int = 10_000_000,
    max_pixels: int = 40_000_000,
    max_detect_pixels: int | None = None,
    slot: AbstractContextManager[Any] | None = None,
) -> tuple[np.ndarray, float]:
    """:func:`decode`, plus the scale of the result relative to the upright original.

    An image over ``max_detect_pixels`` (None: no limit) is reduced to at most that
    many pixels, the same scale on both axes (to within a pixel), holding little more than
    its decoded pixels: JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling), other formats are flattened and box-reduced in bands of rows. Only
    such an image holds ``slot`` (e.g. a semaphore) while its pixels are decoded and
    reduced, so a server can bound how many of them are in memory at once.
    """
    img, fmt = _open(data, max_bytes, max_pixels)
    width, height = img.size
    try:
        if max_detect_pixels is None or width * height <= max_detect_pixels:
            img.load()
            return _to_rgb_array(ImageOps.exif_transpose(img)), 1.0
        scale = math.sqrt(max_detect_pixels / (width * height))
        target_w = max(1, int(width * scale))
        target = (target_w, max(1, int(height * target_w / width)))
        with slot if slot is not None else nullcontext():
            if fmt == "JPEG":
                img.draft("RGB", target)  # the smallest DCT scale at least the target size
            small = _shrink(img, target)
            small.info = dict(img.info)  # EXIF orientation, read by exif_transpose
            img.close()  # the full-size pixels go before the slot does
        return _to_rgb_array(ImageOps.exif_transpose(small)), target_w / width
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"corrupt or truncated {fmt} image: {e}") from e


def _open(data: bytes, max_bytes: int, max_pixels: int) -> tuple[Image.Image, str]:
    """The lazily opened image and its format, after every check the header allows."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageDecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}")
    if len(data) == 0:
        raise ImageDecodeError("empty image")
    fmt = sniff_format(data)
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=[fmt])
        width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"cannot read {fmt} header: {e}") from e
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    return img, fmt


def _shrink(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A new image: ``img`` resized to ``size`` (smaller) as 8-bit L or RGB, by an integer
    box reduction, then Lanczos for the rest. Other modes are flattened band by band,
    because converting (or PIL's resize of RGBA, which premultiplies a full copy) at
    full size would take 1-4 more bytes per pixel than the decode itself."""
    factor = max(1, min(img.width // size[0], img.height // size[1]))
    if img.mode in ("L", "RGB"):
        small = img.reduce(factor) if factor > 1 else img
    else:
        small = _flatten_reduced(img, factor)
    return small.resize(size, Image.Resampling.LANCZOS)  # a copy when already that size


def _flatten_reduced(img: Image.Image, factor: int) -> Image.Image:
    """:func:`_flatten` of ``img`` reduced by ``factor``, converting ~1 M pixels at a time."""
    rows = max(factor, _BAND_PIXELS // img.width // factor * factor)
    bands = [
        _flatten(img.crop((0, top, img.width, min(top + rows, img.height)))).reduce(factor)
        for top in range(0, img.height, rows)
    ]
    out = Image.new(bands[0].mode, (-(-img.width // factor), -(-img.height // factor)))
    for i, band in enumerate(bands):
        out.paste(band, (0, i * rows // factor))
    return out


def _flatten(img: Image.Image) -> Image.Image:
    """The image as 8-bit L or RGB: 16-bit and float grey scaled to 0..255 (not clipped
    by PIL's conversion), transparency composited over white."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (the only source of these modes among the supported formats).
        gray = np.asarray(img).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema() != (255, 255):  # opaque: nothing to composite
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgba = Image.alpha_composite(background, rgba)
        return rgba.convert("RGB")
    if mode in ("L", "RGB"):
        return img
    return img.convert("L" if mode == "1" else "RGB")


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    return np.array(_flatten(img).convert("RGB"), dtype=np.uint8)

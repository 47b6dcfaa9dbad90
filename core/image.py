"""Untrusted image bytes -> (H, W, 3) uint8 RGB, or a typed error.

Uploads reach this function before anything else, so it refuses oversized
payloads and decompression bombs before allocating pixels: encoded size first,
then the dimensions read from the header (PIL opens lazily), and only then the
pixel data.
"""

from __future__ import annotations

import io

import numpy as np
from facegate.core.errors import ImageDecodeError, ImageTooLarge, UnsupportedImage
from PIL import Image, ImageOps, UnidentifiedImageError

# decode() enforces its own pixel limit from the header before any pixel is
# allocated; PIL's global bomb check would otherwise warn or raise its own error
# type at a different limit.
Image.MAX_IMAGE_PIXELS = None

SUPPORTED = ("JPEG", "PNG", "WEBP", "BMP")

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


def decode(data: bytes, *, max_bytes: int = 10_000_000, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP bytes to an upright (H, W, 3) uint8 RGB array.

    EXIF orientation is applied. Transparent pixels are composited over white
    (how browsers show them, and a neutral background for a cut-out portrait).
    16-bit images are scaled to 8 bits, not clipped.
    """
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
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb_array(img)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"corrupt or truncated {fmt} image: {e}") from e


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (the only source of these modes among the supported
        # formats): scale 0..65535 to 0..255 instead of PIL's clipping.
        gray = np.asarray(img).astype(np.float64)
        gray8 = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray8[:, :, None], 3, axis=2))
    if mode == "F":
        gray8 = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray8[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = img.convert("RGB")
    return np.array(rgb, dtype=np.uint8)

"""image.decode: every bad input class gets its typed error; odd pixel formats come out RGB uint8;
images over a pixel budget come out reduced, and faces found in them in the original's pixels."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from facegate.core.align import DLIB_CHIP_150
from facegate.core.detect import DlibDetector
from facegate.core.errors import ImageDecodeError, ImageTooLarge, UnsupportedImage
from facegate.core.face import prepare_face
from facegate.core.image import decode, decode_scaled
from PIL import Image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 64, h: int = 48) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 128)], -1).astype(np.uint8)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture(scope="module")
def celeba_jpeg(celeba_index) -> bytes:
    return celeba_index[0][0].read_bytes()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_supported_formats_round_trip(fmt):
    pixels = _gradient()
    kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    out = decode(_encode(Image.fromarray(pixels), fmt, **kw))
    assert out.shape == pixels.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - pixels).mean() < 4  # lossy formats within a few levels


def test_real_photo(celeba_jpeg):
    out = decode(celeba_jpeg)
    reference = np.asarray(Image.open(io.BytesIO(celeba_jpeg)).convert("RGB"))
    np.testing.assert_array_equal(out, reference)


def test_exif_orientation_is_applied():
    # A wide image whose top half is red; EXIF 6 means "rotate 90 degrees clockwise to view".
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:20] = (255, 0, 0)
    exif = Image.Exif()
    exif[274] = 6
    out = decode(_encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (80, 40, 3)  # upright: now tall
    # After a clockwise turn the old top (red) is on the right.
    assert out[:, 30:, 0].mean() > 200 and out[:, :10, 0].mean() < 50


def test_grayscale_rgba_palette_cmyk_16bit_come_out_rgb():
    gray = Image.fromarray(_gradient()[:, :, 0])
    rgba = Image.fromarray(np.dstack([_gradient(), np.zeros((48, 64), np.uint8)]), "RGBA")
    palette = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE)
    cmyk = Image.fromarray(_gradient()).convert("CMYK")
    gray16 = Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16))
    cases = {
        "gray": _encode(gray, "PNG"),
        "rgba": _encode(rgba, "PNG"),
        "palette": _encode(palette, "PNG"),
        "cmyk": _encode(cmyk, "JPEG", quality=95),
        "gray16": _encode(gray16, "PNG"),
        "bilevel": _encode(gray.convert("1"), "BMP"),
    }
    outs = {name: decode(data) for name, data in cases.items()}
    for name, out in outs.items():
        assert out.shape == (48, 64, 3) and out.dtype == np.uint8, name
    np.testing.assert_array_equal(outs["gray"][:, :, 1], np.asarray(gray))
    assert (outs["rgba"] == 255).all()  # fully transparent -> white background
    assert np.abs(outs["cmyk"].astype(int) - _gradient()).mean() < 6
    # 16-bit is scaled (65535 -> 255), not clipped at 255.
    expected16 = np.rint(np.asarray(gray16) / 257.0)
    np.testing.assert_array_equal(outs["gray16"][:, :, 0], expected16)
    assert outs["gray16"].max() > 200


def test_encoded_size_limit_checked_first():
    with pytest.raises(ImageTooLarge):
        decode(b"\x00" * 2_000, max_bytes=1_000)  # even garbage: size is checked before sniffing


def test_pixel_limit(celeba_jpeg):
    with pytest.raises(ImageTooLarge) as info:
        decode(celeba_jpeg, max_pixels=10_000)
    assert info.value.status == 413


def test_decompression_bomb_rejected_from_header_without_allocating():
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 100000x100000 RGB
    idat = zlib.compress(b"\x00" * 1000)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge):
        decode(bomb)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.1
    assert peak < 5_000_000  # 30 GB of pixels were declared


@pytest.mark.parametrize(
    "data",
    [
        b"GIF89a" + b"\x00" * 40,
        b"II*\x00" + b"\x00" * 40,
        b"MM\x00*" + b"\x00" * 40,
        b"%PDF-1.7\n" + b"\x00" * 40,
        b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40,
        b"\x00\x00\x00\x1cftypavif" + b"\x00" * 40,
        b'<svg xmlns="http://www.w3.org/2000/svg"></svg>',
        b'<?xml version="1.0"?><svg></svg>',
    ],
    ids=["gif", "tiff-le", "tiff-be", "pdf", "heic", "avif", "svg", "svg-xml"],
)
def test_known_unsupported_formats(data):
    with pytest.raises(UnsupportedImage) as info:
        decode(data)
    assert info.value.status == 415


def test_real_gif_is_unsupported():
    with pytest.raises(UnsupportedImage):
        decode(_encode(Image.fromarray(_gradient()), "GIF"))


def test_garbage_and_truncated_are_decode_errors(celeba_jpeg):
    png = _encode(Image.fromarray(_gradient()), "PNG")
    bad = [
        b"",
        b"hello, this is not an image at all",
        np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        celeba_jpeg[: len(celeba_jpeg) // 2],  # truncated JPEG
        png[:60],  # truncated PNG
        b"\xff\xd8\xff" + b"\x00" * 100,  # JPEG signature, garbage body
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 50,
    ]
    for data in bad:
        with pytest.raises(ImageDecodeError) as info:
            decode(data)
        assert info.value.status == 400


def test_non_bytes_rejected():
    with pytest.raises(ImageDecodeError):
        decode("not bytes")  # type: ignore[arg-type]


class _CountingSlot:
    """A context manager that counts how often it was entered."""

    def __init__(self) -> None:
        self.entered = 0

    def __enter__(self) -> None:
        self.entered += 1

    def __exit__(self, *exc) -> None:
        return None


def _big(w: int = 3000, h: int = 2000) -> Image.Image:
    """A smooth image (so reductions compare closely with a full decode), RGB."""
    return Image.fromarray(_gradient(64, 48)).resize((w, h), Image.Resampling.BILINEAR)


def _close_to_full_decode(data: bytes, small: np.ndarray) -> bool:
    full = Image.fromarray(decode(data, max_bytes=10**9))
    ref = np.asarray(full.resize((small.shape[1], small.shape[0]), Image.Resampling.LANCZOS))
    return np.abs(small.astype(int) - ref).mean() < 3


def test_jpeg_over_the_budget_decodes_at_dct_scale():
    data = _encode(_big(), "JPEG", quality=90)
    budget = 1_000_000  # 6 M pixels: 1/2 DCT scale (1500x1000), then 1224x816
    slot = _CountingSlot()
    out, scale = decode_scaled(data, max_detect_pixels=budget, slot=slot)
    assert out.shape == (816, 1224, 3) and out.shape[0] * out.shape[1] <= budget
    assert scale == pytest.approx(1224 / 3000)
    assert slot.entered == 1
    assert _close_to_full_decode(data, out)
    assert decode(data, max_detect_pixels=budget).shape == out.shape


@pytest.mark.parametrize("kind", ["rgba", "palette-transparent", "gray16"])
def test_png_over_the_budget_is_flattened_and_reduced(kind):
    img = _big(2400, 1800)
    if kind == "rgba":
        img = img.convert("RGBA")
        img.paste((0, 0, 0, 0), (0, 0, 600, 450))  # transparent corner: white once flattened
        data = _encode(img, "PNG")
    elif kind == "palette-transparent":
        data = _encode(img.quantize(32), "PNG", transparency=0)
    else:
        gray = np.asarray(img.convert("L")).astype(np.uint16) * 257
        data = _encode(Image.fromarray(gray), "PNG")
    out, scale = decode_scaled(data, max_detect_pixels=500_000)
    assert out.shape == (612, 816, 3) and out.shape[0] * out.shape[1] <= 500_000
    assert scale == pytest.approx(816 / 2400)
    assert _close_to_full_decode(data, out)
    if kind == "rgba":
        assert (out[10:140, 10:190] == 255).all()


def test_images_within_the_budget_are_unchanged_and_take_no_slot(celeba_jpeg):
    slot = _CountingSlot()
    out, scale = decode_scaled(celeba_jpeg, max_detect_pixels=10**6, slot=slot)
    np.testing.assert_array_equal(out, decode(celeba_jpeg))
    assert scale == 1.0 and slot.entered == 0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_after_reduction(fmt):
    pixels = np.zeros((800, 1600, 3), np.uint8)
    pixels[:400] = (255, 0, 0)
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees clockwise to view
    data = _encode(Image.fromarray(pixels), fmt, exif=exif.tobytes())
    out, scale = decode_scaled(data, max_detect_pixels=80_000)
    assert out.shape == (400, 200, 3) and scale == pytest.approx(0.25)  # upright: now tall
    assert out[:, 150:, 0].mean() > 200 and out[:, :50, 0].mean() < 50  # old top on the right


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_faces_found_at_reduced_scale_come_back_in_original_pixels(celeba_jpeg, fmt):
    detector = DlibDetector()
    original = prepare_face(celeba_jpeg, detector, DLIB_CHIP_150)
    photo = Image.open(io.BytesIO(celeba_jpeg)).convert("RGB")
    large = photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)
    data = _encode(large, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    budget = large.width * large.height // 7  # JPEG: 1/2 DCT scale, then resized
    reduced = prepare_face(data, detector, DLIB_CHIP_150, max_detect_pixels=budget, keep_image=True)
    assert reduced.scale < 0.4 and reduced.image is not None
    # Exactly the face found in the reduced image, divided by the reported scale ...
    small, scale = decode_scaled(data, max_detect_pixels=budget)
    assert scale == reduced.scale and small.shape == reduced.image.shape
    face = detector.detect(small)[0]
    np.testing.assert_allclose(reduced.face.box, np.divide(face.box, scale), rtol=1e-6)
    np.testing.assert_allclose(reduced.face.landmarks, face.landmarks / scale, rtol=1e-5)
    np.testing.assert_allclose(reduced.face.dlib5, face.dlib5 / scale, rtol=1e-5)
    # ... which is 4x the face in the original photo, within HOG's box-size steps (a box's
    # side comes in steps of its image pyramid, at any resolution; measured 2.9% here).
    np.testing.assert_allclose(reduced.face.box, np.multiply(original.face.box, 4), atol=0.04 * large.width)
    centre = np.add(reduced.face.box[:2], reduced.face.box[2:]) / 2
    x1, y1, x2, y2 = original.face.box
    np.testing.assert_allclose(centre, (2 * (x1 + x2), 2 * (y1 + y2)), atol=0.02 * 4 * (x2 - x1))
    assert reduced.crop.shape == original.crop.shape

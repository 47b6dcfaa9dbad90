"""Phone-size photos with real faces at known sizes, built from the shared CelebA photos.

Each photo is a whole CelebA photo (178x218), scaled so its face box (facegate's box
on the original) is a chosen width, pasted at a seeded random place into a frame of
phone size, and saved as a JPEG (quality 90, as phones save). The frame is a smooth
colour gradient with +-5 grey levels of noise, so a 12 MP frame encodes to ~1.9 MB
(phones: 2-5 MB) and holds nothing face-like: the set measures finding the face and
the cost of the pixels around it, not false positives on real backgrounds, and the
face keeps the CelebA photo's own background around it. Upscaled faces (100 px and
more from a ~75 px original) are softer than a phone's own.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FRAMES = {"1 MP": (1155, 866), "3 MP": (2000, 1500), "12 MP": (4000, 3000)}


def background(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth gradient in a seeded colour, with a little noise: (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    tint = rng.uniform(0.5, 1.0, 3)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    base = 80 + 90 * x * tint + 50 * y
    noise = rng.integers(-5, 6, (height, width, 1), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def place(photo: Image.Image, box: tuple[float, float, float, float], face_px: float,
          frame: tuple[int, int], seed: int) -> tuple[bytes, tuple[float, float, float, float]] | None:
    """``photo`` scaled so ``box`` (its face) is ``face_px`` wide, pasted into a ``frame``-size
    background: (JPEG bytes, the face box in the frame), or None when it does not fit."""
    scale = face_px / (box[2] - box[0])
    size = (round(photo.width * scale), round(photo.height * scale))
    width, height = frame
    if size[0] >= width or size[1] >= height:
        return None
    rng = np.random.default_rng(seed)
    left, top = int(rng.integers(0, width - size[0])), int(rng.integers(0, height - size[1]))
    canvas = Image.fromarray(background(width, height, seed))
    canvas.paste(photo.convert("RGB").resize(size, Image.Resampling.BICUBIC), (left, top))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=90)
    x1, y1, x2, y2 = box
    return buf.getvalue(), (left + x1 * scale, top + y1 * scale, left + x2 * scale, top + y2 * scale)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0

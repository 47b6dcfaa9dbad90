"""insightface verification ``.bin`` sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

A ``.bin`` is a pickle of ``(bins, issame)``: ``bins`` a list of 2N encoded images
(bytes, or uint8 arrays in some dumps) where images ``2i`` and ``2i+1`` form pair
``i``, and ``issame`` a list of N booleans. They are the standard benchmarks the
insightface recipes report, so reading them lets our numbers be compared.

Pickle can run arbitrary code, so the reader only admits the few classes these
files contain (builtins and NumPy arrays).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from facegate.core.errors import FacegateError
from facegate.train.recordio import decode_image, encode_image
from tqdm import tqdm

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "bytearray"),
}


class BinSetError(FacegateError):
    """A verification .bin set is malformed or holds something other than images and flags."""

    code = "binset_invalid"
    status = 500


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise BinSetError(f"unexpected object {module}.{name} in a .bin set")
        return super().find_class(module, name)


def load_bin(
    path: str | Path, image_size: int = 112, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Images (2N, size, size, 3) uint8 RGB and issame (N,) bool of a .bin set.

    Images of another size are resized, as insightface's evaluation does.
    """
    data = Path(path).read_bytes()
    try:
        bins, issame = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError) as err:
        raise BinSetError(f"{path}: not a verification .bin set ({err})") from err
    if len(bins) != 2 * len(issame):
        raise BinSetError(f"{path}: {len(bins)} images for {len(issame)} pairs")
    images = np.empty((len(bins), image_size, image_size, 3), dtype=np.uint8)
    for i, encoded in enumerate(tqdm(bins, desc=Path(path).name, disable=not progress)):
        image = decode_image(bytes(memoryview(encoded)))
        if image.shape[:2] != (image_size, image_size):
            image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
        images[i] = image
    return images, np.asarray(issame, dtype=bool)


def write_bin(
    path: str | Path, images: Sequence[np.ndarray], issame: Sequence[bool], ext: str = ".jpg"
) -> None:
    """Write a .bin set the way insightface does (pairs consecutive, highest pickle protocol)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    bins = [encode_image(np.asarray(image), ext) for image in images]
    with open(path, "wb") as f:
        pickle.dump((bins, [bool(v) for v in issame]), f, protocol=pickle.HIGHEST_PROTOCOL)

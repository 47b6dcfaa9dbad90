"""Crops in, model input out; raw embeddings in, unit vectors out.

Every path that feeds a face model goes through here: ONNX Runtime and TensorRT
(``facegate.core.embed``, ``facegate.core.embed_tensorrt``), the export parity checks
and torch training and evaluation. One implementation means a model is fed at
serving time exactly as it was trained and exported: the bundle's ``input`` spec
(colour order, mean, std, layout) is the only thing that varies. Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["check_crops", "embed_with_flip", "l2_normalise", "mirrored", "model_input"]


def check_crops(crops: Any, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Raise a clear ValueError unless ``crops`` is (N, H, W, 3) uint8 with (H, W) = size."""
    if not isinstance(crops, np.ndarray):
        raise ValueError(f"crops must be a numpy array, got {type(crops).__name__}")
    if crops.dtype != np.uint8:
        raise ValueError(f"crops must be uint8, got {crops.dtype}")
    expected = (size[0], size[1], 3)
    if crops.ndim != 4 or crops.shape[1:] != expected:
        raise ValueError(
            f"crops must have shape (N, {expected[0]}, {expected[1]}, 3), got {crops.shape}"
        )
    return crops


def model_input(crops: np.ndarray, input_spec: dict[str, Any]) -> np.ndarray:
    """uint8 RGB (N, H, W, 3) -> float32 per ``input_spec`` (colour, (x - mean) / std, layout).

    ``input_spec`` is a bundle's ``input`` section (``core.manifest.DEFAULT_INPUT`` for the
    112x112 models, a backbone's ``input_spec`` in training).
    """
    x = crops[..., ::-1] if input_spec["color"] == "BGR" else crops
    mean = np.asarray(input_spec["mean"], dtype=np.float32)
    std = np.asarray(input_spec["std"], dtype=np.float32)
    x = (x.astype(np.float32) - mean) / std
    if input_spec["layout"] == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def mirrored(crops: np.ndarray) -> np.ndarray:
    """The horizontal mirror images of (N, H, W, C) crops."""
    return crops[:, :, ::-1]


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), in ``x``'s float precision."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.asarray(1e-12, dtype=x.dtype))


def embed_with_flip(
    raw: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, flip: bool
) -> np.ndarray:
    """Unit float32 embeddings from ``raw`` (crops -> un-normalised outputs).

    With ``flip`` the raw outputs of each crop and of its mirror are summed before
    normalising (UniTSFace's evaluation). One ``raw`` call for crops and mirrors
    together: at batch 1 a batch of 2 costs far less than two runs.
    """
    if not flip:
        return l2_normalise(raw(crops)).astype(np.float32)
    both = raw(np.concatenate([crops, mirrored(crops)]))
    return l2_normalise(both[: len(crops)] + both[len(crops) :]).astype(np.float32)

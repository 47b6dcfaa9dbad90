"""Embedder runtimes: aligned crops in, L2-normalised embeddings out.

One Protocol, several backends: a TensorRT engine when the bundle has one for
this GPU, ONNX Runtime on CUDA, or ONNX Runtime on CPU. ``create_embedder``
picks the fastest that works here and says why in the log, so the same code
serves on a laptop, in CI and on a GPU box. Every runtime feeds the model through
``facegate.core.preprocess`` with the bundle's ``input`` spec, so a model is fed
exactly as it was trained and exported.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import numpy as np
from facegate.core.bundle import Bundle
from facegate.core.embed_tensorrt import TensorRTEmbedder, TensorRTUnavailable
from facegate.core.errors import BundleError, FacegateError
from facegate.core.ort_session import CPU, CUDA, default_providers, session_options
from facegate.core.preprocess import (
    check_crops,
    embed_with_flip,
    l2_normalise,
    mirrored,
    model_input,
)

# l2_normalise is re-exported for callers that embed and compare (bench.dlib_chip).
__all__ = [
    "RUNTIMES",
    "Embedder",
    "OnnxEmbedder",
    "create_embedder",
    "embed_with_stability",
    "l2_normalise",
]

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")


@runtime_checkable
class Embedder(Protocol):
    embedding_size: int
    runtime: str

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB crops -> (N, D) float32, unit L2 norm."""
        ...


class OnnxEmbedder:
    """ONNX Runtime session over the bundle's ``embedder.onnx``.

    Batches are cut into chunks of ``max_batch`` (or the model's fixed batch size,
    padding the last chunk). With ``flip`` the raw embeddings of each crop and of
    its horizontal mirror are summed before normalising (UniTSFace's evaluation).
    """

    def __init__(
        self,
        bundle: Bundle,
        providers: list[str] | None = None,
        flip: bool = False,
        intra_op_threads: int | None = None,
        max_batch: int = 64,
    ) -> None:
        import onnxruntime as ort

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._session = ort.InferenceSession(
            str(bundle.onnx_path), sess_options=session_options(intra_op_threads),
            providers=providers or default_providers(),
        )
        self.runtime = (
            "onnxruntime-cuda" if self._session.get_providers()[0] == CUDA else "onnxruntime-cpu"
        )
        self.embedding_size = bundle.embedding_size
        self.flip = flip
        self._input_spec = bundle.input_spec
        self._input_name = bundle.input_spec["name"]
        self._output_name = bundle.output_name
        batch_dim = self._session.get_inputs()[0].shape[0]
        self._fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.max_batch = self._fixed_batch or max_batch
        output_dims = self._session.get_outputs()[0].shape
        if isinstance(output_dims[-1], int) and output_dims[-1] != self.embedding_size:
            raise BundleError(
                f"{bundle.onnx_path.name}: output has {output_dims[-1]} dimensions, "
                f"bundle says {self.embedding_size}"
            )

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if self._fixed_batch and n < self._fixed_batch:
            pad = np.zeros((self._fixed_batch - n, *x.shape[1:]), dtype=x.dtype)
            x = np.concatenate([x, pad])
        out = self._session.run([self._output_name], {self._input_name: x})[0]
        return np.asarray(out, dtype=np.float32)[:n]

    def raw(self, crops: np.ndarray) -> np.ndarray:
        """Un-normalised model output (N, D) float32 for validated crops (no flip)."""
        h, w = self._input_spec["size"]
        check_crops(crops, (h, w))
        out = np.empty((crops.shape[0], self.embedding_size), dtype=np.float32)
        for start in range(0, crops.shape[0], self.max_batch):
            chunk = crops[start : start + self.max_batch]
            out[start : start + chunk.shape[0]] = self._run(model_input(chunk, self._input_spec))
        return out

    def embed(self, crops: np.ndarray) -> np.ndarray:
        return embed_with_flip(self.raw, crops, self.flip)


def embed_with_stability(embedder: Embedder, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``embedder.embed(crops)`` and each crop's *stability*: the cosine between the raw
    outputs for the crop and for its mirror (``core.quality``'s strongest signal).

    With ``flip`` (the server's default) the crops and mirrors are run once, as ``embed``
    runs them, and the sum is ``embed``'s exactly; without it the mirrors cost one more
    run, and the embedding is still the crop's alone."""
    n = len(crops)
    both = embedder.raw(np.concatenate([crops, mirrored(crops)]))  # type: ignore[attr-defined]
    crop, mirror = both[:n], both[n:]
    vectors = l2_normalise(crop + mirror if embedder.flip else crop).astype(np.float32)  # type: ignore[attr-defined]
    a, b = l2_normalise(crop.astype(np.float64)), l2_normalise(mirror.astype(np.float64))
    return vectors, (a * b).sum(axis=1)


def _try_tensorrt(bundle: Bundle, flip: bool) -> Embedder | None:
    """The TensorRT embedder, or None (logging why) when it cannot run here."""
    try:
        embedder = TensorRTEmbedder.from_bundle(bundle)
    except TensorRTUnavailable as exc:
        log.info("TensorRT runtime not available: %s", exc)
        return None
    except (FacegateError, OSError) as exc:  # e.g. a CUDA driver error while loading the engine
        log.warning("TensorRT engine failed to load, falling back: %s", exc)
        return None
    embedder.flip = flip
    return embedder


def create_embedder(bundle: Bundle, *, runtime: str = "auto", flip: bool = False) -> Embedder:
    """Build the embedder for ``runtime`` ("auto" = TensorRT, else ORT CUDA, else ORT CPU).

    An explicit runtime that cannot run here raises ``BundleError`` instead of
    silently falling back.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    embedder: Embedder | None = None
    if runtime in ("auto", "tensorrt"):
        embedder = _try_tensorrt(bundle, flip)
        if embedder is None and runtime == "tensorrt":
            raise BundleError(f"{bundle.path}: TensorRT runtime requested but unavailable (see log)")
    if embedder is None and runtime == "onnxruntime-cuda":
        if CUDA not in default_providers():
            raise BundleError("onnxruntime-cuda requested but CUDAExecutionProvider is unavailable")
        embedder = OnnxEmbedder(bundle, providers=[CUDA, CPU], flip=flip)
        if embedder.runtime != "onnxruntime-cuda":
            raise BundleError("onnxruntime-cuda requested but the CUDA session failed (see log)")
    if embedder is None:
        providers = [CPU] if runtime == "onnxruntime-cpu" else None
        embedder = OnnxEmbedder(bundle, providers=providers, flip=flip)
    log.info("embedder for %s: %s (flip=%s)", bundle.model_id, embedder.runtime, flip)
    return embedder

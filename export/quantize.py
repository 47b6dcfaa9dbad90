"""``facegate export int8 BUNDLE OUT --calibration CHIPS``: a statically quantised copy of a
bundle's embedder for CPUs with int8 dot products (AVX-512 VNNI, AVX-VNNI, ARM dot).

ONNX Runtime's ``quantize_static`` in QDQ form: weights int8 per output channel,
activations uint8 with ranges observed on real aligned crops of *training* identities
(never the people a figure is later measured on), so ONNX Runtime's CPU provider fuses
each QuantizeLinear -> Conv -> DequantizeLinear into an integer convolution. The bundle
written keeps the source's geometry, input and decision settings and states that they
were learned on the fp32 embeddings (``quantization`` section); it is sealed like every
bundle, so it is another model_id. No torch: numpy, onnx and ONNX Runtime only.
"""

from __future__ import annotations

import datetime
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.errors import FacegateError
from facegate.core.metrics import split_identities
from facegate.core.preprocess import model_input
from facegate.export.parity import parity_report

# Below this per-crop cosine to fp32 the quantised embedder is not written (a broken
# quantisation lands far lower; a sound one on dlib's ResNet stays above 0.99).
MIN_COSINE = 0.98
METHODS = ("minmax", "percentile", "entropy")


class QuantizeError(FacegateError):
    """The embedder could not be quantised, or the result does not reproduce fp32."""

    code = "quantize_failed"
    status = 500


class CropReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over aligned uint8 crops."""

    def __init__(self, crops: np.ndarray, input_spec: dict[str, Any], batch: int = 16) -> None:
        self._batches = [model_input(crops[i : i + batch], input_spec)
                         for i in range(0, len(crops), batch)]
        self._name = input_spec["name"]
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self._name: batch}

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def quantize_onnx(source: Path, target: Path, crops: np.ndarray, input_spec: dict[str, Any],
                  *, method: str = "percentile", per_channel: bool = True) -> dict[str, Any]:
    """Write the QDQ int8 model of ``source`` to ``target``, ranges observed on ``crops``."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise QuantizeError(f"calibration method must be one of {METHODS}, got {method!r}")
    if len(crops) == 0:
        raise QuantizeError("no calibration crops")
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    with tempfile.TemporaryDirectory(prefix="facegate-int8-") as scratch:
        # ONNX shape inference and ONNX Runtime's own fusions first (the affine Mul/Add into
        # each Conv), so every quantised Conv is one integer kernel. Not the symbolic shape
        # inference: it needs sympy, which a server install (no torch) does not have.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(target), CropReader(crops, input_spec),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, per_channel=per_channel, calibrate_method=calibrate,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    return {"format": "QDQ", "weights": "int8 per channel" if per_channel else "int8 per tensor",
            "activations": "uint8", "calibration_method": method,
            "calibration_crops": int(len(crops)), **qdq_nodes(target)}


def qdq_nodes(path: Path) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes a model has, and how many of its
    initialisers are int8 (the quantised weights)."""
    import onnx

    model = onnx.load(str(path))
    ops = Counter(node.op_type for node in model.graph.node)
    int8 = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    return {"quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"],
            "int8_initializers": int8}


def training_crops(root: Path, size: tuple[int, int], *, holdout: int, seed: int,
                   calibration: int, parity: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(calibration crops, parity crops, where they came from) out of a crop folder.

    Calibration crops are spread over the identities the trainer's split keeps for training
    (``core.metrics.split_identities(.., holdout, seed)``, the split of docs/results.md's
    held-out figures), so no held-out person shapes the int8 ranges; parity crops come
    from the held-out identities (other training crops when ``holdout`` is 0)."""
    from facegate.train.calibrate import list_identity_images

    paths, names = list_identity_images(root)
    train_ids, test_ids = split_identities(names, holdout, seed)
    rng, keep, hold = np.random.default_rng(seed), set(train_ids), set(test_ids)
    train = _spread([p for p, n in zip(paths, names, strict=True) if n in keep], rng)
    calib, rest = train[:calibration], train[calibration:]
    held = _spread([p for p, n in zip(paths, names, strict=True) if n in hold], rng)
    checks = (held or rest)[:parity]
    if not calib or not checks:
        raise QuantizeError(f"{root}: too few crops for {calibration} calibration and parity crops")
    where = (f"{len(calib)} crops of {len({p.parent.name for p in calib})} training identities "
             f"of {root.name} (split: {holdout} held out, seed {seed})")
    return _read(calib, size), _read(checks, size), where


def _spread(paths: list[Path], rng: np.random.Generator) -> list[Path]:
    """Paths reordered so that each identity's crops come one per round (shuffled)."""
    by_id: dict[str, list[Path]] = {}
    for path in rng.permutation(np.asarray(paths, dtype=object)).tolist():
        by_id.setdefault(path.parent.name, []).append(path)
    rounds = max((len(v) for v in by_id.values()), default=0)
    return [v[k] for k in range(rounds) for v in by_id.values() if k < len(v)]


def _read(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    import cv2

    crops = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None or image.shape[:2] != tuple(size):
            raise QuantizeError(f"{path}: not a {size[1]}x{size[0]} crop of the bundle's geometry "
                                "(make them with facegate prepare --bundle BUNDLE)")
        crops.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return np.stack(crops)


def quantize_bundle(bundle_path: Path, out: Path, calibration: np.ndarray,
                    parity_crops: np.ndarray, *, calibration_source: str,
                    method: str = "percentile") -> Any:
    """A sealed bundle at ``out`` (version ``<source's>-int8``) whose embedder is
    ``bundle_path``'s quantised on ``calibration`` crops, checked against fp32 on
    ``parity_crops`` (other people). Engines of the source (built from fp32) are not
    carried over."""
    import copy
    import dataclasses

    from facegate.core.bundle import load_bundle
    from facegate.core.embed import OnnxEmbedder
    from facegate.core.ort_session import CPU
    from facegate.train.calibrate import write_calibrated_bundle

    source = load_bundle(bundle_path)
    out = Path(out).resolve()
    if out == source.path:
        raise QuantizeError("write the int8 bundle to a new folder, not over its source")
    if "quantization" in source.manifest or qdq_nodes(source.onnx_path)["quantize_linear"]:
        raise QuantizeError(f"{source.model_id} is quantised already; quantise its fp32 source "
                            "(e.g. `facegate export onnx dlib FP32` for the default model)")
    with tempfile.TemporaryDirectory(prefix="facegate-int8-") as scratch:
        model = Path(scratch) / source.onnx_path.name
        summary = quantize_onnx(source.onnx_path, model, calibration, source.input_spec,
                                method=method)
        manifest = copy.deepcopy(source.manifest)
        manifest["files"] = {model.name: manifest["files"][model.name]}
        manifest["version"] = f"{source.version}-int8"
        staged = dataclasses.replace(source, onnx_path=model, manifest=manifest, engines=[])
        reference = OnnxEmbedder(source, providers=[CPU]).raw(parity_crops)
        candidate = OnnxEmbedder(staged, providers=[CPU]).raw(parity_crops)
        parity = parity_report(reference, candidate, min_cosine=MIN_COSINE)
        if not parity["passed"]:
            raise QuantizeError(f"int8 embeddings drift from fp32: min cosine "
                                f"{parity['min_cosine']:.4f} < {MIN_COSINE} on "
                                f"{parity['crops']} crops; not written")
        manifest["parity"] = {"reference": "onnxruntime cpu fp32",
                              "candidate": "onnxruntime cpu int8 QDQ", **parity}
        manifest["quantization"] = {
            **summary, "source_model_id": source.model_id, "calibration_data": calibration_source,
            "decision_settings": "the fp32 source's threshold, error and quality models",
            "date": datetime.date.today().isoformat()}
        provenance = (f"carried unchanged from {source.model_id} (learned on its fp32 "
                      f"embeddings; recalibrate on this embedder with facegate calibrate): "
                      f"{source.threshold_provenance}")
        return write_calibrated_bundle(staged, out, threshold=source.threshold,
                                       provenance=provenance,
                                       threshold_source=source.threshold_source)

"""Bundle ONNX -> TensorRT engine for this GPU, checked against ONNX Runtime, registered in the bundle.

Engines are specific to a GPU model and a TensorRT version, so each is named
``embedder.<gpu-slug>.trt<version>.<precision>.plan`` and the runtime picks the one
matching the machine. The builder's timing cache is kept beside the bundle so a
rebuild (another precision, a larger max batch) reuses the kernel timings.

INT8 uses TensorRT's post-training calibration (``IInt8EntropyCalibrator2`` over real
aligned crops, with the FP16 flag set so layers without an INT8 kernel fall back to
FP16). TensorRT 10 deprecates this implicit quantisation in favour of Q/DQ nodes
from NVIDIA's ModelOpt, but still supports it; ModelOpt is not a dependency here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.align import Geometry
from facegate.core.bundle import add_file, load_bundle
from facegate.core.embed_tensorrt import (
    CudaRuntime,
    TensorRTEmbedder,
    engine_filename,
    gpu_name,
    gpu_slug,
    import_tensorrt,
)
from facegate.core.errors import BundleError
from facegate.core.manifest import DEFAULT_INPUT
from facegate.core.preprocess import model_input
from facegate.export.parity import (
    ParityError,
    accuracy_change,
    list_photos,
    parity_report,
    sample_crops,
)

PRECISIONS = ("fp32", "fp16", "int8")
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}
MAX_ACCURACY_CHANGE_POINTS = 0.1
WORKSPACE_BYTES = 4 << 30


def optimisation_shapes(
    shape: tuple[int, ...], max_batch: int, spatial: tuple[int, int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes for an input whose dims may be -1: batch 1..N (opt N/2)."""
    rest = list(shape[1:])
    if spatial is not None and len(rest) == 3:
        rest = [rest[0], *(s if d < 0 else d for d, s in zip(rest[1:], spatial, strict=True))]
    if any(d < 0 for d in rest):
        raise BundleError(f"input shape {shape} has dynamic non-batch dims: give an input size")
    batch = shape[0]
    if batch > 0:  # a fixed batch size in the ONNX wins
        return (batch, *rest), (batch, *rest), (batch, *rest)
    return (1, *rest), (max(1, max_batch // 2), *rest), (max_batch, *rest)


def _calibrator(
    trt: Any, crops: np.ndarray, batch: int, cache_path: Path, input_spec: dict | None = None
) -> Any:
    """An entropy calibrator that feeds real aligned crops, ``batch`` at a time, preprocessed
    by ``input_spec`` (the bundle's ``input``)."""
    cuda = CudaRuntime()

    class CropCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = [
                model_input(crops[k : k + batch], input_spec or DEFAULT_INPUT)
                for k in range(0, len(crops) - batch + 1, batch)
            ]
            if not self.batches:
                raise BundleError(f"int8 calibration needs at least {batch} crops")
            self.device = cuda.malloc(self.batches[0].nbytes)
            self.index = 0

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index >= len(self.batches):
                if self.device:
                    cuda.free(self.device)
                    self.device = 0
                return None
            cuda.copy_to_device(self.device, self.batches[self.index])
            self.index += 1
            return [self.device]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_path.write_bytes(bytes(cache))

    return CropCalibrator()


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str,
    max_batch: int,
    timing_cache: Path,
    calibration_crops: np.ndarray | None = None,
    calibration_cache: Path | None = None,
    spatial: tuple[int, int] | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
    input_spec: dict | None = None,
) -> dict[str, Any]:
    """Build and write a serialised engine; returns what the manifest records about it."""
    if precision not in PRECISIONS:
        raise BundleError(f"precision {precision!r} not in {PRECISIONS}")
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(k)) for k in range(parser.num_errors))
        raise BundleError(f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # keep fp32 bit-faithful for parity
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for k in range(network.num_inputs):
        tensor = network.get_input(k)
        profile.set_shape(
            tensor.name, *optimisation_shapes(tuple(tensor.shape), max_batch, spatial)
        )
    config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    if precision == "int8":
        if calibration_crops is None or calibration_cache is None:
            raise BundleError("int8 needs calibration crops (--calibration-dir)")
        calib_batch = min(max_batch, 32)
        calib_profile = builder.create_optimization_profile()
        for k in range(network.num_inputs):
            tensor = network.get_input(k)
            _, _, biggest = optimisation_shapes(tuple(tensor.shape), max_batch, spatial)
            fixed = (calib_batch, *biggest[1:])
            calib_profile.set_shape(tensor.name, fixed, fixed, fixed)
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(calib_profile)
        config.int8_calibrator = _calibrator(
            trt, calibration_crops, calib_batch, calibration_cache, input_spec
        )

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"TensorRT failed to build a {precision} engine from {onnx_path}")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "gpu": gpu_slug(gpu_name()),
        "gpu_name": gpu_name(),
        "tensorrt": trt.__version__,
        "precision": precision,
        "max_batch": int(max_batch),
        "opt_batch": max(1, max_batch // 2),
    }


def load_crops(
    data_dir: Path, n: int, *, per_identity: int, seed: int, geometry: Geometry | None = None
) -> tuple[np.ndarray, list[str]]:
    """Real crops from a folder: images of the geometry's size (default ArcFace 112) are taken
    as crops, others detected and cropped by ``geometry``."""
    from facegate.core.image import decode
    from facegate.core.manifest import DEFAULT_GEOMETRY

    geometry = geometry or DEFAULT_GEOMETRY
    photos = list_photos(data_dir)
    if photos and decode(Path(photos[0][0]).read_bytes()).shape[:2] == (geometry.size, geometry.size):
        from facegate.export.parity import pick_spread

        picked = pick_spread(photos, n, per_identity=per_identity, seed=seed)
        return np.stack([decode(p.read_bytes()) for p, _ in picked]), [i for _, i in picked]
    return sample_crops(data_dir, n, per_identity=per_identity, seed=seed, geometry=geometry)


def export_embedder_engine(
    bundle_path: Path,
    *,
    precision: str,
    max_batch: int = 64,
    calibration_dir: Path | None = None,
    calibration_images: int = 512,
    eval_dir: Path,
    eval_images: int = 400,
) -> dict[str, Any]:
    """Build the bundle's embedder engine, check it against ORT, register it; returns its entry.

    Checks: per-crop cosine >= ``MIN_COSINE[precision]`` and verification accuracy at
    the bundle threshold within 0.1 point of ORT on a held-out pair set (4 photos per
    identity). A failing engine is deleted and ``ParityError`` raised.
    """
    from facegate.core.embed import create_embedder

    bundle_path = Path(bundle_path)
    bundle = load_bundle(bundle_path)
    trt = import_tensorrt()
    slug = gpu_slug(gpu_name())
    filename = engine_filename("embedder", slug, trt.__version__, precision)
    engine_path = bundle_path / filename
    timing_cache = (
        bundle_path.parent / f"{bundle_path.name}.{slug}.trt{trt.__version__}.timing.cache"
    )

    calibration = None
    if precision == "int8":
        calib_dir = calibration_dir or eval_dir
        calibration, _ = load_crops(
            calib_dir, calibration_images, per_identity=1, seed=7, geometry=bundle.geometry
        )
    meta = build_engine(
        bundle.onnx_path,
        engine_path,
        precision=precision,
        max_batch=max_batch,
        timing_cache=timing_cache,
        calibration_crops=calibration,
        calibration_cache=bundle_path.parent / f"{filename}.calibration.cache",
        input_spec=bundle.input_spec,
    )

    crops, identities = load_crops(
        eval_dir, eval_images, per_identity=4, seed=11, geometry=bundle.geometry
    )
    reference = create_embedder(bundle, runtime="onnxruntime-cpu").embed(crops)
    trt_embedder = TensorRTEmbedder(
        engine_path,
        precision=precision,
        embedding_size=bundle.embedding_size,
        input_spec=bundle.input_spec,
    )
    try:
        candidate = trt_embedder.embed(crops)
    finally:
        trt_embedder.close()
    parity = parity_report(reference, candidate, min_cosine=MIN_COSINE[precision])
    accuracy = accuracy_change(
        reference,
        candidate,
        identities,
        bundle.threshold,
        max_drop_points=MAX_ACCURACY_CHANGE_POINTS,
    )
    if not (parity["passed"] and accuracy["passed"]):
        engine_path.unlink(missing_ok=True)
        raise ParityError(
            f"{precision} engine rejected: min cosine {parity['min_cosine']:.5f} "
            f"(need {MIN_COSINE[precision]}), accuracy change {accuracy['change_points']:+.3f} pt"
        )
    meta.update(
        parity={"reference": "onnxruntime cpu", **parity},
        verification=accuracy,
        calibration=(
            {"method": "IInt8EntropyCalibrator2", "crops": int(len(calibration))}
            if calibration is not None
            else None
        ),
    )
    add_file(bundle_path, filename, role="engine", **meta)
    return {"file": filename, **meta}

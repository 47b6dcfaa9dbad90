"""ONNX Runtime embedder against a NumPy reference, on a tiny real ONNX model and real photos."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import onnx
import pytest
from facegate.core.bundle import write_bundle
from facegate.core.embed import Embedder, OnnxEmbedder, create_embedder
from facegate.core.errors import BundleError
from facegate.core.manifest import DEFAULT_INPUT
from onnx import TensorProto, helper, numpy_helper

EMBEDDING_SIZE = 16
WEIGHT = (np.random.default_rng(7).standard_normal((3 * 112 * 112, EMBEDDING_SIZE)) / 100).astype(
    np.float32
)


def projection_bundle(root, batch="N", **extra):
    """Bundle around input (batch, 3, 112, 112) -> Flatten -> MatMul(WEIGHT) -> embedding."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["embedding"]),
        ],
        "projection",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, EMBEDDING_SIZE])],
        [numpy_helper.from_array(WEIGHT, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / "model.onnx"))
    return write_bundle(
        root / "bundle",
        onnx_file=root / "model.onnx",
        name="projection",
        version="0",
        embedding_size=EMBEDDING_SIZE,
        threshold=0.3,
        threshold_source="manual",
        threshold_provenance="test fixture",
        extra=extra,
    )


def reference_raw(crops: np.ndarray, bgr: bool = False) -> np.ndarray:
    """By hand: (pixel - 127.5) / 127.5, HWC -> CHW, flatten, times WEIGHT (float64)."""
    x = crops[..., ::-1] if bgr else crops
    x = (x.astype(np.float64) - 127.5) / 127.5
    x = x.transpose(0, 3, 1, 2).reshape(len(crops), -1)
    return x @ WEIGHT.astype(np.float64)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def crops(celeba_index) -> np.ndarray:
    """Ten real photos, squashed to 112x112 RGB (the model does not care about alignment)."""
    images = []
    for path, _identity in celeba_index[:10]:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        images.append(cv2.cvtColor(cv2.resize(bgr, (112, 112)), cv2.COLOR_BGR2RGB))
    return np.stack(images)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return projection_bundle(tmp_path_factory.mktemp("embed"))


def test_embeddings_match_numpy_reference(bundle, crops):
    embedder = OnnxEmbedder(bundle, intra_op_threads=1)
    assert isinstance(embedder, Embedder)
    assert embedder.runtime == "onnxruntime-cpu" and embedder.embedding_size == EMBEDDING_SIZE
    out = embedder.embed(crops)
    assert out.dtype == np.float32 and out.shape == (10, EMBEDDING_SIZE)
    np.testing.assert_allclose(out, unit(reference_raw(crops)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    # Different photos give different embeddings (the model is not degenerate).
    assert np.abs(out[0] - out[1]).max() > 0.05


def test_chunking_matches_one_by_one(bundle, crops):
    chunked = OnnxEmbedder(bundle, max_batch=3).embed(crops)  # chunks 3+3+3+1
    single = np.concatenate([OnnxEmbedder(bundle).embed(crops[i : i + 1]) for i in range(10)])
    np.testing.assert_allclose(chunked, single, atol=1e-6)
    assert OnnxEmbedder(bundle).embed(crops[:0]).shape == (0, EMBEDDING_SIZE)


def test_flip_sums_raw_embeddings_of_crop_and_mirror(bundle, crops):
    out = OnnxEmbedder(bundle, flip=True).embed(crops)
    mirrored = crops[:, :, ::-1]
    expected = unit(reference_raw(crops) + reference_raw(mirrored))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # Flip really changes the result (photos are not mirror-symmetric).
    assert np.abs(out - unit(reference_raw(crops))).max() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_bgr_input_spec_reverses_channels(tmp_path, crops):
    spec = dict(DEFAULT_INPUT, color="BGR")
    bgr_bundle = projection_bundle(tmp_path, input=spec)
    out = OnnxEmbedder(bgr_bundle).embed(crops[:4])
    np.testing.assert_allclose(out, unit(reference_raw(crops[:4], bgr=True)), atol=1e-5)


def test_fixed_batch_model_is_fed_one_padded_chunk_at_a_time(tmp_path, crops):
    fixed = OnnxEmbedder(projection_bundle(tmp_path, batch=4))
    assert fixed.max_batch == 4
    out = fixed.embed(crops)  # 4 + 4 + 2 (padded to 4)
    np.testing.assert_allclose(out, unit(reference_raw(crops)), atol=1e-5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 112, 112, 3), dtype=np.float32), "must be uint8"),
        (np.zeros((112, 112, 3), dtype=np.uint8), r"shape \(N, 112, 112, 3\)"),
        (np.zeros((2, 96, 112, 3), dtype=np.uint8), r"got \(2, 96, 112, 3\)"),
        (np.zeros((2, 112, 112, 4), dtype=np.uint8), r"shape \(N, 112, 112, 3\)"),
    ],
)
def test_bad_input_is_a_clear_value_error(bundle, bad, message):
    with pytest.raises(ValueError, match=message):
        OnnxEmbedder(bundle).embed(bad)


def test_auto_falls_back_to_onnxruntime_cpu_and_logs_why(bundle, crops, caplog):
    caplog.set_level(logging.INFO, logger="facegate.core.embed")
    embedder = create_embedder(bundle, runtime="auto")
    assert embedder.runtime == "onnxruntime-cpu"
    assert any("TensorRT" in r.getMessage() for r in caplog.records)
    assert any("onnxruntime-cpu" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(embedder.embed(crops[:2]), unit(reference_raw(crops[:2])), atol=1e-5)
    flipped = create_embedder(bundle, runtime="onnxruntime-cpu", flip=True)
    assert flipped.runtime == "onnxruntime-cpu" and flipped.flip


def test_explicit_unavailable_runtime_raises(bundle):
    # The bundle has no TensorRT engine, so this holds on GPU machines too.
    with pytest.raises(BundleError, match="TensorRT runtime requested but unavailable"):
        create_embedder(bundle, runtime="tensorrt")
    with pytest.raises(ValueError, match="runtime must be one of"):
        create_embedder(bundle, runtime="cuda")


@pytest.mark.gpu
def test_onnxruntime_cuda_matches_cpu(bundle, crops):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    gpu = create_embedder(bundle, runtime="auto")
    assert gpu.runtime == "onnxruntime-cuda"
    cpu = create_embedder(bundle, runtime="onnxruntime-cpu")
    np.testing.assert_allclose(gpu.embed(crops), cpu.embed(crops), atol=1e-4)

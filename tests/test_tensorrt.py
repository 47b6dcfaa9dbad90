"""TensorRT runtime: clean fallback on CPU machines; engine build + parity on a GPU (gpu marker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facegate.core.bundle import load_bundle
from facegate.core.embed import create_embedder
from facegate.core.embed_tensorrt import (
    TensorRTEmbedder,
    TensorRTUnavailable,
    engine_filename,
    gpu_slug,
    matching_engine,
)
from facegate.core.manifest import DEFAULT_INPUT
from facegate.core.preprocess import model_input
from facegate.export.onnx import export_bundle
from facegate.export.parity import row_cosines, sample_crops
from facegate.export.tensorrt import optimisation_shapes
from facegate.train.backbones import get_backbone


@pytest.fixture(scope="module")
def crops(celeba_root):
    return sample_crops(celeba_root, 24, per_identity=3, seed=1)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, crops):
    """A small MobileFaceNet (BN statistics from real crops) exported to an ONNX bundle."""
    torch.manual_seed(0)
    model = get_backbone("mobilefacenet", embedding_size=64, width=0.25)
    with torch.no_grad():  # train-mode passes give BatchNorm real running statistics
        model.train()
        for _ in range(3):
            model(torch.from_numpy(model_input(crops[0], DEFAULT_INPUT)))
    run = tmp_path_factory.mktemp("run")
    torch.save(
        {
            "backbone": {"name": "mobilefacenet", "kwargs": {"width": 0.25}},
            "state_dict": model.state_dict(),
            "heads": {},
            "optimizer": None,
            "epoch": 0,
            "step": 0,
            "config": {},
            "threshold": 0.3,
            "threshold_source": "uss",
            "embedding_size": 64,
        },
        run / "last.pt",
    )
    return export_bundle(run / "last.pt", tmp_path_factory.mktemp("b"), parity_crops=crops[0][:8])


def test_from_bundle_unavailable_without_engine_or_gpu(bundle):
    # On this CPU machine tensorrt/GPU are missing; on a GPU machine the bundle has no engine yet.
    with pytest.raises(TensorRTUnavailable) as info:
        TensorRTEmbedder.from_bundle(load_bundle(bundle.path))
    assert info.value.message  # the reason is said


def test_auto_falls_back_to_onnxruntime(bundle, crops):
    embedder = create_embedder(load_bundle(bundle.path), runtime="auto")
    assert embedder.runtime.startswith("onnxruntime-")
    assert embedder.embed(crops[0][:3]).shape == (3, 64)


def test_engine_naming_and_matching():
    slug = gpu_slug("NVIDIA H100 80GB HBM3")
    assert slug == "nvidia-h100-80gb-hbm3"
    assert engine_filename("embedder", slug, "10.8.0.43", "fp16") == (
        "embedder.nvidia-h100-80gb-hbm3.trt10.8.0.43.fp16.plan"
    )
    engines = [
        {"role": "engine", "gpu": slug, "tensorrt": "10.8.0.43", "precision": "int8"},
        {"role": "engine", "gpu": slug, "tensorrt": "10.8.0.43", "precision": "fp16"},
        {"role": "engine", "gpu": "nvidia-a10", "tensorrt": "10.8.0.43", "precision": "fp16"},
        {"role": "engine", "gpu": slug, "tensorrt": "10.7.0", "precision": "fp32"},
    ]
    assert matching_engine(engines, slug, "10.8.0.43")["precision"] == "fp16"
    assert matching_engine(engines, slug, "10.8.0.43", precision="int8")["precision"] == "int8"
    assert matching_engine(engines, slug, "10.9.0") is None
    assert matching_engine(engines, "nvidia-l4", "10.8.0.43") is None


def test_optimisation_profile_shapes():
    assert optimisation_shapes((-1, 3, 112, 112), 64) == (
        (1, 3, 112, 112),
        (32, 3, 112, 112),
        (64, 3, 112, 112),
    )
    assert optimisation_shapes((1, 3, -1, -1), 1, spatial=(640, 640))[2] == (1, 3, 640, 640)


@pytest.mark.gpu
def test_fp16_engine_parity_and_auto_picks_tensorrt(bundle, crops, celeba_root):
    from facegate.export.tensorrt import export_embedder_engine

    entry = export_embedder_engine(
        bundle.path, precision="fp16", max_batch=8, eval_dir=celeba_root, eval_images=48
    )
    assert entry["parity"]["min_cosine"] >= 0.999 and entry["parity"]["passed"]
    assert abs(entry["verification"]["change_points"]) <= 0.1
    loaded = load_bundle(bundle.path)  # sha256 of the engine verified
    assert [e["filename"] for e in loaded.engines] == [entry["file"]]

    embedder = create_embedder(loaded, runtime="auto")
    assert embedder.runtime == "tensorrt-fp16"
    reference = create_embedder(loaded, runtime="onnxruntime-cpu").embed(crops[0])
    got = embedder.embed(crops[0])  # 24 crops > max batch 8: chunked
    assert got.shape == (24, 64)
    assert row_cosines(reference, got).min() >= 0.999
    np.testing.assert_allclose(embedder.embed(crops[0][:5]), got[:5], atol=2e-3)

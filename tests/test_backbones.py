"""Backbones: shapes, parameter budgets against insightface, training step, ONNX export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from facegate.train.backbones import UnknownBackbone, count_parameters, get_backbone


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _batch(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 112, 112) * 2 - 1


@pytest.mark.parametrize(
    ("name", "kwargs", "dim"),
    [
        ("iresnet18", {}, 512),
        ("iresnet50", {"width": 0.25}, 128),
        ("iresnet100", {"width": 0.25}, 256),
        ("mobilefacenet", {}, 512),
        ("mobilefacenet", {"width": 0.5}, 128),
    ],
)
def test_output_shape(name: str, kwargs: dict, dim: int) -> None:
    model = get_backbone(name, embedding_size=dim, **kwargs).eval()
    with torch.no_grad():
        out = model(_batch(3))
    assert out.shape == (3, dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        # insightface arcface_torch: r18 24.0M, r50 43.6M, r100 65.2M at 512-d.
        ("iresnet18", 23.5e6, 24.5e6),
        ("iresnet50", 43.0e6, 44.0e6),
        ("iresnet100", 64.5e6, 65.7e6),
        # insightface's mbf (scale 2, 512-d) has ~2.06M; the paper's 128-d net ~1M.
        ("mobilefacenet", 1.0e6, 2.2e6),
    ],
)
def test_parameter_count_matches_reference(name: str, low: float, high: float) -> None:
    assert low < count_parameters(get_backbone(name)) < high


def test_width_multiplier_shrinks_channels() -> None:
    full = count_parameters(get_backbone("mobilefacenet"))
    half = count_parameters(get_backbone("mobilefacenet", width=0.5))
    # Convolutions scale with width^2, the 512-d FC/BN head does not: between 1/4 and 1/2.
    assert full / 4 < half < full / 2
    r18_half = get_backbone("iresnet18", width=0.5)
    assert r18_half.conv1.out_channels == 32
    assert r18_half.fc.in_features == 256 * 7 * 7


def test_iresnet_feature_bn_scale_is_fixed() -> None:
    model = get_backbone("iresnet18", width=0.25)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones_like(model.features.weight))
    total, trainable = count_parameters(model), count_parameters(model, trainable_only=True)
    assert total - trainable == model.features.weight.numel()


@pytest.mark.parametrize(("name", "width"), [("iresnet18", 0.25), ("mobilefacenet", 0.5)])
def test_forward_backward_step_changes_output(name: str, width: float) -> None:
    model = get_backbone(name, embedding_size=64, width=width).train()
    x = _batch(4)
    target = torch.nn.functional.normalize(torch.randn(4, 64), dim=1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = 1 - torch.nn.functional.cosine_similarity(model(x), target).mean()
    loss.backward()
    for pname, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, pname
    optimiser.step()
    with torch.no_grad():
        before = loss.item()
        after = (1 - torch.nn.functional.cosine_similarity(model(x), target).mean()).item()
    assert after < before


def test_unknown_name_raises_typed_error() -> None:
    with pytest.raises(UnknownBackbone, match="iresnet50"):
        get_backbone("resnet9000")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mobilefacenet_exports_to_onnx_with_dynamic_batch(tmp_path) -> None:
    """Legacy TorchScript exporter (dynamo=False): onnxscript is not a dependency."""
    model = get_backbone("mobilefacenet", embedding_size=128, width=0.5).eval()
    path = tmp_path / "mbf.onnx"
    torch.onnx.export(
        model,
        (_batch(1),),
        str(path),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _batch(5)
    (onnx_out,) = session.run(["embedding"], {"input": x.numpy()})
    with torch.no_grad():
        torch_out = model(x).numpy()
    assert onnx_out.shape == (5, 128)
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-3, atol=1e-4)

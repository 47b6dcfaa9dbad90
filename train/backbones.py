"""Face-embedding backbones: insightface's IResNet family, MobileFaceNet, dlib's ResNet.

Both map an aligned crop batch ``(N, 3, 112, 112)`` (RGB, ``(pixel - 127.5) / 127.5``)
to un-normalised embeddings ``(N, embedding_size)``. The layouts follow insightface's
``arcface_torch`` so recipes and parameter budgets compare with the literature; a
``width`` multiplier scales every channel count for small CPU-trainable variants.
The forward pass is plain float32 (no autocast inside the model: mixed precision is
the trainer's business) and uses only ops that export to ONNX opset 17.

``dlib_resnet`` is the exception to the input above: dlib's face recognition ResNet
(150x150 dlib chips, ``(pixel - mean_rgb) / 256``, 128-d), rebuilt from dlib's model
file by ``core.dlib_dnn`` without dlib; ``input_spec_of`` gives any backbone's input.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from facegate.core.align import ARCFACE_112, DLIB_CHIP_150
from facegate.core.bundle import DEFAULT_INPUT
from facegate.core.detect import dlib_model_file
from facegate.core.dlib_dnn import DlibFormatError, DlibLayer, read_dlib_dnn
from facegate.core.errors import FacegateError
from torch import nn

INPUT_SIZE = 112


class UnknownBackbone(FacegateError, ValueError):
    """A backbone name that ``get_backbone`` does not know (a configuration mistake)."""

    code = "unknown_backbone"
    status = 400


def _scaled(channels: int, width: float) -> int:
    """Channel count ``channels * width`` rounded to a multiple of 8 (at least 8)."""
    return max(8, int(round(channels * width / 8.0)) * 8)


# ---------------------------------------------------------------- IResNet


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block of IResNet: BN-conv-BN-PReLU-conv-BN (+ shortcut)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                nn.BatchNorm2d(channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """insightface IResNet: 3x3 stem, four stride-2 stages, BN-Dropout-FC-BN head.

    The final ``features`` BatchNorm1d keeps its scale fixed at 1 (as insightface does)
    so the embedding's scale is set by the FC layer alone.
    """

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        width: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stem = _scaled(64, width)
        stage_channels = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=1e-5)
        self.prelu = nn.PReLU(stem)
        in_channels = stem
        stages = []
        for channels, blocks in zip(stage_channels, layers, strict=True):
            stage = [IBasicBlock(in_channels, channels, stride=2)]
            stage += [IBasicBlock(channels, channels) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        spatial = INPUT_SIZE // 16  # four stride-2 stages: 112 -> 7
        self.bn2 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


# ---------------------------------------------------------------- MobileFaceNet


class ConvBlock(nn.Sequential):
    """Conv-BN-PReLU."""

    def __init__(
        self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )


class LinearBlock(nn.Sequential):
    """Conv-BN without activation (the linear bottleneck projection)."""

    def __init__(
        self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``hidden``, 3x3 depthwise, 1x1 linear project."""

    def __init__(
        self, in_c: int, out_c: int, hidden: int, stride: int = 2, residual: bool = False
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden),
            LinearBlock(hidden, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


def _residual_stage(channels: int, hidden: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(
        *[DepthWise(channels, channels, hidden, stride=1, residual=True) for _ in range(blocks)]
    )


class GDC(nn.Sequential):
    """Global depthwise conv head: 7x7 depthwise (linear), flatten, FC, BatchNorm1d."""

    def __init__(self, channels: int, embedding_size: int) -> None:
        super().__init__(
            LinearBlock(channels, channels, kernel=INPUT_SIZE // 16, groups=channels),
            nn.Flatten(1),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )


class MobileFaceNet(nn.Module):
    """insightface's MobileFaceNet (``get_mbf``: blocks (1, 4, 6, 2), scale 2) with a width knob.

    ``width=1.0`` is insightface's default ``mbf`` (stem 128 channels, stages 128/256,
    expansions 128/256/512, 512-channel separable conv before the GDC head). The stem's
    second conv is a true depthwise 3x3 (insightface uses 64 groups of 2 channels).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        width: float = 1.0,
        blocks: Sequence[int] = (1, 4, 6, 2),
    ) -> None:
        super().__init__()
        c1, c2 = _scaled(128, width), _scaled(256, width)
        e1, e2, e3 = _scaled(128, width), _scaled(256, width), _scaled(512, width)
        head = _scaled(512, width)
        if blocks[0] == 1:
            stem2: nn.Module = ConvBlock(c1, c1, 3, 1, 1, groups=c1)
        else:
            stem2 = _residual_stage(c1, e1, blocks[0])
        self.layers = nn.Sequential(
            ConvBlock(3, c1, 3, 2, 1),
            stem2,
            DepthWise(c1, c1, e1, stride=2),
            _residual_stage(c1, e1, blocks[1]),
            DepthWise(c1, c2, e2, stride=2),
            _residual_stage(c2, e2, blocks[2]),
            DepthWise(c2, c2, e3, stride=2),
            _residual_stage(c2, e2, blocks[3]),
        )
        self.conv_sep = ConvBlock(c2, head)
        self.features = GDC(head, embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.conv_sep(self.layers(x)))


# ---------------------------------------------------------------- dlib's face recognition ResNet

DLIB_MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"  # dlib-models, public domain / CC0
DLIB_INPUT: dict[str, Any] = {
    "name": "input",
    "size": [150, 150],
    "color": "RGB",
    "layout": "NCHW",
    "mean": [122.782, 117.001, 104.298],  # input_rgb_image_sized's avg_red/green/blue
    "std": 256.0,
}
# (channels, downsampling) per residual block, input side first: alevel4 .. alevel0 of
# dlib's examples/dnn_face_recognition_ex.cpp.
_DLIB_BLOCKS: tuple[tuple[int, bool], ...] = (
    *[(32, False)] * 3,
    (64, True), *[(64, False)] * 3,
    (128, True), *[(128, False)] * 2,
    (256, True), *[(256, False)] * 2,
    (256, True),
)


class Affine(nn.Module):
    """dlib's ``affine_``: per-channel ``gamma * x + beta`` (its batch norm, folded), trainable."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev_``: zero-extend both inputs at the end of each axis, then add.

    A downsampling block's strided conv (pad 0) and pooled shortcut can differ in size
    (3x3 vs 4x4, 1x1 vs 2x2) and channels; cropping or padding top-left breaks parity.
    """
    if a.shape == b.shape:
        return a + b
    size = [max(p, q) for p, q in zip(a.shape[1:], b.shape[1:], strict=True)]

    def extend(x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[1:]
        return F.pad(x, (0, size[2] - w, 0, size[1] - h, 0, size[0] - c))

    return extend(a) + extend(b)


class DlibBlock(nn.Module):
    """dlib's ``ares``/``ares_down``: relu(add_prev(shortcut, affine-conv-relu-affine-conv(x))).

    Downsampling: the first conv has stride 2 and padding 0 (dlib's default for strided
    windows) and the shortcut is a 2x2 stride-2 average pool.
    """

    def __init__(self, in_channels: int, channels: int, down: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 2 if down else 1, 0 if down else 1)
        self.affine1 = Affine(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.affine2 = Affine(channels)
        self.shortcut: nn.Module = nn.AvgPool2d(2, 2) if down else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        return F.relu(add_prev(self.shortcut(x), y))


class DlibResNet(nn.Module):
    """dlib's face recognition ResNet (29 convs, 5.6M params) rebuilt layer for layer.

    Input: (N, 3, 150, 150) RGB chips from ``dlib.get_face_chip(img, shape5, 150, 0.25)``
    normalised as ``(pixel - mean_rgb) / 256`` (``input_spec``); output: the 128-d
    un-normalised descriptor dlib compares by Euclidean distance (0.6). Built
    uninitialised; ``load_dlib_weights`` fills it from dlib's model file.
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_spec: dict[str, Any] = copy.deepcopy(DLIB_INPUT)
        self.conv = nn.Conv2d(3, 32, 7, 2, 0)
        self.affine = Affine(32)
        self.pool = nn.MaxPool2d(3, 2, 0)
        blocks, in_channels = [], 32
        for channels, down in _DLIB_BLOCKS:
            blocks.append(DlibBlock(in_channels, channels, down))
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_channels, 128, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.affine(self.conv(x))))
        return self.fc(self.blocks(x).mean(dim=(2, 3)))

    def dlib_layers(self) -> list[tuple[str, int, nn.Module | None]]:
        """(kind, tag/skip wrappers, module) per dlib layer, in the file's order (input side first).

        The file stores no tag ids; this is where the residual wiring is spelled out:
        a tag before each block's first conv, ``skip1<tag2<...>>`` before a shortcut pool.
        """
        layers: list[tuple[str, int, nn.Module | None]] = [
            ("con", 0, self.conv), ("affine", 0, self.affine), ("relu", 0, None),
            ("max_pool", 0, self.pool),
        ]
        for block in self.blocks:
            layers += [
                ("con", 1, block.conv1), ("affine", 0, block.affine1), ("relu", 0, None),
                ("con", 0, block.conv2), ("affine", 0, block.affine2),
            ]
            if isinstance(block.shortcut, nn.AvgPool2d):
                layers.append(("avg_pool", 2, block.shortcut))
            layers += [("add_prev", 0, None), ("relu", 0, None)]
        return [*layers, ("avg_pool", 0, None), ("fc", 0, self.fc)]


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _load_dlib_layer(index: int, layer: DlibLayer, module: nn.Module | None) -> None:
    """Copy one file layer into its module, checking the geometry the module was built with."""
    a, p = layer.attrs, layer.params.reshape(-1)

    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise DlibFormatError(
                f"dlib layer {index} ({layer.name}): {what} does not match dlib_resnet"
            )

    window = None
    if "nr" in a:
        window = ((a["nr"], a["nc"]), (a["stride_y"], a["stride_x"]), (a["pad_y"], a["pad_x"]))
    if isinstance(module, nn.Conv2d):
        shape, n = a["filters"], math.prod(a["filters"])
        expect(tuple(module.weight.shape) == shape and p.size == n + shape[0], "filter shape")
        expect(window == (module.kernel_size, module.stride, module.padding), "window")
        module.weight.copy_(torch.from_numpy(p[:n].reshape(shape)))
        module.bias.copy_(torch.from_numpy(p[n:]))
    elif isinstance(module, Affine):
        expect(a["mode"] == 0 and p.size == 2 * module.gamma.numel(), "per-channel scale/shift")
        module.gamma.copy_(torch.from_numpy(p[: p.size // 2]))
        module.beta.copy_(torch.from_numpy(p[p.size // 2 :]))
    elif isinstance(module, nn.Linear):
        shape = a["weights"][:2]  # (in, out): dlib computes y = x @ W
        expect(a["bias_mode"] == 1 and shape == module.weight.shape[::-1], "fc without bias")
        module.weight.copy_(torch.from_numpy(p.reshape(shape).T))
    elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        geometry = (module.kernel_size, module.stride, module.padding)
        expect(window == tuple(_pair(v) for v in geometry), "window")
    elif layer.kind == "avg_pool":
        expect(window == ((0, 0), (1, 1), (0, 0)), "average over everything")


@torch.no_grad()
def load_dlib_weights(model: DlibResNet, path: str | Path | None = None) -> DlibResNet:
    """Fill ``model`` with dlib's pretrained weights (default: face_recognition_models' copy).

    The file's layer sequence, wiring, geometry and input (size, channel means) must
    match the rebuild and its ``input_spec`` exactly, otherwise ``DlibFormatError``.
    """
    if not isinstance(model, DlibResNet):
        raise UnknownBackbone(f"dlib weights fit dlib_resnet only, not {type(model).__name__}")
    path = dlib_model_file(DLIB_MODEL_FILE) if path is None else Path(path)
    net = read_dlib_dnn(path)
    expected = model.dlib_layers()
    if (
        [(kind, wrappers) for kind, wrappers, _ in expected]
        != [(layer.kind, layer.wrappers) for layer in net.layers]
        or net.input_size != tuple(model.input_spec["size"])
        or np.float32(net.mean_rgb).tolist() != np.float32(model.input_spec["mean"]).tolist()
    ):
        raise DlibFormatError(f"{path}: not dlib's face recognition ResNet")
    for index, (layer, (_, _, module)) in enumerate(zip(net.layers, expected, strict=True)):
        _load_dlib_layer(index, layer, module)
    return model


def dlib_resnet(
    embedding_size: int = 128,
    width: float = 1.0,
    pretrained: bool = False,
    path: str | Path | None = None,
) -> DlibResNet:
    """The registry's ``dlib_resnet``: fixed 128-d, width 1; ``pretrained`` (or a ``path``)
    loads dlib's weights, otherwise the same architecture uninitialised."""
    if embedding_size != 128 or width != 1.0:
        raise UnknownBackbone(
            f"dlib_resnet is fixed at embedding_size 128, width 1.0; got {embedding_size}, {width}"
        )
    model = DlibResNet()
    return load_dlib_weights(model, path) if pretrained or path is not None else model


def input_spec_of(model: nn.Module) -> dict[str, Any]:
    """The bundle-style input spec a backbone expects (size, colour, layout, mean, std)."""
    return copy.deepcopy(getattr(model, "input_spec", DEFAULT_INPUT))


def geometry_of(model: nn.Module) -> dict[str, Any]:
    """The crop geometry a backbone was built for, in manifest form: dlib chips for the
    dlib ResNet, the ArcFace 112 template for the rest."""
    if isinstance(model, DlibResNet):
        return DLIB_CHIP_150.to_dict()
    return ARCFACE_112.to_dict()


# ---------------------------------------------------------------- registry

_IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


def _build_iresnet(layers: Sequence[int]) -> Callable[..., nn.Module]:
    def build(embedding_size: int = 512, **kw: object) -> nn.Module:
        return IResNet(layers, embedding_size=embedding_size, **kw)  # type: ignore[arg-type]

    return build


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{name: _build_iresnet(layers) for name, layers in _IRESNET_LAYERS.items()},
    "mobilefacenet": MobileFaceNet,
    "dlib_resnet": dlib_resnet,
}


def get_backbone(name: str, embedding_size: int = 512, **kw: object) -> nn.Module:
    """Build a backbone by name; ``kw`` goes to its constructor (``width``, ``dropout``...).

    Names: ``iresnet18``, ``iresnet50``, ``iresnet100``, ``mobilefacenet``, ``dlib_resnet``
    (``pretrained=True`` loads dlib's weights). A checkpoint
    stores ``{"name", "kwargs"}`` so the same call rebuilds the model at export time.
    """
    try:
        build = BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES))
        raise UnknownBackbone(f"unknown backbone {name!r} (known: {known})") from None
    return build(embedding_size=embedding_size, **kw)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

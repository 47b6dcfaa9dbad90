"""Face-embedding backbones: insightface's IResNet family and MobileFaceNet.

Both map an aligned crop batch ``(N, 3, 112, 112)`` (RGB, ``(pixel - 127.5) / 127.5``)
to un-normalised embeddings ``(N, embedding_size)``. The layouts follow insightface's
``arcface_torch`` so recipes and parameter budgets compare with the literature; a
``width`` multiplier scales every channel count for small CPU-trainable variants.
The forward pass is plain float32 (no autocast inside the model: mixed precision is
the trainer's business) and uses only ops that export to ONNX opset 17.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
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
}


def get_backbone(name: str, embedding_size: int = 512, **kw: object) -> nn.Module:
    """Build a backbone by name; ``kw`` goes to its constructor (``width``, ``dropout``...).

    Names: ``iresnet18``, ``iresnet50``, ``iresnet100``, ``mobilefacenet``. A checkpoint
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

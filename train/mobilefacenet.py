"""MobileFaceNet (insightface's ``arcface_torch`` layout): depthwise blocks and a global
depthwise (GDC) head on aligned 112x112 crops; ``width`` scales every channel count."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from facegate.train.iresnet import INPUT_SIZE, scaled_channels
from torch import nn


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
        c1, c2 = scaled_channels(128, width), scaled_channels(256, width)
        e1, e2, e3 = scaled_channels(128, width), scaled_channels(256, width), scaled_channels(512, width)
        head = scaled_channels(512, width)
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

"""dlib's face recognition ResNet rebuilt in PyTorch, its weights read from dlib's own model
file by ``core.dlib_dnn`` (no dlib at run time): 150x150 dlib chips,
``(pixel - mean_rgb) / 256``, 128-d descriptors."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from facegate.core.detect import dlib_model_file
from facegate.core.dlib_dnn import DlibFormatError, DlibLayer, read_dlib_dnn
from torch import nn

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


"""Face-embedding backbones by name: the registry ``get_backbone`` builds from, and what a
backbone declares (its input spec and crop geometry).

Families, one module each: insightface's IResNet (``train.iresnet``) and MobileFaceNet
(``train.mobilefacenet``) map an aligned crop batch ``(N, 3, 112, 112)`` (RGB,
``(pixel - 127.5) / 127.5``) to un-normalised embeddings; their layouts follow
``arcface_torch`` so recipes and parameter budgets compare with the literature. The
forward pass is plain float32 (mixed precision is the trainer's business) and uses only
ops that export to ONNX opset 17.

``dlib_resnet`` (``train.dlib_resnet_port``) is the exception to the input above: dlib's
face recognition ResNet (150x150 dlib chips, ``(pixel - mean_rgb) / 256``, 128-d), rebuilt
from dlib's model file without dlib; ``input_spec_of`` gives any backbone's input.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from facegate.core.align import ARCFACE_112, DLIB_CHIP_150
from facegate.core.errors import FacegateError
from facegate.core.manifest import DEFAULT_INPUT
from facegate.train.dlib_resnet_port import (
    DLIB_MODEL_FILE,
    Affine,
    DlibResNet,
    add_prev,
    load_dlib_weights,
)
from facegate.train.iresnet import IResNet
from facegate.train.mobilefacenet import MobileFaceNet
from torch import nn

# Names other modules import from here, the backbones' one public face.
__all__ = [
    "BACKBONES", "DLIB_MODEL_FILE", "Affine", "DlibResNet", "IResNet", "MobileFaceNet",
    "UnknownBackbone", "add_prev", "count_parameters", "dlib_resnet", "geometry_of",
    "get_backbone", "input_spec_of",
]


class UnknownBackbone(FacegateError, ValueError):
    """A backbone name that ``get_backbone`` does not know (a configuration mistake)."""

    code = "unknown_backbone"
    status = 400


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

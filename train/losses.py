"""The loss registry: which names a config may choose and the modules they build.

Every loss is a small ``nn.Module`` in the style of insightface's ``arcface_torch`` with
the papers' defaults as constructor arguments (formulas: ``shared/notes/losses-and-metrics.md``):

- sample-to-class heads (``margin_heads``): ``ArcFace``, ``CosFace``, ``NormSoftmax``;
- sample-to-sample losses on a per-class memory (``memory_losses``, UniTSFace): ``USSLoss``
  (unified threshold ``t = b / s``), ``S2SSoftmaxLoss``, ``S2SBCELoss``;
- regularisers (``regularizers``): ``DiscFaceRegularizer``, ``TCMRegularizer``,
  ``SimilarityDistillation`` from a frozen teacher.

Configs are plain data: ``loss.head`` and ``loss.uss.variant`` must be keys of ``HEADS`` and
``SAMPLE_TO_SAMPLE`` (``train.config`` checks against them), and ``build_loss_modules``
turns a ``loss`` section into the modules, in a fixed order (their random initialisation
draws from torch's generator in that order, so a seed gives the same run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from facegate.train.margin_heads import ArcFace, CombinedMarginLoss, CosFace, NormSoftmax
from facegate.train.memory_losses import (
    FeatureMemory,
    S2SBCELoss,
    S2SSoftmaxLoss,
    USSLoss,
)
from facegate.train.regularizers import (
    DiscFaceRegularizer,
    SimilarityDistillation,
    TCMRegularizer,
)
from torch import nn

__all__ = [
    "HEADS", "REGULARIZERS", "SAMPLE_TO_SAMPLE", "ArcFace", "CombinedMarginLoss", "CosFace",
    "DiscFaceRegularizer", "FeatureMemory", "NormSoftmax", "S2SBCELoss", "S2SSoftmaxLoss",
    "SimilarityDistillation", "TCMRegularizer", "USSLoss", "build_loss_modules",
]

# loss.head -> (classes, embedding size, the loss section) -> module
HEADS: dict[str, Callable[[int, int, Any], nn.Module]] = {
    "cosface": lambda classes, d, loss: CosFace(classes, d, s=loss.s, margin=loss.margin),
    "arcface": lambda classes, d, loss: ArcFace(classes, d, s=loss.s, margin=loss.margin),
    "softmax": lambda classes, d, loss: NormSoftmax(classes, d, s=loss.s),
}

# loss.uss.variant -> (classes, embedding size, the loss.uss section) -> module
SAMPLE_TO_SAMPLE: dict[str, Callable[[int, int, Any], nn.Module]] = {
    "uss": lambda classes, d, uss: USSLoss(classes, d, s=uss.s, m=uss.m, negatives=uss.negatives,
                                           negative_weight=uss.negative_weight),
    "s2s_softmax": lambda classes, d, uss: S2SSoftmaxLoss(classes, d, s=uss.s, m=uss.m),
    "s2s_bce": lambda classes, d, uss: S2SBCELoss(classes, d, s=uss.s, m=uss.m),
}

# loss.<name> (a section with ``enabled``) -> (embedding size, that section) -> module
REGULARIZERS: dict[str, Callable[[int, Any], nn.Module]] = {
    "discface": lambda d, c: DiscFaceRegularizer(d, weight=c.weight, clip=c.clip),
    "tcm": lambda d, c: TCMRegularizer(c.pos_margin, c.neg_margin, c.pos_weight, c.neg_weight),
    "distill": lambda d, c: SimilarityDistillation(weight=c.weight, direct=c.direct),
}


def build_loss_modules(loss: Any, num_classes: int, embedding_size: int) -> dict[str, nn.Module]:
    """The enabled loss modules of a ``loss`` config section, by term name: ``head``, then
    ``uss`` (any variant) and the enabled regularisers."""
    modules = {"head": HEADS[loss.head](num_classes, embedding_size, loss)}
    if loss.uss.enabled:
        modules["uss"] = SAMPLE_TO_SAMPLE[loss.uss.variant](num_classes, embedding_size, loss.uss)
    for name, build in REGULARIZERS.items():
        section = getattr(loss, name)
        if section.enabled:
            modules[name] = build(embedding_size, section)
    return modules

"""Sample-to-class margin heads: softmax over class weights with a margin at the label.

insightface's combined margin (``arcface_torch`` style: one small module, the papers'
hyper-parameters in the constructor) and the three heads a config can name
(``loss.head``: ``ArcFace``, ``CosFace``, ``NormSoftmax``). Formulas:
``shared/notes/losses-and-metrics.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CombinedMarginLoss(nn.Module):
    """Softmax cross-entropy with insightface's combined margin on the target logit.

    Target logit ``s * (cos(m1 * theta + m2) - m3)``, others ``s * cos``, where ``theta``
    is the angle between the embedding and its class weight. ArcFace is (1, 0.5, 0),
    CosFace (1, 0, 0.35..0.4), normalised softmax (1, 0, 0).

    Where the margin angle passes pi (``theta > theta0 = (pi - m2) / m1``) ``cos`` would
    turn back up and reward moving away from the class; there the target uses
    insightface's monotonic fallback ``cos(theta) - mm`` with ``th = cos(theta0)`` and,
    for ``m1 = 1``, ``mm = sin(pi - m2) * m2`` (i.e. ``th = cos(pi - m)``,
    ``mm = sin(pi - m) * m``). At ``theta0`` the logit steps down from ``-1`` to
    ``-cos(m2) - m2 * sin(m2)``, so it stays non-increasing in ``theta`` over [0, pi].
    For ``m1 != 1`` ``mm`` is raised to at least ``1 + th`` for the same reason.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.4,
    ) -> None:
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.angular = self.m1 != 1.0 or self.m2 != 0.0
        self.needs_fallback = self.m1 * math.pi + self.m2 > math.pi
        theta0 = min(max((math.pi - self.m2) / self.m1, 0.0), math.pi)
        self.th = math.cos(theta0)
        self.mm = math.sin(math.pi - self.m2) * self.m2
        if self.m1 != 1.0:
            self.mm = max(self.mm, 1.0 + self.th)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` cosines between embeddings and class weights."""
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))

    def target_cosine(self, cos_target: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted target cosine ``cos(m1*theta + m2) - m3`` (with the fallback)."""
        if not self.angular:
            return cos_target - self.m3
        eps = 1e-7
        theta = torch.acos(cos_target.clamp(-1.0 + eps, 1.0 - eps))
        margined = torch.cos(self.m1 * theta + self.m2)
        if self.needs_fallback:
            margined = torch.where(cos_target > self.th, margined, cos_target - self.mm)
        return margined - self.m3

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled ``(N, C)`` logits with the margin applied at each sample's label."""
        cos = self.cosine(embeddings).clamp(-1.0, 1.0)
        index = labels.long().view(-1, 1)
        target = self.target_cosine(cos.gather(1, index))
        return self.s * cos.scatter(1, index, target)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings, labels), labels.long())


def ArcFace(  # noqa: N802 - factory named after the loss, like a class
    num_classes: int, embedding_size: int, s: float = 64.0, margin: float = 0.5
) -> CombinedMarginLoss:
    """Additive angular margin (Deng et al., CVPR 2019): target ``s*cos(theta + m)``."""
    return CombinedMarginLoss(num_classes, embedding_size, s=s, m1=1.0, m2=margin, m3=0.0)


def CosFace(  # noqa: N802
    num_classes: int, embedding_size: int, s: float = 64.0, margin: float = 0.4
) -> CombinedMarginLoss:
    """Large-margin cosine loss: target ``s*(cos(theta) - m)`` (m = 0.4 as in UniTSFace)."""
    return CombinedMarginLoss(num_classes, embedding_size, s=s, m1=1.0, m2=0.0, m3=margin)


def NormSoftmax(  # noqa: N802
    num_classes: int, embedding_size: int, s: float = 64.0
) -> CombinedMarginLoss:
    """Normalised softmax (no margin): the sample-to-class baseline."""
    return CombinedMarginLoss(num_classes, embedding_size, s=s, m1=1.0, m2=0.0, m3=0.0)

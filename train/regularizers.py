"""Terms added to a margin head: DiscFace, TCM and similarity distillation from a teacher.

Each is a small module with its hyper-parameters in the constructor; formulas in
``shared/notes/losses-and-metrics.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiscFaceRegularizer(nn.Module):
    """DiscFace minimum-discrepancy term (ACCV 2020).

    Displacements ``e_i = z_i - w_{y_i}`` (both normalised) are pulled towards one shared
    learnable basis ``xi`` whose norm is clipped to ``clip`` when used, so every class
    has the same displacement structure: ``weight * mean_i |e_i - xi_hat|``. Pair it
    with a sample-to-class loss and pass that loss's ``weight`` as ``class_weight``.
    """

    def __init__(self, embedding_size: int, weight: float = 0.2, clip: float = 0.05) -> None:
        super().__init__()
        self.weight, self.clip = float(weight), float(clip)
        self.xi = nn.Parameter(torch.randn(embedding_size) * 1e-3)

    def basis(self) -> torch.Tensor:
        """``xi_hat = xi / |xi| * min(|xi|, clip)``."""
        norm = self.xi.norm().clamp_min(1e-12)
        return self.xi / norm * norm.clamp_max(self.clip)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor
    ) -> torch.Tensor:
        z = F.normalize(embeddings, dim=1)
        w = F.normalize(class_weight[labels.long().view(-1)], dim=1)
        return self.weight * (z - w - self.basis()).norm(dim=1).mean()


class TCMRegularizer(nn.Module):
    """Threshold-consistent margin (ICLR 2024) over the pairs i < j of a batch.

    Hard positives (same identity, ``S_ij < pos_margin``) are pushed up, hard negatives
    (``S_ij > neg_margin``) down, each set averaged over its own size; an empty set
    contributes exactly 0 while the graph stays connected. ``S`` is the cosine.
    Defaults (provisional, to be tuned by validation): ``pos_margin = 0.6`` and
    ``neg_margin = 0.3`` bracket the 0.3-0.5 band where margin-trained face models
    put their verification threshold; weights 1.0 leave the balance to the base loss.
    """

    def __init__(
        self,
        pos_margin: float = 0.6,
        neg_margin: float = 0.3,
        pos_weight: float = 1.0,
        neg_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)
        self.pos_weight, self.neg_weight = float(pos_weight), float(neg_weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(embeddings, dim=1)
        n = z.shape[0]
        i, j = torch.triu_indices(n, n, offset=1, device=z.device)
        similarity = (z[i] * z[j]).sum(dim=1)
        labels = labels.view(-1)
        same = labels[i] == labels[j]
        hard_pos = same & (similarity < self.pos_margin)
        hard_neg = ~same & (similarity > self.neg_margin)
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        pos = torch.where(hard_pos, self.pos_margin - similarity, zero).sum()
        neg = torch.where(hard_neg, similarity - self.neg_margin, zero).sum()
        pos = pos / hard_pos.sum().clamp_min(1)
        neg = neg / hard_neg.sum().clamp_min(1)
        return self.pos_weight * pos + self.neg_weight * neg


class SimilarityDistillation(nn.Module):
    """Relational distillation: match the student's pairwise cosines to a frozen
    teacher's, so the student inherits the teacher's similarity geometry whatever its
    dimension (dlib's 128-d ResNet into our backbone, an extra recipe).

    ``weight * mean_{i != j} (cos_s(i, j) - cos_t(i, j))^2``, plus, when ``direct > 0``
    and the dimensions match, ``direct * mean_i (1 - cos(student_i, teacher_i))``.
    """

    def __init__(self, weight: float = 1.0, direct: float = 0.0) -> None:
        super().__init__()
        self.weight, self.direct = float(weight), float(direct)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(f"batch sizes differ: {student.shape[0]} vs {teacher.shape[0]}")
        s = F.normalize(student, dim=1)
        t = F.normalize(teacher.detach().to(student.dtype), dim=1)
        n = s.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=s.device)
        gap = (s @ s.t() - t @ t.t())[off_diagonal]
        loss = self.weight * gap.pow(2).mean() if n > 1 else student.sum() * 0.0
        if self.direct > 0.0:
            if s.shape[1] != t.shape[1]:
                raise ValueError(
                    f"direct distillation needs equal dimensions, got {s.shape[1]} and {t.shape[1]}"
                )
            loss = loss + self.direct * (1.0 - (s * t).sum(dim=1)).mean()
        return loss

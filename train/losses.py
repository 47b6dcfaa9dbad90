"""Training losses and regularisers for face embeddings.

The exact formulas are in ``shared/notes/losses-and-metrics.md``; each loss here is a
small ``nn.Module`` in the style of insightface's ``arcface_torch`` with the papers'
defaults as constructor arguments:

- sample-to-class: ``CombinedMarginLoss`` (``ArcFace``, ``CosFace``, ``NormSoftmax``);
- sample-to-sample from a per-class memory (UniTSFace): ``USSLoss`` (one learnable
  bias ``b``, unified threshold ``t = b / s``), ``S2SSoftmaxLoss``, ``S2SBCELoss``;
- regularisers: ``DiscFaceRegularizer``, ``TCMRegularizer``;
- ``SimilarityDistillation`` from a frozen teacher (e.g. dlib's 128-d ResNet).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- sample-to-class


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


# ---------------------------------------------------------------- sample-to-sample memory


class FeatureMemory(nn.Module):
    """Per-class memory of the most recent normalised embedding (UniTSFace's ``M_c``).

    Buffers ``memory`` (C, d) and ``filled`` (C,) bool live in the state dict so a resumed
    run keeps them. The trainer calls ``update_memory`` after each optimiser step, with
    the same batch's embeddings; the loss itself never writes the memory. Under DDP the
    trainer gathers embeddings and labels from all ranks first so every replica's memory
    stays identical.
    """

    memory: torch.Tensor
    filled: torch.Tensor

    def __init__(self, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("memory", torch.zeros(num_classes, embedding_size))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update_memory(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Write detached normalised embeddings at their labels; for a label seen several
        times in the batch the last sample wins (deterministic, unlike index_put)."""
        labels = labels.long().view(-1)
        positions = torch.arange(labels.numel(), device=labels.device)
        last = torch.full((self.num_classes,), -1, dtype=torch.long, device=labels.device)
        last = last.scatter_reduce(0, labels, positions, reduce="amax")
        classes = torch.nonzero(last >= 0).view(-1)
        normalised = F.normalize(embeddings.detach(), dim=1).to(self.memory.dtype)
        self.memory[classes] = normalised[last[classes]]
        self.filled[classes] = True

    def memory_cosine(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cosines ``(N, C)`` to the memory and the positive / negative masks of filled
        classes (own class, other classes)."""
        memory = self.memory.to(embeddings.dtype)
        cos = F.normalize(embeddings, dim=1) @ memory.t()
        own = F.one_hot(labels.long().view(-1), self.num_classes).bool()
        filled = self.filled.view(1, -1)
        return cos, own & filled, ~own & filled


NEGATIVES = ("sum", "mean")


class _BinaryS2SLoss(FeatureMemory):
    """USS form with a learnable bias of shape ``bias_shape`` (scalar: USS; (C,): S2S-BCE).

    L(i) = sum_{c=y_i} softplus(-(s*(cos_ic - m) - b_c)) + lambda * N_i,
    N_i = sum_{c!=y_i} softplus(s*cos_ic - b_c)  (``negatives="sum"``, the paper's form)
    or the same sum divided by the number of filled classes c != y_i (``"mean"``),
    over filled classes only, exponent arguments clamped to [-s, s], mean over samples;
    ``lambda`` is ``negative_weight`` (1 in the paper).
    The bias is initialised at the first call that sees a filled negative class; until
    then it stays 0 (and with an empty memory the loss is a graph-connected 0).
    """

    bias_initialised: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        s: float,
        m: float,
        bias_shape: tuple,
        negatives: str = "sum",
        negative_weight: float = 1.0,
    ) -> None:
        super().__init__(num_classes, embedding_size)
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
        if not (math.isfinite(negative_weight) and negative_weight > 0):
            raise ValueError(f"negative_weight must be a positive number, got {negative_weight!r}")
        self.s, self.m = float(s), float(m)
        self.negatives, self.negative_weight = negatives, float(negative_weight)
        self.bias = nn.Parameter(torch.zeros(bias_shape))
        self.register_buffer("bias_initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _initialise_bias(self, cos: torch.Tensor, negatives: torch.Tensor) -> None:
        """Once: b = mean_i logsumexp_{c != y_i}(s * cos_ic) over samples with negatives
        (UniTSFace's reference code), so the threshold starts among the negatives.

        That b solves ``sum_c exp(s*cos_ic - b) = 1``; the variant starts from the same
        point of its own negative side, ``lambda * agg_c exp(s*cos_ic - b) = 1``: plus
        ``log(lambda)``, and minus ``log(#negatives_i)`` with ``negatives="mean"``
        (so the paper's defaults give exactly the reference value)."""
        has_negative = negatives.any(dim=1)
        scaled = (self.s * cos).masked_fill(~negatives, float("-inf"))
        per_sample = torch.logsumexp(scaled[has_negative], dim=1)
        if self.negatives == "mean":
            per_sample = per_sample - negatives[has_negative].sum(dim=1).to(cos.dtype).log()
        value = per_sample.mean() + math.log(self.negative_weight)
        self.bias.fill_(value.item())
        self.bias_initialised.fill_(True)

    def _class_bias(self) -> torch.Tensor:
        return self.bias.view(1, -1) if self.bias.dim() else self.bias

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, positives, negatives = self.memory_cosine(embeddings, labels)
        if not bool(self.bias_initialised) and bool(negatives.any()):
            self._initialise_bias(cos, negatives)
        b = self._class_bias()
        pos_arg = (-(self.s * (cos - self.m) - b)).clamp(-self.s, self.s)
        neg_arg = (self.s * cos - b).clamp(-self.s, self.s)
        zero = torch.zeros((), dtype=cos.dtype, device=cos.device)
        positive = torch.where(positives, F.softplus(pos_arg), zero).sum(dim=1)
        negative = torch.where(negatives, F.softplus(neg_arg), zero).sum(dim=1)
        if self.negatives == "mean":
            negative = negative / negatives.sum(dim=1).clamp_min(1).to(cos.dtype)
        if self.negative_weight != 1.0:
            negative = self.negative_weight * negative
        return (positive + negative).mean()


class USSLoss(_BinaryS2SLoss):
    """Unified-threshold sample-to-sample loss (UniTSFace, NeurIPS 2023), marginal form.

    One learnable scalar ``bias`` b; positives are pushed above ``t + m`` and negatives
    below ``t = b / s`` (``threshold``), the threshold the server uses by default.
    Classes whose memory is not yet filled contribute nothing. Train as
    ``L = CosFace + USS`` after a CosFace-only epoch that fills the memory, and call
    ``update_memory(embeddings.detach(), labels)`` after each optimiser step.

    Where b settles (all else fixed, ``dL/db = 0``)::

        E[sigma(s*(t + m - cos_pos))] = lambda * agg_{c != y} E[sigma(s*(cos_neg,c - t))]

    a soft false-reject rate at ``t + m`` against a soft false-accept rate at ``t``.

    - ``negatives="sum"`` (default, the paper's form; with ``negative_weight=1`` the
      behaviour is exactly the paper's): ``agg`` sums over the C-1 other classes, so the
      per-class false-accept rate is driven to about 1/(C-1), an identification
      criterion that gets stricter with more training classes
      (``shared/notes/uss-threshold.md``).
    - ``negatives="mean"`` (verification variant): the negative term is averaged over
      the other classes present in memory, so the right side is ``lambda`` times a soft
      *per-pair* false-accept rate: b balances a soft FRR at ``t + m`` with ``lambda``
      times a soft FAR at ``t``, independent of the number of classes. ``lambda``
      (``negative_weight``) moves the operating point toward a target false-accept
      rate: ``lambda > 1`` makes t stricter (lower FAR, higher FRR), ``lambda < 1``
      looser. ``mean`` with ``lambda = C - 1`` equals ``sum`` when every class is in
      memory. Choose ``lambda`` on training identities only (``facegate calibrate
      --target-far``, ``train.calibrate.negative_weight_for_far``).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        s: float = 64.0,
        m: float = 0.1,
        negatives: str = "sum",
        negative_weight: float = 1.0,
    ) -> None:
        super().__init__(
            num_classes, embedding_size, s, m, bias_shape=(),
            negatives=negatives, negative_weight=negative_weight,
        )

    @property
    def threshold(self) -> float:
        """Unified cosine threshold ``t = b / s``."""
        return float(self.bias.detach()) / self.s


class S2SBCELoss(_BinaryS2SLoss):
    """Sample-to-sample BCE (UniTSFace ablation): the USS form with one bias per class.

    ``bias`` is (C,); all entries start from USS's shared initial value.
    """

    def __init__(
        self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.1
    ) -> None:
        super().__init__(num_classes, embedding_size, s, m, bias_shape=(num_classes,))

    @property
    def thresholds(self) -> torch.Tensor:
        """Per-class thresholds ``b_c / s`` (C,)."""
        return self.bias.detach() / self.s


class S2SSoftmaxLoss(FeatureMemory):
    """Sample-to-sample softmax (UniTSFace ablation): cross-entropy over the filled memory
    classes with logits ``s * (cos_ic - m * [c = y_i])``. Samples whose own class is not
    yet in memory are skipped; with none left the loss is a graph-connected zero."""

    def __init__(
        self, num_classes: int, embedding_size: int, s: float = 64.0, m: float = 0.1
    ) -> None:
        super().__init__(num_classes, embedding_size)
        self.s, self.m = float(s), float(m)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, positives, negatives = self.memory_cosine(embeddings, labels)
        active = positives.any(dim=1)
        if not bool(active.any()):
            return embeddings.sum() * 0.0
        logits = self.s * (cos - self.m * positives.to(cos.dtype))
        logits = logits.masked_fill(~(positives | negatives), float("-inf"))
        return F.cross_entropy(logits[active], labels.long().view(-1)[active])


# ---------------------------------------------------------------- regularisers


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

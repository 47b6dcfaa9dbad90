"""Sample-to-sample losses against a per-class memory (UniTSFace): USS and its ablations.

``USSLoss`` learns one bias b, the unified threshold ``t = b / s`` the server uses;
``S2SSoftmaxLoss`` and ``S2SBCELoss`` are the paper's baselines (``loss.uss.variant``).
The memory is written by the trainer after each step, never by the loss. Formulas:
``shared/notes/losses-and-metrics.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
      --target-far``, ``train.uss_threshold.negative_weight_for_far``).
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

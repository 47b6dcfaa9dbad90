"""The module a run trains: the backbone plus every loss module, and how their terms add up.

Loss = sample-to-class head (times ``loss.head_weight``)
     + sample-to-sample term on the per-class memory (times ``loss.uss.weight``; from
       ``loss.uss.start_epoch``, while the memory is written after every step from epoch 0)
     + DiscFace (on the head's class weights) + TCM + similarity distillation.
The modules come from the registry (``train.losses``); one ``nn.Module`` holds them all so
DDP averages the heads' gradients too.
"""

from __future__ import annotations

import numpy as np
import torch
from facegate.core.errors import BundleError
from facegate.train.backbones import get_backbone
from facegate.train.checkpoint import load_checkpoint
from facegate.train.config import Config, ConfigError
from facegate.train.embed import embed_torch
from facegate.train.losses import USSLoss, build_loss_modules
from torch import nn


class TrainModel(nn.Module):
    """Backbone plus the enabled loss modules, registered as ``head``, ``uss``, ``discface``,
    ``tcm``, ``distill`` (the names of the checkpoint's ``heads`` and of the logged terms)."""

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__()
        d = cfg.model.embedding_size
        self.backbone = get_backbone(cfg.model.backbone, d, width=cfg.model.width)
        init_backbone(self.backbone, cfg.model.init)
        modules = build_loss_modules(cfg.loss, num_classes, d)
        self.head = modules["head"]
        self.uss = modules.get("uss")
        self.discface = modules.get("discface")
        self.tcm = modules.get("tcm")
        self.distill = modules.get("distill")
        self.head_weight = cfg.loss.head_weight
        self.uss_weight = cfg.loss.uss.weight

    def heads(self) -> dict[str, nn.Module]:
        names = ("head", "uss", "discface", "tcm", "distill")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None,
        uss_active: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embeddings = self.backbone(images).float()
        terms = {"loss_head": self.head_weight * self.head(embeddings, labels)}
        if self.uss is not None and uss_active:
            terms["loss_uss"] = self.uss_weight * self.uss(embeddings, labels)
        if self.discface is not None:
            terms["loss_discface"] = self.discface(embeddings, labels, self.head.weight)
        if self.tcm is not None:
            terms["loss_tcm"] = self.tcm(embeddings, labels)
        if self.distill is not None:
            assert teacher is not None
            terms["loss_distill"] = self.distill(embeddings, teacher)
        return embeddings, terms


def unified_threshold(model: TrainModel) -> float | None:
    """USS's learned t = b / s once its bias was initialised; None for other losses."""
    uss = model.uss
    if isinstance(uss, USSLoss) and bool(uss.bias_initialised):
        return uss.threshold
    return None


def init_backbone(backbone: nn.Module, init: str | None) -> None:
    """Load pretrained weights into a fresh backbone: dlib's ResNet port, or a checkpoint's."""
    if init is None:
        return
    try:
        backbone.load_state_dict(load_checkpoint(init)["state_dict"])
    except (BundleError, RuntimeError) as err:
        raise ConfigError(f"model.init {init}: not a checkpoint of this backbone ({err})") from err


def init_head_from_class_means(model: TrainModel, images: np.ndarray, labels: np.ndarray,
                               device: torch.device) -> None:
    """Start a pretrained backbone's class weights at its own class-mean embeddings.

    A random head gives a pretrained network large, meaningless gradients in the first
    steps (measured: 200-identity fine-tuning of dlib's ResNet collapsed to 51% held-out
    accuracy in one epoch); class means start the margin loss near its optimum instead.
    """
    head = getattr(model.head, "weight", None)
    if head is None:
        return
    emb = embed_torch(model.backbone, images, device=device, flip=False)
    means = np.stack([emb[labels == c].mean(axis=0) for c in range(head.shape[0])])
    with torch.no_grad():
        head.copy_(torch.from_numpy(means).to(head.dtype))

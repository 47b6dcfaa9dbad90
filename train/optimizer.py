"""The optimiser and its learning-rate schedule: parameter groups by name prefix, warm-up,
then cosine, poly or step decay."""

from __future__ import annotations

import math

import torch
from facegate.train.config import OptimConfig
from torch import nn


def learning_rate(step: int, *, steps_per_epoch: int, total_steps: int, optim: OptimConfig) -> float:
    """Learning rate at a global step: linear warm-up, then poly (power 2), step or cosine."""
    warmup = optim.warmup_epochs * steps_per_epoch
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1.0, total_steps - warmup))
    if optim.schedule == "poly":
        return optim.lr * (1.0 - progress) ** 2
    if optim.schedule == "cosine":
        return optim.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = step / steps_per_epoch
    return optim.lr * 0.1 ** sum(epoch >= m for m in optim.milestones)


def lr_multiplier(name: str, lr_mult: dict[str, float]) -> float:
    """The multiplier of the longest prefix of ``name`` in ``lr_mult`` (1 when none matches)."""
    matches = [prefix for prefix in lr_mult if name.startswith(prefix)]
    return lr_mult[max(matches, key=len)] if matches else 1.0


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and conv kernels only (not on BN, biases, b or xi).

    One group per (lr multiplier, decay); parameters with multiplier 0 are frozen
    (``requires_grad`` off, left out of the optimizer), so fine-tuning can train the top
    of a pretrained network only.
    """
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        mult = lr_multiplier(name, optim.lr_mult)
        if mult == 0:
            p.requires_grad_(False)
            continue
        grouped.setdefault((mult, p.ndim > 1), []).append(p)
    groups = [{"params": params, "lr_mult": mult,
               "weight_decay": optim.weight_decay if decay else 0.0}
              for (mult, decay), params in sorted(grouped.items())]
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    return torch.optim.AdamW(groups, lr=optim.lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the schedule's rate to every group, times the group's multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]

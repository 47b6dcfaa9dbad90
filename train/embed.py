"""Torch embedder: a backbone's embeddings of uint8 crops, for training, evaluation and export.

Crops go through ``facegate.core.preprocess`` with the backbone's ``input_spec``, the
same code ONNX Runtime and TensorRT feed the exported model with, so a checkpoint
evaluated here and its bundle served later see identical inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from facegate.core.preprocess import check_crops, embed_with_flip, model_input
from facegate.train.backbones import input_spec_of
from torch import nn
from tqdm import tqdm


@torch.inference_mode()
def raw_embeddings(backbone: nn.Module, crops: np.ndarray, device: Any = "cpu") -> np.ndarray:
    """Un-normalised float32 outputs (N, D) of ``backbone`` as it is (train or eval mode)."""
    x = torch.from_numpy(model_input(np.asarray(crops), input_spec_of(backbone))).to(device)
    return backbone(x).float().cpu().numpy()


def embed_torch(
    backbone: nn.Module,
    images: np.ndarray,
    *,
    device: Any = "cpu",
    batch_size: int = 128,
    flip: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """L2-normalised embeddings (N, D) float32 of uint8 RGB crops, in eval mode.

    With ``flip`` the raw outputs of each crop and its mirror are summed before
    normalising, as the runtimes do (``embed_with_flip``).
    """
    check_crops(images, tuple(input_spec_of(backbone)["size"]))
    was_training = backbone.training
    backbone.eval()
    chunks = [
        embed_with_flip(
            lambda crops: raw_embeddings(backbone, crops, device),
            images[start : start + batch_size],
            flip,
        )
        for start in tqdm(range(0, len(images), batch_size), desc="embed", disable=not progress)
    ]
    backbone.train(was_training)
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(chunks)

"""A training checkpoint's backbone: read the file, rebuild the network with its weights.

One loader for everything that starts from a checkpoint: export (``facegate export
onnx``), evaluation of a ``.pt`` and ``model.init`` in training. The format is the
trainer's (``docs/interfaces.md``); ``dlib`` stands for dlib's pretrained ResNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from facegate.core.bundle import sha256_file
from facegate.core.detect import dlib_model_file
from facegate.core.errors import BundleError
from facegate.train.backbones import DLIB_MODEL_FILE, dlib_resnet, get_backbone

PRETRAINED_DLIB = "dlib"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint loaded on CPU; ``BundleError`` when it cannot be read or lacks
    the backbone, its weights or its embedding size.

    ``dlib`` stands for dlib's pretrained face-recognition ResNet (CC0, from the
    face_recognition_models package) as it is: a checkpoint without a threshold, so its
    export takes ``--threshold`` and ``facegate calibrate`` then learns one.
    """
    if str(path) == PRETRAINED_DLIB:
        model_file = dlib_model_file(DLIB_MODEL_FILE)
        return {"backbone": {"name": "dlib_resnet", "kwargs": {"embedding_size": 128}},
                "state_dict": dlib_resnet(pretrained=True).state_dict(), "embedding_size": 128,
                "threshold": None, "source": f"{model_file.name} (dlib-models, CC0 1.0)",
                "source_sha256": sha256_file(model_file)}
    try:
        checkpoint = torch.load(Path(path), map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as exc:
        raise BundleError(f"cannot read checkpoint {path}: {exc}") from exc
    missing = {"backbone", "state_dict", "embedding_size"} - set(checkpoint)
    if missing:
        raise BundleError(f"checkpoint {path} lacks {sorted(missing)}")
    return checkpoint


def build_backbone(checkpoint: dict[str, Any]) -> torch.nn.Module:
    """The checkpoint's backbone with its weights, in eval mode."""
    spec = checkpoint["backbone"]
    kwargs = {k: v for k, v in dict(spec.get("kwargs") or {}).items() if k != "embedding_size"}
    model = get_backbone(spec["name"], embedding_size=int(checkpoint["embedding_size"]), **kwargs)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()

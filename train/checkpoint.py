"""Training checkpoints: written atomically by the trainer, restored by ``--resume``, and read
back as a backbone with its weights.

One loader for everything that starts from a checkpoint: export (``facegate export
onnx``), evaluation of a ``.pt`` and ``model.init`` in training. The format is
``training_checkpoint``'s (``docs/interfaces.md``); ``dlib`` stands for dlib's pretrained
ResNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from facegate.core.bundle import sha256_file
from facegate.core.detect import dlib_model_file
from facegate.core.errors import BundleError
from facegate.train.backbones import DLIB_MODEL_FILE, dlib_resnet, get_backbone

if TYPE_CHECKING:
    from facegate.train.config import Config
    from facegate.train.trainer import RunState

PRETRAINED_DLIB = "dlib"
CHECKPOINT = "checkpoint_last.pt"  # a run folder's checkpoint, rewritten every epoch


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


def training_checkpoint(cfg: Config, state: RunState, classes: list[str], rng: list[dict[str, Any]],
                        threshold: float | None, threshold_source: str) -> dict[str, Any]:
    """Everything ``--resume`` needs to continue exactly, and what export and evaluation read:
    the backbone and its weights, every loss module's state, the optimiser, the position in
    the run, each rank's RNG state and the model threshold."""
    model = state.model
    return {
        "backbone": {"name": cfg.model.backbone,
                     "kwargs": {"embedding_size": cfg.model.embedding_size,
                                "width": cfg.model.width}},
        "state_dict": model.backbone.state_dict(),
        "heads": {n: m.state_dict() for n, m in model.heads().items()},
        "optimizer": state.optimizer.state_dict(), "scaler": state.scaler.state_dict(),
        "epoch": state.epoch, "batches_done": state.batches_done, "step": state.step,
        "steps_per_epoch": state.steps_per_epoch, "config": cfg.to_dict(),
        "threshold": threshold, "threshold_source": threshold_source,
        "embedding_size": cfg.model.embedding_size, "classes": classes,
        "rng": rng,
    }


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write through a temporary name, so a crash leaves the previous checkpoint whole."""
    partial = path.with_name(f".{path.name}.partial")
    torch.save(payload, partial)
    partial.replace(path)


def restore_training(path: Path, state: RunState, device: torch.device) -> list[dict[str, Any]]:
    """Load a run's checkpoint into ``state`` (modules, optimiser, scaler, position; a finished
    epoch moves the position to the next one) and return the ranks' RNG states, which the
    caller restores once the resumed epoch's loader exists (creating it draws a seed)."""
    ckpt = torch.load(path, map_location=device, weights_only=False)
    state.model.backbone.load_state_dict(ckpt["state_dict"])
    for name, module in state.model.heads().items():
        module.load_state_dict(ckpt["heads"][name])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.batches_done, state.step = ckpt["epoch"], ckpt["batches_done"], ckpt["step"]
    if state.batches_done >= state.steps_per_epoch:
        state.epoch, state.batches_done = state.epoch + 1, 0
    return ckpt["rng"]

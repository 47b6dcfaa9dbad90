"""``facegate train CONFIG``: train a face-embedding backbone, one script for CPU and DDP.

Run directly for one CPU (or one GPU) process, or under ``torchrun`` for DDP on 1..N
GPUs (``WORLD_SIZE`` set: NCCL on CUDA, gloo on CPU). Every crop is held in memory
as uint8; batches are P identities x K crops so pair-based terms see positives.

Loss = sample-to-class head (CosFace / ArcFace / softmax)
     + USS on the per-class memory (from ``loss.uss.start_epoch``; the memory is
       written after every step, also before USS is switched on)
     + DiscFace (on the head's class weights) + TCM + similarity distillation.

The run folder gets ``config.yaml``, ``log.jsonl`` (one record per logging step,
epoch and validation), ``checkpoint_last.pt`` (every epoch; ``--resume`` continues
from it exactly, mid-epoch included), ``split.json``, ``summary.json`` and PNG
plots. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from facegate.core import metrics
from facegate.core.align import Geometry, as_geometry
from facegate.core.errors import BundleError
from facegate.core.face import read_geometry_file
from facegate.train import data as train_data
from facegate.train import losses
from facegate.train.backbones import geometry_of, get_backbone, input_spec_of
from facegate.train.checkpoint import load_checkpoint
from facegate.train.config import Config, ConfigError, OptimConfig, load_config
from facegate.train.embed import embed_torch
from facegate.train.teacher import load_teacher
from facegate.train.verification import verification_metrics
from torch import nn
from tqdm import tqdm

CHECKPOINT = "checkpoint_last.pt"
# Calibration embeds at most this many training crops (seeded sample): enough pairs
# for a stable best-accuracy threshold at the end, and a cheaper estimate for the
# per-epoch validation (on CPU, embedding 4000 crops costs over half an epoch).
CALIBRATION_MAX_CROPS = 4000
VALIDATION_CALIBRATION_CROPS = 1000
VALIDATION_FARS = (1e-2, 1e-3)


# ---------------------------------------------------------------- process setup


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def setup_runtime() -> Runtime:
    """Join the process group when launched by torchrun; pick this rank's device.

    CPU threads: all cores, shared evenly by the ranks of this machine.
    """
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Runtime(rank=rank, world_size=world_size, device=device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- schedule


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


# ---------------------------------------------------------------- model


class TrainModel(nn.Module):
    """Backbone plus every loss module, so DDP syncs the heads' gradients too."""

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__()
        d = cfg.model.embedding_size
        loss = cfg.loss
        self.backbone = get_backbone(cfg.model.backbone, d, width=cfg.model.width)
        init_backbone(self.backbone, cfg.model.init)
        if loss.head == "cosface":
            self.head = losses.CosFace(num_classes, d, s=loss.s, margin=loss.margin)
        elif loss.head == "arcface":
            self.head = losses.ArcFace(num_classes, d, s=loss.s, margin=loss.margin)
        else:
            self.head = losses.NormSoftmax(num_classes, d, s=loss.s)
        uss_classes = {"uss": losses.USSLoss, "s2s_softmax": losses.S2SSoftmaxLoss,
                       "s2s_bce": losses.S2SBCELoss}
        uss_options = ({"negatives": loss.uss.negatives, "negative_weight": loss.uss.negative_weight}
                       if loss.uss.variant == "uss" else {})
        self.uss = (uss_classes[loss.uss.variant](num_classes, d, s=loss.uss.s, m=loss.uss.m,
                                                  **uss_options)
                    if loss.uss.enabled else None)
        self.uss_weight = loss.uss.weight
        self.head_weight = loss.head_weight
        self.discface = (losses.DiscFaceRegularizer(d, weight=loss.discface.weight,
                                                    clip=loss.discface.clip)
                         if loss.discface.enabled else None)
        t = loss.tcm
        self.tcm = (losses.TCMRegularizer(t.pos_margin, t.neg_margin, t.pos_weight, t.neg_weight)
                    if t.enabled else None)
        self.distill = (losses.SimilarityDistillation(weight=loss.distill.weight,
                                                     direct=loss.distill.direct)
                        if loss.distill.enabled else None)

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
    if isinstance(uss, losses.USSLoss) and bool(uss.bias_initialised):
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


def init_head_from_class_means(model: TrainModel, split: Split, device: torch.device) -> None:
    """Start a pretrained backbone's class weights at its own class-mean embeddings.

    A random head gives a pretrained network large, meaningless gradients in the first
    steps (measured: 200-identity fine-tuning of dlib's ResNet collapsed to 51% held-out
    accuracy in one epoch); class means start the margin loss near its optimum instead.
    """
    head = getattr(model.head, "weight", None)
    if head is None:
        return
    emb = embed_torch(model.backbone, split.train_images, device=device, flip=False)
    labels = split.train.labels
    means = np.stack([emb[labels == c].mean(axis=0) for c in range(head.shape[0])])
    with torch.no_grad():
        head.copy_(torch.from_numpy(means).to(head.dtype))


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


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 (or fp16 where bf16 is unsupported) on GPU when enabled; never on CPU."""
    if device.type != "cuda" or cfg.train.amp == "off":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------- data


@dataclass
class Split:
    """Crops of the training identities (labels 0..C-1) and of the held-out ones."""

    train: train_data.CropFolder
    train_images: np.ndarray
    test: train_data.CropFolder | None
    test_images: np.ndarray | None


def prepare_command(cfg: Config, geometry: Geometry) -> str:
    """The ``facegate prepare`` call that makes ``data.root`` as ``cfg`` needs it, for errors
    that find the data missing or made for another model."""
    flags = f"--geometry {geometry.method} --size {geometry.size}"
    if geometry.padding is not None:
        flags += f" --padding {geometry.padding}"
    if cfg.data.teacher is not None:
        flags += " --teacher dlib"
    return (f"`facegate prepare PHOTOS {cfg.data.root} {flags}` (PHOTOS: identity folders or an "
            "identities.csv, e.g. ../shared/data/celeba-subset/identities.csv)")


def load_split(cfg: Config, progress: bool) -> Split:
    """Split identities (seeded) and load both sides' crops into memory as uint8."""
    if not Path(cfg.data.root).is_dir():
        backbone = get_backbone(cfg.model.backbone, cfg.model.embedding_size, width=cfg.model.width)
        geometry = as_geometry(geometry_of(backbone))
        raise ConfigError(f"data.root {cfg.data.root} does not exist: make it with "
                          f"{prepare_command(cfg, geometry)}")
    try:
        everything = train_data.CropFolder(cfg.data.root)
        train_ids, test_ids = train_data.split_identities(
            everything.identities, cfg.data.holdout, cfg.data.split_seed
        )
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err
    train = train_data.CropFolder(cfg.data.root, train_ids)
    test = train_data.CropFolder(cfg.data.root, test_ids) if test_ids else None
    return Split(
        train=train,
        train_images=train.load(progress=progress),
        test=test,
        test_images=test.load(progress=progress) if test is not None else None,
    )


def check_geometry(cfg: Config, backbone: nn.Module, crop_side: int) -> None:
    """Refuse crops made for another model: the geometry ``facegate prepare`` recorded
    (geometry.json) or, for folders from before it, the crop size, must be the backbone's."""
    expected = as_geometry(geometry_of(backbone))
    recorded = read_geometry_file(Path(cfg.data.root))
    if recorded is not None and recorded != expected:
        raise ConfigError(f"data: {cfg.data.root} holds {recorded} crops, {cfg.model.backbone} "
                          f"takes {expected}: prepare the photos with that geometry, "
                          f"{prepare_command(cfg, expected)}")
    if crop_side != expected.size:
        raise ConfigError(f"data: {cfg.data.root} holds {crop_side}x{crop_side} crops, "
                          f"{cfg.model.backbone} takes {expected}")


# ---------------------------------------------------------------- run folder


class RunLog:
    """Append-only JSONL log (rank 0 only); also kept in memory for the plots."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.records: list[dict[str, Any]] = []
        if enabled and path.is_file():
            self.records = [json.loads(line) for line in path.read_text().splitlines() if line]

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past a resumed checkpoint's step, so the log has no duplicate steps."""
        if not self.enabled:
            return
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    torch.save(payload, partial)
    partial.replace(path)


# ---------------------------------------------------------------- training


def train(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a run in ``out``; return its summary (rank 0's view)."""
    rt = setup_runtime()
    out = Path(out)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + rt.rank)
    started = time.perf_counter()

    split = load_split(cfg, progress=progress and rt.main)
    num_classes = len(split.train.identities)
    if num_classes < cfg.train.p:
        raise ConfigError(f"train.p={cfg.train.p} but only {num_classes} training identities")
    teacher = (load_teacher(cfg.data.teacher, split.train.relative_paths)
               if cfg.loss.distill.enabled and cfg.data.teacher else None)
    model = TrainModel(cfg, num_classes).to(rt.device)
    check_geometry(cfg, model.backbone, split.train_images.shape[1])
    if cfg.model.init is not None and not resume:
        init_head_from_class_means(model, split, rt.device)
    aug = cfg.augment
    dataset = train_data.CropDataset(
        split.train_images, split.train.labels, teacher,
        augment=aug.flip or aug.min_scale < 1 or aug.color > 0,
        flip=aug.flip, min_scale=aug.min_scale, jitter=aug.color,
        input_spec=input_spec_of(model.backbone),
    )
    sampler = train_data.PKSampler(split.train.labels, p=cfg.train.p, k=cfg.train.k,
                                   seed=cfg.seed, rank=rt.rank, world_size=rt.world_size)
    steps_per_epoch = len(sampler)
    total_steps = cfg.train.epochs * steps_per_epoch

    optimizer = build_optimizer(model, cfg.optim)
    dtype = amp_dtype(cfg, rt.device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    epoch, batches_done, step = 0, 0, 0
    resume_rng: dict[str, Any] | None = None
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=rt.device, weights_only=False)
        model.backbone.load_state_dict(ckpt["state_dict"])
        for name, module in model.heads().items():
            module.load_state_dict(ckpt["heads"][name])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        epoch, batches_done, step = ckpt["epoch"], ckpt["batches_done"], ckpt["step"]
        if batches_done >= steps_per_epoch:
            epoch, batches_done = epoch + 1, 0
        # Restored once the resumed epoch's loader iterator exists: creating it draws a seed.
        resume_rng = ckpt["rng"][min(rt.rank, len(ckpt["rng"]) - 1)]
    elif resume and rt.main:
        print(f"no {ckpt_path} to resume from; starting afresh")

    log = RunLog(out / "log.jsonl", enabled=rt.main)
    if rt.main:
        log.truncate_after(step)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (out / "split.json").write_text(json.dumps(
            {"holdout": cfg.data.holdout, "split_seed": cfg.data.split_seed,
             "train": split.train.identities,
             "test": split.test.identities if split.test is not None else []}, indent=1) + "\n")

    ddp_model: nn.Module = model
    if rt.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=cfg.loss.uss.enabled, broadcast_buffers=False)

    def checkpoint_payload(threshold: float | None, source: str) -> dict[str, Any]:
        rng = [rng_state()]
        if rt.distributed:
            gathered: list[Any] = [None] * rt.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        return {
            "backbone": {"name": cfg.model.backbone,
                         "kwargs": {"embedding_size": cfg.model.embedding_size,
                                    "width": cfg.model.width}},
            "state_dict": model.backbone.state_dict(),
            "heads": {n: m.state_dict() for n, m in model.heads().items()},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "batches_done": batches_done, "step": step,
            "steps_per_epoch": steps_per_epoch, "config": cfg.to_dict(),
            "threshold": threshold, "threshold_source": source,
            "embedding_size": cfg.model.embedding_size, "classes": split.train.identities,
            "rng": rng,
        }

    stop = False
    workers = min(8, os.cpu_count() or 1) if rt.device.type == "cuda" else 0
    while epoch < cfg.train.epochs and not stop:
        sampler.set_epoch(epoch)
        batches = list(sampler)[batches_done:]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                             pin_memory=rt.device.type == "cuda")
        uss_active = epoch >= cfg.loss.uss.start_epoch
        sums: dict[str, float] = {}
        epoch_start, seen = time.perf_counter(), 0
        bar = tqdm(total=steps_per_epoch, initial=batches_done, desc=f"epoch {epoch}",
                   disable=not (progress and rt.main), unit="batch")
        tick = time.perf_counter()
        iterator = iter(loader)
        if resume_rng is not None:
            set_rng_state(resume_rng)
            resume_rng = None
        for batch in iterator:
            images = batch[0].to(rt.device, non_blocking=True)
            labels = batch[1].to(rt.device, non_blocking=True)
            t_batch = batch[2].to(rt.device, non_blocking=True) if teacher is not None else None
            lr = learning_rate(step, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                               optim=cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            autocast = (torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext())
            with autocast:
                embeddings, terms = ddp_model(images, labels, t_batch, uss_active)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if model.uss is not None:
                update_memory(model.uss, embeddings.detach(), labels, rt)
            step += 1
            batches_done += 1
            seen += len(labels) * rt.world_size
            values = {"loss": float(loss.detach())}
            values.update({k: float(v.detach()) for k, v in terms.items()})
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update()
            if step % cfg.train.log_every == 0 or batches_done == steps_per_epoch:
                now = time.perf_counter()
                rate = cfg.train.log_every * len(labels) * rt.world_size / max(now - tick, 1e-9)
                tick = now
                log.write({"kind": "step", "epoch": epoch, "step": step, "lr": lr, **values,
                           "threshold": unified_threshold(model), "imgs_per_s": round(rate, 1)})
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.3g}")
            if max_steps is not None and step >= max_steps:
                stop = True
                break
        bar.close()
        elapsed = time.perf_counter() - epoch_start
        count = max(1, seen // (cfg.train.p * cfg.train.k * rt.world_size))
        epoch_done = batches_done >= steps_per_epoch
        if epoch_done:
            log.write({"kind": "epoch", "epoch": epoch, "step": step,
                       **{k: v / count for k, v in sums.items()},
                       "threshold": unified_threshold(model), "seconds": round(elapsed, 2),
                       "imgs_per_s": round(seen / max(elapsed, 1e-9), 1)})
            if rt.main and split.test is not None and (
                (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
            ):
                log.write({"kind": "val", "epoch": epoch, "step": step,
                           **validate(model, split, cfg, rt.device)})
        threshold = unified_threshold(model)
        payload = checkpoint_payload(threshold, "uss" if threshold is not None else "none")
        if rt.main:
            save_checkpoint(ckpt_path, payload)
        if epoch_done:
            epoch, batches_done = epoch + 1, 0

    summary = finalize(model, split, cfg, out, log, rt, checkpoint_payload, started)
    if rt.distributed:
        dist.barrier()
    return summary


def update_memory(memory: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor,
                  rt: Runtime) -> None:
    """Write the (all ranks') batch embeddings into the USS memory, identically on every rank."""
    if rt.distributed:
        emb = [torch.empty_like(embeddings) for _ in range(rt.world_size)]
        lab = [torch.empty_like(labels) for _ in range(rt.world_size)]
        dist.all_gather(emb, embeddings.contiguous())
        dist.all_gather(lab, labels.contiguous())
        embeddings, labels = torch.cat(emb), torch.cat(lab)
    memory.update_memory(embeddings, labels)  # type: ignore[operator]


def validate(model: TrainModel, split: Split, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Verification on the held-out identities at the current threshold."""
    t = unified_threshold(model)
    if t is None:
        t = calibrate_threshold(model, split, cfg, device, VALIDATION_CALIBRATION_CROPS)
    assert split.test is not None and split.test_images is not None
    emb = embed_torch(model.backbone, split.test_images, device=device)
    first, second, same = metrics.verification_pairs(split.test.labels, seed=cfg.data.split_seed)
    result = verification_metrics(
        metrics.pair_cosines(emb, first, second), same, t, fars=VALIDATION_FARS
    )
    return {k: v for k, v in result.items() if not k.startswith("threshold@")}


def calibrate_threshold(model: TrainModel, split: Split, cfg: Config, device: torch.device,
                        max_crops: int = CALIBRATION_MAX_CROPS) -> float:
    """Accuracy-maximising threshold on pairs of TRAINING identities (never test ones)."""
    idx = np.arange(len(split.train))
    if idx.size > max_crops:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(idx, max_crops, replace=False))
    emb = embed_torch(model.backbone, split.train_images[idx], device=device)
    first, second, same = metrics.verification_pairs(split.train.labels[idx], seed=cfg.seed)
    return metrics.best_accuracy_threshold(metrics.pair_cosines(emb, first, second), same)


def finalize(model: TrainModel, split: Split, cfg: Config, out: Path, log: RunLog, rt: Runtime,
             checkpoint_payload: Any, started: float) -> dict[str, Any]:
    """Fix the threshold, rewrite the checkpoint with it, write summary.json and plots."""
    threshold = unified_threshold(model)
    source = "uss"
    if threshold is None and rt.main:
        threshold, source = calibrate_threshold(model, split, cfg, rt.device), "calibrated-train-pairs"
    payload = checkpoint_payload(threshold, source)
    if not rt.main:
        return {}
    save_checkpoint(out / CHECKPOINT, payload)
    from facegate.train.plots import plot_training

    plots = plot_training(log.records, out)
    vals = [r for r in log.records if r.get("kind") == "val"]
    speeds = [r for r in log.records if r.get("kind") in ("epoch", "step")]
    summary = {
        "name": cfg.name, "epochs": cfg.train.epochs, "epoch": payload["epoch"],
        "step": payload["step"], "steps_per_epoch": payload["steps_per_epoch"],
        "threshold": threshold, "threshold_source": source,
        "train_identities": len(split.train.identities), "train_crops": len(split.train),
        "test_identities": len(split.test.identities) if split.test is not None else 0,
        "test_crops": len(split.test) if split.test is not None else 0,
        "world_size": rt.world_size, "device": str(rt.device),
        "imgs_per_s": speeds[-1]["imgs_per_s"] if speeds else None,
        "validation": vals[-1] if vals else None,
        "seconds": round(time.perf_counter() - started, 1),
        "checkpoint": str(out / CHECKPOINT), "plots": [p.name for p in plots],
        "config": cfg.to_dict(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML config (see configs/)")
    parser.add_argument("--out", type=Path, help="run folder (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pt")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in all")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / cfg.name
    summary = train(cfg, out, resume=args.resume, max_steps=args.max_steps, progress=not args.quiet)
    if summary:
        val = summary["validation"] or {}
        print(f"{cfg.name}: step {summary['step']}, threshold {summary['threshold']:.4f} "
              f"({summary['threshold_source']}), val accuracy {val.get('accuracy', float('nan')):.4f}, "
              f"{summary['imgs_per_s']} imgs/s -> {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0

"""``facegate train CONFIG``: train a face-embedding backbone, one script for CPU and DDP.

Run directly for one CPU (or one GPU) process, or under ``torchrun`` for DDP on 1..N
GPUs (``train.runtime``). Every crop is held in memory as uint8 (``train.split``: a crop
folder or a RecordIO pack); batches are P identities x K crops so pair-based terms see
positives. The loss terms are composed in ``train.model`` from the registry
(``train.losses``).

This module is the loop: an explicit ``RunState`` (modules, optimiser, position) that the
steps advance, the checkpoint records (``train.checkpoint``) and ``--resume`` restores
exactly, mid-epoch included; validation on held-out identities; the final threshold. The
run folder gets ``config.yaml``, ``log.jsonl``, ``checkpoint_last.pt``, ``split.json``,
``summary.json`` and PNG plots. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from facegate.core import metrics
from facegate.train import data as train_data
from facegate.train.backbones import input_spec_of
from facegate.train.checkpoint import (
    CHECKPOINT,
    restore_training,
    save_checkpoint,
    training_checkpoint,
)
from facegate.train.config import Config, ConfigError, load_config
from facegate.train.embed import embed_torch
from facegate.train.model import (
    TrainModel,
    init_head_from_class_means,
    unified_threshold,
)
from facegate.train.optimizer import build_optimizer, learning_rate, set_learning_rate
from facegate.train.run_folder import RunLog, write_run_start
from facegate.train.runtime import (
    Runtime,
    amp_dtype,
    gather_batch,
    rng_states,
    seed_everything,
    set_rng_state,
    setup_runtime,
)
from facegate.train.split import Split, check_geometry, load_split
from facegate.train.teacher import load_teacher
from facegate.train.verification import verification_metrics
from torch import nn
from tqdm import tqdm

__all__ = ["CHECKPOINT", "RunState", "train"]

# Calibration embeds at most this many training crops (seeded sample): enough pairs
# for a stable best-accuracy threshold at the end, and a cheaper estimate for the
# per-epoch validation (on CPU, embedding 4000 crops costs over half an epoch).
CALIBRATION_MAX_CROPS = 4000
VALIDATION_CALIBRATION_CROPS = 1000
VALIDATION_FARS = (1e-2, 1e-3)


@dataclass
class RunState:
    """What the steps advance and the checkpoint records: the trained modules, the optimiser
    and the position in the run (``batches_done`` counts within ``epoch``; ``step`` is the
    number of optimiser steps in all)."""

    model: TrainModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    epoch: int = 0
    batches_done: int = 0
    step: int = 0

    @property
    def epoch_done(self) -> bool:
        return self.batches_done >= self.steps_per_epoch


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
    dtype = amp_dtype(cfg.train.amp, rt.device)  # before loading data: train.amp on may refuse
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
    check_geometry(cfg, model.backbone, split.train.images.shape[1])
    if cfg.model.init is not None and not resume:
        init_head_from_class_means(model, split.train.images, split.train.labels, rt.device)
    aug = cfg.augment
    dataset = train_data.CropDataset(
        split.train.images, split.train.labels, teacher,
        augment=aug.flip or aug.min_scale < 1 or aug.color > 0,
        flip=aug.flip, min_scale=aug.min_scale, jitter=aug.color,
        input_spec=input_spec_of(model.backbone),
    )
    sampler = train_data.PKSampler(split.train.labels, p=cfg.train.p, k=cfg.train.k,
                                   seed=cfg.seed, rank=rt.rank, world_size=rt.world_size)
    state = RunState(model=model, optimizer=build_optimizer(model, cfg.optim),
                     scaler=torch.amp.GradScaler("cuda", enabled=dtype == torch.float16),
                     steps_per_epoch=len(sampler))

    resume_rng: dict[str, Any] | None = None
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.is_file():
        saved = restore_training(ckpt_path, state, rt.device)
        resume_rng = saved[min(rt.rank, len(saved) - 1)]
    elif resume and rt.main:
        print(f"no {ckpt_path} to resume from; starting afresh")

    log = RunLog(out / "log.jsonl", enabled=rt.main)
    if rt.main:
        log.truncate_after(state.step)
        write_run_start(out, cfg, split)

    ddp_model: nn.Module = model
    if rt.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=cfg.loss.uss.enabled, broadcast_buffers=False)

    workers = min(8, os.cpu_count() or 1) if rt.device.type == "cuda" else 0
    stopped = False
    while state.epoch < cfg.train.epochs and not stopped:
        sampler.set_epoch(state.epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=list(sampler)[state.batches_done:], num_workers=workers,
            pin_memory=rt.device.type == "cuda")
        iterator = iter(loader)
        if resume_rng is not None:
            set_rng_state(resume_rng)
            resume_rng = None
        stopped = run_epoch(state, iterator, ddp_model, cfg, rt, log, dtype,
                            has_teacher=teacher is not None, max_steps=max_steps,
                            progress=progress)
        if state.epoch_done and rt.main and split.test is not None and (
            (state.epoch + 1) % cfg.train.eval_every == 0 or state.epoch + 1 == cfg.train.epochs
        ):
            log.write({"kind": "val", "epoch": state.epoch, "step": state.step,
                       **validate(model, split, cfg, rt.device)})
        threshold = unified_threshold(model)
        payload = training_checkpoint(cfg, state, split.train.identities, rng_states(rt),
                                      threshold, "uss" if threshold is not None else "none")
        if rt.main:
            save_checkpoint(ckpt_path, payload)
        if state.epoch_done:
            state.epoch, state.batches_done = state.epoch + 1, 0

    summary = finalize(state, split, cfg, out, log, rt, started)
    if rt.distributed:
        dist.barrier()
    return summary


def run_epoch(state: RunState, batches: Any, ddp_model: nn.Module, cfg: Config, rt: Runtime,
              log: RunLog, dtype: torch.dtype | None, *, has_teacher: bool,
              max_steps: int | None, progress: bool) -> bool:
    """Train on the rest of ``state.epoch``'s batches, logging steps and, once the epoch is
    complete, its means; True when ``max_steps`` stopped it early."""
    model = state.model
    total_steps = cfg.train.epochs * state.steps_per_epoch
    uss_active = state.epoch >= cfg.loss.uss.start_epoch
    sums: dict[str, float] = {}
    epoch_start, seen = time.perf_counter(), 0
    bar = tqdm(total=state.steps_per_epoch, initial=state.batches_done, unit="batch",
               desc=f"epoch {state.epoch}", disable=not (progress and rt.main))
    tick = time.perf_counter()
    stopped = False
    for batch in batches:
        images = batch[0].to(rt.device, non_blocking=True)
        labels = batch[1].to(rt.device, non_blocking=True)
        t_batch = batch[2].to(rt.device, non_blocking=True) if has_teacher else None
        lr = learning_rate(state.step, steps_per_epoch=state.steps_per_epoch,
                           total_steps=total_steps, optim=cfg.optim)
        set_learning_rate(state.optimizer, lr)
        autocast = torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()
        with autocast:
            embeddings, terms = ddp_model(images, labels, t_batch, uss_active)
        loss = sum(terms.values())
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        if model.uss is not None:
            # Every rank writes all ranks' embeddings, so the memories stay identical.
            model.uss.update_memory(*gather_batch(embeddings.detach(), labels, rt))
        state.step += 1
        state.batches_done += 1
        seen += len(labels) * rt.world_size
        values = {"loss": float(loss.detach())}
        values.update({k: float(v.detach()) for k, v in terms.items()})
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.update()
        if state.step % cfg.train.log_every == 0 or state.epoch_done:
            now = time.perf_counter()
            rate = cfg.train.log_every * len(labels) * rt.world_size / max(now - tick, 1e-9)
            tick = now
            log.write({"kind": "step", "epoch": state.epoch, "step": state.step, "lr": lr,
                       **values, "threshold": unified_threshold(model),
                       "imgs_per_s": round(rate, 1)})
            bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.3g}")
        if max_steps is not None and state.step >= max_steps:
            stopped = True
            break
    bar.close()
    if state.epoch_done:
        elapsed = time.perf_counter() - epoch_start
        count = max(1, seen // (cfg.train.p * cfg.train.k * rt.world_size))
        log.write({"kind": "epoch", "epoch": state.epoch, "step": state.step,
                   **{k: v / count for k, v in sums.items()},
                   "threshold": unified_threshold(model), "seconds": round(elapsed, 2),
                   "imgs_per_s": round(seen / max(elapsed, 1e-9), 1)})
    return stopped


def validate(model: TrainModel, split: Split, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Verification on the held-out identities at the current threshold."""
    t = unified_threshold(model)
    if t is None:
        t = calibrate_threshold(model, split, cfg, device, VALIDATION_CALIBRATION_CROPS)
    assert split.test is not None
    emb = embed_torch(model.backbone, split.test.images, device=device)
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
    emb = embed_torch(model.backbone, split.train.images[idx], device=device)
    first, second, same = metrics.verification_pairs(split.train.labels[idx], seed=cfg.seed)
    return metrics.best_accuracy_threshold(metrics.pair_cosines(emb, first, second), same)


def finalize(state: RunState, split: Split, cfg: Config, out: Path, log: RunLog, rt: Runtime,
             started: float) -> dict[str, Any]:
    """Fix the threshold, rewrite the checkpoint with it, write summary.json and plots."""
    threshold = unified_threshold(state.model)
    source = "uss"
    if threshold is None and rt.main:
        threshold = calibrate_threshold(state.model, split, cfg, rt.device)
        source = "calibrated-train-pairs"
    payload = training_checkpoint(cfg, state, split.train.identities, rng_states(rt),
                                  threshold, source)
    if not rt.main:
        return {}
    save_checkpoint(out / CHECKPOINT, payload)
    from facegate.train.plots import plot_training

    plots = plot_training(log.records, out)
    summary = {
        "name": cfg.name, "epochs": cfg.train.epochs, "epoch": state.epoch,
        "step": state.step, "steps_per_epoch": state.steps_per_epoch,
        "threshold": threshold, "threshold_source": source,
        "train_identities": len(split.train.identities), "train_crops": len(split.train),
        "test_identities": len(split.test.identities) if split.test is not None else 0,
        "test_crops": len(split.test) if split.test is not None else 0,
        "world_size": rt.world_size, "device": str(rt.device),
        "imgs_per_s": log.last_speed(), "validation": log.last_validation(),
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

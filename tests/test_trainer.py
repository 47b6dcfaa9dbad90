"""Trainer tests on real CelebA crops (prepared here with `facegate prepare`), tiny backbone."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from facegate.train.config import ConfigError, OptimConfig, load_config
from facegate.train.prepare import prepare
from facegate.train.trainer import CHECKPOINT, learning_rate, train

IDENTITIES = 8
PHOTOS = 4


@pytest.fixture(scope="session")
def crops_root(celeba_root, celeba_index, tmp_path_factory) -> Path:
    """A prepared crops folder (with dlib teacher vectors) of 8 identities x 4 real photos."""
    by_identity: dict[str, list[Path]] = {}
    for path, identity in celeba_index:
        by_identity.setdefault(identity, []).append(path)
    chosen = [i for i in sorted(by_identity) if len(by_identity[i]) >= PHOTOS + 2][:IDENTITIES]
    src = tmp_path_factory.mktemp("photos") / "identities.csv"
    with open(src, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "identity"])
        for identity in chosen:
            for path in by_identity[identity][:PHOTOS]:
                writer.writerow([str(path), identity])
    out = tmp_path_factory.mktemp("crops")
    report = prepare(src, out, workers=1, cnn_fallback=False, teacher="dlib", progress=False)
    assert report["crop_identities"] == IDENTITIES, report
    return out


def tiny_config(root: Path, *overrides: str):
    """The cosface recipe shrunk to seconds: width-0.125 MobileFaceNet, 4 x 2 batches."""
    base = [
        f"data.root={root}", "data.holdout=2", "model.width=0.125", "model.embedding_size=32",
        "train.p=4", "train.k=2", "train.epochs=2", "train.log_every=1", "optim.warmup_epochs=0",
    ]
    return load_config(Path(__file__).parents[1] / "configs" / "cosface.yaml", [*base, *overrides])


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_config_overrides_and_validation(tmp_path):
    cfg = load_config(None, ["loss.uss.enabled=true", "optim.milestones=[2, 4]", "model.width=1"])
    assert cfg.loss.uss.enabled is True and cfg.optim.milestones == [2, 4]
    assert isinstance(cfg.model.width, float)
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["loss.nope=1"])
    with pytest.raises(ConfigError, match="loss.head"):
        load_config(None, ["loss.head=triplet"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, ["augment.flip=maybe"])
    with pytest.raises(ConfigError, match="data.teacher"):
        load_config(None, ["loss.distill.enabled=true"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_load(config):
    assert load_config(config).name == config.stem


def test_learning_rate_schedules():
    optim = OptimConfig(lr=1.0, warmup_epochs=1, schedule="cosine")
    lrs = [learning_rate(s, steps_per_epoch=10, total_steps=110, optim=optim) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    step = OptimConfig(lr=1.0, warmup_epochs=0, schedule="step", milestones=[2, 3])
    got = [learning_rate(s, steps_per_epoch=10, total_steps=50, optim=step) for s in (19, 20, 30)]
    assert got == pytest.approx([1.0, 0.1, 0.01])
    poly = OptimConfig(lr=1.0, warmup_epochs=0, schedule="poly")
    assert learning_rate(50, steps_per_epoch=10, total_steps=100, optim=poly) == pytest.approx(0.25)


RECIPES = {
    "cosface": ([], ["loss_head"], "calibrated-train-pairs"),
    "arcface": (["loss.head=arcface", "loss.margin=0.5"], ["loss_head"], "calibrated-train-pairs"),
    "uss": (["loss.uss.enabled=true"], ["loss_head", "loss_uss"], "uss"),
    "discface": (["loss.discface.enabled=true"], ["loss_head", "loss_discface"],
                 "calibrated-train-pairs"),
    "uss_tcm": (["loss.uss.enabled=true", "loss.tcm.enabled=true"],
                ["loss_head", "loss_uss", "loss_tcm"], "uss"),
    "distill": (["loss.distill.enabled=true"], ["loss_head", "loss_distill"],
                "calibrated-train-pairs"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_train_each_loss_combination(recipe, crops_root, tmp_path):
    overrides, terms, source = RECIPES[recipe]
    if recipe == "distill":
        overrides = [*overrides, f"data.teacher={crops_root / 'teacher_dlib.npz'}"]
    # Validation every epoch for one recipe; the last epoch only for the others (time).
    every = "train.eval_every=1" if recipe == "cosface" else "train.eval_every=2"
    cfg = tiny_config(crops_root, *overrides, every)
    run = tmp_path / recipe
    summary = train(cfg, run, progress=False)  # 2 epochs; USS switches on in epoch 1

    log = read_log(run)
    steps = [r for r in log if r["kind"] == "step"]
    total = 2 * summary["steps_per_epoch"]
    assert summary["steps_per_epoch"] >= 2
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    last = steps[-1]
    for term in terms:
        assert math.isfinite(last[term]), (term, last)
    assert last["loss"] == pytest.approx(sum(last[t] for t in terms), rel=1e-5)
    assert not any(k.startswith("loss_") and k not in terms for k in last)
    # USS only after start_epoch (epoch 1), but its memory is filled during epoch 0.
    assert all("loss_uss" not in r for r in steps if r["epoch"] == 0)

    val = [r for r in log if r["kind"] == "val"]
    assert [r["epoch"] for r in val] == ([0, 1] if recipe == "cosface" else [1])
    assert all(0.0 <= r[k] <= 1.0 for r in val for k in ("accuracy", "accuracy@t"))

    ckpt = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False)
    assert ckpt["step"] == total and ckpt["threshold_source"] == source
    assert -1.0 <= ckpt["threshold"] <= 1.0 and summary["threshold"] == ckpt["threshold"]
    assert ckpt["backbone"] == {"name": "mobilefacenet",
                                "kwargs": {"embedding_size": 32, "width": 0.125}}
    if "loss_uss" in terms:
        assert bool(ckpt["heads"]["uss"]["filled"].all())
        assert ckpt["threshold"] == pytest.approx(
            float(ckpt["heads"]["uss"]["bias"]) / cfg.loss.uss.s)
    split = json.loads((run / "split.json").read_text())
    assert len(split["test"]) == 2 and not set(split["test"]) & set(split["train"])
    assert len(ckpt["heads"]["head"]["weight"]) == len(split["train"]) == IDENTITIES - 2
    for name in ("loss.png", "validation.png", "summary.json"):
        assert (run / name).stat().st_size > 0


def test_resume_continues_exactly(crops_root, tmp_path):
    """Stopped mid-epoch 1 and resumed == trained straight through (weights, memory, t, losses)."""
    # 2 epochs of >= 2 steps: stopping at steps_per_epoch + 1 is inside epoch 1.
    cfg = tiny_config(crops_root, "loss.uss.enabled=true", "data.holdout=0")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = train(cfg, straight, progress=False)
    total, per_epoch = summary["step"], summary["steps_per_epoch"]
    train(cfg, resumed, max_steps=per_epoch + 1, progress=False)
    first = torch.load(resumed / CHECKPOINT, map_location="cpu", weights_only=False)
    assert (first["epoch"], first["batches_done"], first["step"]) == (1, 1, per_epoch + 1)
    train(cfg, resumed, resume=True, progress=False)

    assert [r["step"] for r in read_log(resumed) if r["kind"] == "step"] == list(range(1, total + 1))
    a = torch.load(straight / CHECKPOINT, map_location="cpu", weights_only=False)
    b = torch.load(resumed / CHECKPOINT, map_location="cpu", weights_only=False)
    assert b["step"] == total == 2 * per_epoch
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=key)
    for head, state in a["heads"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["heads"][head][key], value, msg=f"{head}.{key}")
    assert b["threshold"] == pytest.approx(a["threshold"])
    np.testing.assert_allclose(
        [r["loss"] for r in read_log(resumed) if r["kind"] == "step"],
        [r["loss"] for r in read_log(straight) if r["kind"] == "step"], rtol=1e-5)


def test_teacher_vectors_are_centred(crops_root):
    """dlib's descriptors share a narrow cone; distillation uses them centred."""
    from facegate.train.data import CropFolder
    from facegate.train.trainer import load_teacher

    paths = CropFolder(crops_root).relative_paths
    raw = CropFolder(crops_root).teacher("dlib")
    centred = load_teacher(str(crops_root / "teacher_dlib.npz"), paths)
    np.testing.assert_allclose(centred.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(centred, raw - raw.mean(axis=0), atol=1e-6)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert (unit @ unit.T).min() > 0.5  # the cone: every pair, even of two people, is close

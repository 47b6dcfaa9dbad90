"""Trainer tests on real CelebA crops (prepared here with `facegate prepare`): a tiny
MobileFaceNet on ArcFace-template crops, and fine-tuning of the dlib ResNet port on dlib chips."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from facegate.core.align import ARCFACE_112, as_geometry
from facegate.core.face import read_geometry_file
from facegate.train.backbones import geometry_of, get_backbone
from facegate.train.config import ConfigError, OptimConfig, load_config
from facegate.train.data import CropFolder
from facegate.train.optimizer import build_optimizer, learning_rate, lr_multiplier
from facegate.train.prepare import prepare
from facegate.train.trainer import CHECKPOINT, train

IDENTITIES = 8
PHOTOS = 4
CHIP_IDENTITIES = 6


def photo_list(celeba_index, folder: Path, identities: int, skip: int = 0) -> Path:
    """An identities.csv of `identities` people x PHOTOS photos (people with spare photos,
    in name order, after the first `skip` of them)."""
    by_identity: dict[str, list[Path]] = {}
    for path, identity in celeba_index:
        by_identity.setdefault(identity, []).append(path)
    chosen = [i for i in sorted(by_identity) if len(by_identity[i]) >= PHOTOS + 2]
    src = folder / "identities.csv"
    with open(src, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "identity"])
        for identity in chosen[skip : skip + identities]:
            for path in by_identity[identity][:PHOTOS]:
                writer.writerow([str(path), identity])
    return src


@pytest.fixture(scope="session")
def crops_root(celeba_root, celeba_index, tmp_path_factory) -> Path:
    """A prepared crops folder (ArcFace 112 template, what MobileFaceNet takes; with dlib
    teacher vectors) of 8 identities x 4 real photos."""
    src = photo_list(celeba_index, tmp_path_factory.mktemp("photos"), IDENTITIES)
    out = tmp_path_factory.mktemp("crops")
    report = prepare(src, out, geometry=ARCFACE_112, workers=1, cnn_fallback=False,
                     teacher="dlib", progress=False)
    assert report["crop_identities"] == IDENTITIES, report
    return out


@pytest.fixture(scope="session")
def chips_root(celeba_root, celeba_index, tmp_path_factory) -> Path:
    """dlib chips (prepare's default geometry: 150x150, padding 0.25, 5-point landmarks) of
    6 identities x 4 real photos, made by the server's path (`facegate prepare`)."""
    src = photo_list(celeba_index, tmp_path_factory.mktemp("chip-photos"), CHIP_IDENTITIES)
    out = tmp_path_factory.mktemp("chips")
    report = prepare(src, out, workers=1, cnn_fallback=False, progress=False)
    assert report["crop_identities"] == CHIP_IDENTITIES, report
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


def test_dlib_init_needs_the_dlib_backbone():
    with pytest.raises(ConfigError, match="dlib_resnet"):
        load_config(None, ["model.init=dlib"])  # default backbone: mobilefacenet
    with pytest.raises(ConfigError, match="model.init"):
        load_config(None, ["model.init=weights.bin"])
    with pytest.raises(ConfigError, match="lr_mult"):
        load_config(None, ['optim.lr_mult={"backbone.": -1}'])
    cfg = load_config(None, ["model.backbone=dlib_resnet", "model.init=dlib", "model.width=1.0",
                             'optim.lr_mult={"backbone.": 0, "backbone.fc.": 1}'])
    assert cfg.model.init == "dlib" and cfg.optim.lr_mult == {"backbone.": 0.0, "backbone.fc.": 1.0}


def test_lr_multiplier_longest_prefix_wins():
    mult = {"backbone.": 0.0, "backbone.fc.": 0.5, "backbone.blocks.1.": 0.1}
    assert lr_multiplier("backbone.fc.weight", mult) == 0.5
    assert lr_multiplier("backbone.conv.weight", mult) == 0.0
    assert lr_multiplier("backbone.blocks.1.conv1.weight", mult) == 0.1
    assert lr_multiplier("backbone.blocks.10.conv1.weight", mult) == 0.0  # a prefix, not a number
    assert lr_multiplier("head.weight", mult) == 1.0  # no prefix matches
    assert lr_multiplier("backbone.fc.weight", dict(reversed(mult.items()))) == 0.5  # order-free
    assert lr_multiplier("anything", {}) == 1.0

    model = torch.nn.Module()
    model.backbone = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model.head = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(lr_mult={"backbone.": 0.0, "backbone.1.": 0.5}))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.0.weight", "backbone.0.bias"}
    in_optimizer = {id(p): g["lr_mult"] for g in optimizer.param_groups for p in g["params"]}
    assert sorted(in_optimizer.values()) == [0.5, 0.5, 1.0, 1.0]
    assert all(id(p) not in in_optimizer for p in model.backbone[0].parameters())


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_load(config):
    assert load_config(config).name == config.stem


CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_are_deltas_over_the_defaults(config):
    """A recipe sets only what differs from the documented defaults (train/config.py)."""
    defaults = load_config(None).to_dict()

    def same_as_default(node: dict, default: dict, prefix: str) -> list[str]:
        found = []
        for key, value in node.items():
            if isinstance(value, dict) and isinstance(default[key], dict) and default[key]:
                found += same_as_default(value, default[key], f"{prefix}{key}.")
            elif value == default[key]:
                found.append(prefix + key)
        return found

    assert same_as_default(yaml.safe_load(config.read_text()), defaults, "") == []
# The shared photos prepared once per crop geometry (each config's header gives the command).
SHARED_CROPS = {"arcface_template": "data/celeba-crops", "dlib_chip": "data/celeba-chips"}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_takes_a_training_step(config, crops_root, chips_root, tmp_path):
    """Every recipe as shipped: its data.root is the shared crops of its backbone's geometry,
    and it trains on such crops, here a tiny folder of them. Overridden: the folder, and what
    its 8 (6) identities allow in seconds on 2 cores: holdout 0 (no validation pass) and P 2,
    so an epoch has two steps or more and the one step ends mid-epoch; and a log record
    every step."""
    cfg = load_config(config)
    backbone = get_backbone(cfg.model.backbone, cfg.model.embedding_size, width=cfg.model.width)
    geometry = as_geometry(geometry_of(backbone))
    assert cfg.data.root == SHARED_CROPS[geometry.method]
    shared = Path(__file__).parents[1] / cfg.data.root
    if shared.is_dir():  # prepared here: made with this geometry
        assert read_geometry_file(shared) == geometry
    root = crops_root if geometry == ARCFACE_112 else chips_root
    overrides = [f"data.root={root}", "data.holdout=0", f"train.p={min(cfg.train.p, 2)}",
                 "train.log_every=1"]
    if cfg.data.teacher is not None:
        assert Path(cfg.data.teacher).parent == Path(cfg.data.root)
        overrides.append(f"data.teacher={root / Path(cfg.data.teacher).name}")
    summary = train(load_config(config, overrides), tmp_path / config.stem, max_steps=1,
                    progress=False)
    steps = [r for r in read_log(tmp_path / config.stem) if r["kind"] == "step"]
    assert summary["step"] == 1 and summary["steps_per_epoch"] >= 2
    assert [r["step"] for r in steps] == [1]
    assert math.isfinite(steps[0]["loss"])
    assert summary["threshold"] is None or math.isfinite(summary["threshold"])


def test_missing_data_says_how_to_prepare_it(tmp_path):
    missing = tmp_path / "celeba-crops"
    cfg = load_config(Path(__file__).parents[1] / "configs" / "default.yaml",
                      [f"data.root={missing}", f"data.teacher={missing / 'teacher_dlib.npz'}"])
    with pytest.raises(ConfigError, match=r"does not exist: make it with `facegate prepare PHOTOS "
                       + r".*celeba-crops --geometry arcface_template --size 112 --teacher dlib`"):
        train(cfg, tmp_path / "run", progress=False)


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
    from facegate.train.teacher import load_teacher

    paths = CropFolder(crops_root).relative_paths
    raw = CropFolder(crops_root).teacher("dlib")
    centred = load_teacher(str(crops_root / "teacher_dlib.npz"), paths)
    np.testing.assert_allclose(centred.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(centred, raw - raw.mean(axis=0), atol=1e-6)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    assert (unit @ unit.T).min() > 0.5  # the cone: every pair, even of two people, is close


def test_finetune_dlib_port_trains_fc_only_and_stays_close(chips_root, tmp_path):
    """dlib ResNet port fine-tuned on real dlib chips with everything but fc frozen: the frozen
    weights stay the port's bit for bit, fc moves, and a held-out chip still embeds near the port."""
    from facegate.train.backbones import dlib_resnet
    from facegate.train.checkpoint import build_backbone
    from facegate.train.embed import raw_embeddings

    cfg = load_config(None, [
        f"data.root={chips_root}", "data.holdout=2",
        "model.backbone=dlib_resnet", "model.init=dlib", "model.width=1.0",
        "model.embedding_size=128",
        "loss.uss.enabled=true", "loss.uss.negatives=mean", "loss.uss.start_epoch=0",
        # dlib's fc nearly cancels its all-positive 256-d features (|W f| ~ 1.5 for |f| ~ 19),
        # so an SGD step (grad = g f^T, CosFace s=64) moves the output along f: an fc learning
        # rate of 1e-4 already turns a held-out embedding to cosine ~0.2 with the port's in two
        # steps, configs/dlib_finetune.yaml's 5e-3 to ~0. 1e-5 here: fc moves, stays close.
        'optim.lr_mult={"backbone.": 0, "backbone.fc.": 0.0001}', "optim.warmup_epochs=0",
        "train.p=2", "train.k=2", "train.epochs=1", "train.log_every=1",
    ])
    run = tmp_path / "dlib_finetune"
    summary = train(cfg, run, max_steps=2, progress=False)
    steps = [r for r in read_log(run) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2] and summary["step"] == 2
    assert all(math.isfinite(r["loss_head"]) and math.isfinite(r["loss_uss"]) for r in steps)

    ckpt = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=False)
    assert ckpt["backbone"] == {"name": "dlib_resnet",
                                "kwargs": {"embedding_size": 128, "width": 1.0}}
    port = dlib_resnet(pretrained=True).eval()
    reference = port.state_dict()
    assert set(ckpt["state_dict"]) == set(reference)
    for key, value in reference.items():
        if key.startswith("fc."):
            assert not torch.equal(ckpt["state_dict"][key], value), key
        else:
            assert torch.equal(ckpt["state_dict"][key], value), key

    held_out = json.loads((run / "split.json").read_text())["test"]
    chip = CropFolder(chips_root, identities=held_out[:1]).load(workers=1)[:1]
    assert chip.shape == (1, 150, 150, 3)
    tuned = build_backbone(ckpt)
    a, b = raw_embeddings(tuned, chip)[0], raw_embeddings(port, chip)[0]
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert 0.9 < cosine < 1.0, cosine


def test_amp_on_requires_a_gpu(tmp_path):
    """train.amp: auto trains in fp32 where there is no GPU; on refuses to (it is not auto)."""
    from facegate.train.runtime import amp_dtype

    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu) is None
    with pytest.raises(ConfigError, match="train.amp on needs a CUDA device"):
        amp_dtype("on", cpu)
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=maybe"])
    # YAML reads a bare on / off as a boolean; the config takes it as the word
    assert [load_config(None, [f"train.amp={v}"]).train.amp for v in ("on", "off", "auto")] == [
        "on", "off", "auto"]
    if not torch.cuda.is_available():  # the trainer refuses before it reads any data
        with pytest.raises(ConfigError, match="train.amp on needs a CUDA device"):
            train(load_config(None, ["train.amp=on", f"data.root={tmp_path / 'none'}"]),
                  tmp_path / "run", progress=False)


def test_train_reads_a_recordio_pack(crops_root, tmp_path, capsys):
    """`facegate train` with data.format recordio: the same crops written by the test as an
    insightface pack (lossless PNG, labels in the folder's identity order) give the same
    split and the same first step as the crop folder."""
    from facegate.train.recordio import write_insightface_pack

    from facegate.cli import main

    folder = CropFolder(crops_root)
    pack = tmp_path / "pack"
    pack.mkdir()
    write_insightface_pack(pack / "train", folder.load(workers=1), folder.labels, ext=".png")
    from_folder = train(tiny_config(crops_root), tmp_path / "folder", max_steps=1, progress=False)
    config = Path(__file__).parents[1] / "configs" / "cosface.yaml"
    overrides = [f"data.root={pack}", "data.format=recordio", "data.holdout=2",
                 "model.width=0.125", "model.embedding_size=32", "train.p=4", "train.k=2",
                 "train.epochs=2", "train.log_every=1", "optim.warmup_epochs=0"]
    argv = ["train", str(config), "--out", str(tmp_path / "packed"), "--max-steps", "1", "--quiet"]
    assert main(argv + [a for o in overrides for a in ("--set", o)]) == 0
    assert "step 1" in capsys.readouterr().out
    from_pack = json.loads((tmp_path / "packed" / "summary.json").read_text())
    for key in ("train_identities", "train_crops", "test_identities", "test_crops", "step"):
        assert from_pack[key] == from_folder[key], key
    assert from_pack["test_identities"] == 2
    first = [r for r in read_log(tmp_path / "folder") if r["kind"] == "step"]
    packed = [r for r in read_log(tmp_path / "packed") if r["kind"] == "step"]
    assert packed[0]["loss"] == pytest.approx(first[0]["loss"], rel=1e-6)
    with pytest.raises(ConfigError, match="data.format folder"):
        train(tiny_config(pack, "data.format=recordio", "loss.distill.enabled=true",
                          f"data.teacher={crops_root / 'teacher_dlib.npz'}"),
              tmp_path / "teacher", progress=False)

"""Evaluation: pure metric helpers on hand-made scores, then a real checkpoint on real crops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from facegate.core import metrics
from facegate.train.binset import write_bin
from facegate.train.data import CropFolder
from facegate.train.evaluate import EvaluationError, evaluate
from facegate.train.trainer import CHECKPOINT, train
from facegate.train.verification import identity_metrics, reachable_fars
from test_trainer import crops_root, tiny_config  # noqa: F401 - shared real-crop fixture


def test_best_accuracy_threshold_separates_when_possible():
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0], bool)
    assert metrics.best_accuracy_threshold(scores, labels) == pytest.approx(0.55)
    # One impostor above two genuines: best is to accept only the top genuine... or all three.
    labels = np.array([1, 0, 1, 1, 0, 0], bool)
    t = metrics.best_accuracy_threshold(scores, labels)
    assert metrics.accuracy_at(scores, labels, t) == pytest.approx(5 / 6)


def test_reachable_fars_need_five_over_far_impostors():
    assert reachable_fars(49) == []
    assert reachable_fars(50) == [1e-1]
    assert reachable_fars(8_880) == [1e-1, 1e-2, 1e-3]
    assert reachable_fars(49_999) == [1e-1, 1e-2, 1e-3]


def test_identity_metrics_per_identity_rates_and_thresholds():
    # Identity a: genuine 0.9, 0.8; identity b: genuine 0.5, 0.45; impostor a-b pairs 0.6, 0.2.
    scores = np.array([0.9, 0.8, 0.5, 0.45, 0.6, 0.2])
    same = np.array([1, 1, 1, 1, 0, 0], bool)
    first = np.array(["a", "a", "b", "b", "a", "a"])
    second = np.array(["a", "a", "b", "b", "b", "b"])
    out = identity_metrics(scores, same, first, second, threshold=0.55)
    a, b = out["per_identity"]["a"], out["per_identity"]["b"]
    assert (a["genuine"], a["impostor"], b["genuine"], b["impostor"]) == (2, 2, 2, 2)
    assert a["frr@t"] == 0.0 and b["frr@t"] == 1.0 and a["far@t"] == b["far@t"] == 0.5
    assert a["best_threshold"] == pytest.approx(0.7)  # between 0.6 and 0.8
    assert b["best_threshold"] < 0.45  # b's genuines sit below the impostor 0.6
    assert out["identities"] == 2 and out["opis"] > 0 and out["opis_10"] >= out["opis"]


@pytest.fixture(scope="module")
def checkpoint(crops_root, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config(crops_root, "train.epochs=1", "loss.uss.enabled=true", "loss.uss.start_epoch=0")
    train(cfg, run, progress=False)
    return run


def test_evaluate_checkpoint_on_held_out_crops(checkpoint, crops_root, tmp_path):  # noqa: F811
    split = json.loads((checkpoint / "split.json").read_text())
    out = tmp_path / "eval"
    result = evaluate(checkpoint / CHECKPOINT, crops_root, identities=split["test"], out=out)

    written = json.loads((out / "metrics.json").read_text())
    ckpt = torch.load(checkpoint / CHECKPOINT, map_location="cpu", weights_only=False)
    assert written["threshold"] == ckpt["threshold"] and written["threshold_source"] == "uss"
    assert written["images"] == len(CropFolder(crops_root, split["test"]))
    assert written["genuine_pairs"] == written["impostor_pairs"] > 0
    for key in ("accuracy", "accuracy_std", "accuracy@t"):
        assert 0.0 <= written[key] <= 1.0, key
    level = written["identity_level"]
    assert set(level["per_identity"]) == set(split["test"])
    assert level["utility"] == "f1" and level["points"] == 101
    assert all(0.0 <= r["frr@t"] <= 1.0 for r in level["per_identity"].values())
    assert (out / "roc.png").stat().st_size > 0 and (out / "thresholds.png").stat().st_size > 0
    assert result["accuracy"] == written["accuracy"]


def test_evaluate_bin_set_reports_tar_at_far(checkpoint, crops_root, tmp_path):  # noqa: F811
    folder = CropFolder(crops_root)
    images, labels = folder.load(), folder.labels
    rng = np.random.default_rng(0)
    pairs, issame = [], []
    while len(pairs) < 120:  # 20 genuine + 100 impostor pairs: enough for FAR 1e-1
        i, j = rng.integers(0, len(labels), 2)
        same = bool(labels[i] == labels[j])
        if i != j and (same and sum(issame) < 20 or not same and len(issame) - sum(issame) < 100):
            pairs.append((i, j))
            issame.append(same)
    path = tmp_path / "mini.bin"
    write_bin(path, [images[k] for pair in pairs for k in pair], issame, ext=".png")

    result = evaluate(checkpoint / CHECKPOINT, path, out=tmp_path / "eval_bin")
    assert result["pairs"] == 120 and result["impostor_pairs"] == 100
    assert 0.0 <= result["tar@far=1e-1"] <= 1.0 and "tar@far=1e-2" not in result
    assert "identity_level" not in result and (tmp_path / "eval_bin" / "roc.png").is_file()


def test_evaluate_rejects_unknown_model(crops_root, tmp_path):  # noqa: F811
    with pytest.raises(EvaluationError):
        evaluate(tmp_path / "missing.onnx", crops_root, out=tmp_path)


def test_evaluate_precomputed_teacher_embeddings(crops_root, tmp_path):  # noqa: F811
    """dlib's descriptors from prepare --teacher evaluate on the same pairs as any model."""
    teacher = crops_root / "teacher_dlib.npz"
    result = evaluate(teacher, crops_root, out=tmp_path / "eval_teacher")
    assert result["model"] == {"kind": "precomputed", "path": str(teacher),
                               "vectors": len(CropFolder(crops_root))}
    assert result["threshold"] is None and result["threshold_source"] == "none"
    # dlib's pretrained ResNet separates these 8 celebrities almost perfectly.
    assert result["accuracy"] >= 0.9
    with np.load(teacher) as table:
        incomplete = {key: table[key] for key in table.files[1:]}
    np.savez(tmp_path / "incomplete.npz", **incomplete)
    with pytest.raises(EvaluationError, match="no embedding for 1 crops"):
        evaluate(tmp_path / "incomplete.npz", crops_root, out=tmp_path / "eval_bad")

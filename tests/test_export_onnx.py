"""Checkpoint -> ONNX bundle on real CelebA crops: validity, dynamic batch, parity, manifest."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from facegate.core import metrics
from facegate.core.bundle import load_bundle
from facegate.core.embed import create_embedder
from facegate.core.errors import BundleError
from facegate.core.manifest import DEFAULT_INPUT
from facegate.core.preprocess import model_input
from facegate.export.onnx import export_bundle
from facegate.export.parity import (
    accuracy_change,
    parity_report,
    row_cosines,
    sample_crops,
)
from facegate.train.backbones import get_backbone
from facegate.train.checkpoint import build_backbone, load_checkpoint
from facegate.train.embed import raw_embeddings
from facegate.train.losses import CosFace

EMBEDDING_SIZE = 64


@pytest.fixture(scope="module")
def crops(celeba_root):
    """24 real aligned crops, 3 photos of each of 8 people."""
    return sample_crops(celeba_root, 24, per_identity=3, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, crops):
    """A small MobileFaceNet trained a few SGD steps with CosFace on real crops, saved as the trainer does."""
    images, identities = crops
    torch.manual_seed(0)
    names = sorted(set(identities))
    labels = torch.tensor([names.index(i) for i in identities])
    model = get_backbone("mobilefacenet", embedding_size=EMBEDDING_SIZE, width=0.25)
    head = CosFace(num_classes=len(names), embedding_size=EMBEDDING_SIZE)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    x = torch.from_numpy(model_input(images, DEFAULT_INPUT))
    model.train()
    losses = []
    for _ in range(4):
        loss = head(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    run_dir = tmp_path_factory.mktemp("run-cosface")
    (run_dir / "summary.json").write_text(json.dumps({"train_loss": losses}))
    path = run_dir / "last.pt"
    torch.save(
        {
            "backbone": {"name": "mobilefacenet", "kwargs": {"width": 0.25}},
            "state_dict": model.state_dict(),
            "heads": {"cosface": head.state_dict()},
            "optimizer": optimizer.state_dict(),
            "epoch": 0,
            "step": 4,
            "config": {"loss": "cosface", "lr": 0.05, "backbone": "mobilefacenet"},
            "threshold": 0.37,
            "threshold_source": "calibrated",
            "embedding_size": EMBEDDING_SIZE,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint, crops, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    return export_bundle(checkpoint, out, parity_crops=crops[0][:12], version="t1", simplify=True)


def test_onnx_is_valid_opset17_with_named_io(bundle):
    model = onnx.load(str(bundle.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch


def test_dynamic_batch_1_and_5_agree(bundle, crops):
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    x = model_input(crops[0][:5], DEFAULT_INPUT)
    one = session.run(["embedding"], {"input": x[:1]})[0]
    five = session.run(["embedding"], {"input": x})[0]
    assert one.shape == (1, EMBEDDING_SIZE) and five.shape == (5, EMBEDDING_SIZE)
    np.testing.assert_allclose(five[:1], one, rtol=1e-4, atol=1e-5)


def test_parity_with_pytorch_on_real_crops(bundle, checkpoint, crops):
    recorded = bundle.manifest["parity"]
    assert recorded["crops"] >= 8 and recorded["passed"]
    assert recorded["min_cosine"] >= 0.9999
    # Independently: torch vs the bundle's ONNX on crops the export did not see.
    held_out = crops[0][12:]
    reference = raw_embeddings(build_backbone(load_checkpoint(checkpoint)), held_out)
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    exported = session.run(["embedding"], {"input": model_input(held_out, DEFAULT_INPUT)})[0]
    assert row_cosines(reference, exported).min() >= 0.9999
    # The trained model tells crops apart: the parity is not between constant outputs.
    z = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert (z @ z.T)[np.triu_indices(len(z), 1)].min() < 0.99


def test_manifest_threshold_training_and_sha256(bundle, checkpoint):
    manifest = bundle.manifest
    assert bundle.threshold == pytest.approx(0.37)
    assert bundle.threshold_source == "calibrated"
    assert "last.pt" in manifest["threshold_provenance"]
    digest = hashlib.sha256(bundle.onnx_path.read_bytes()).hexdigest()
    assert manifest["files"]["embedder.onnx"]["sha256"] == digest
    assert manifest["training"]["config"]["loss"] == "cosface"
    assert (
        manifest["training"]["checkpoint_sha256"]
        == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    )
    summary = json.loads((checkpoint.parent / "summary.json").read_text())
    assert manifest["evaluation"]["summary.json"] == summary
    assert manifest["export"]["opset"] >= 17
    assert manifest["export"]["simplification"]["applied"] in (True, False)
    assert load_bundle(bundle.path).model_id == bundle.model_id
    assert bundle.manifest["seal"]["digest"] == bundle.digest  # export seals what it writes


def test_auto_runtime_is_ort_cpu_and_matches_pytorch(bundle, checkpoint, crops):
    embedder = create_embedder(load_bundle(bundle.path), runtime="auto")
    assert embedder.runtime == "onnxruntime-cpu"
    got = embedder.embed(crops[0])
    assert got.shape == (len(crops[0]), EMBEDDING_SIZE)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    reference = raw_embeddings(build_backbone(load_checkpoint(checkpoint)), crops[0])
    assert row_cosines(reference, got).min() >= 0.9999


def test_threshold_override_and_missing_threshold(checkpoint, crops, tmp_path):
    overridden = export_bundle(
        checkpoint, tmp_path / "b", parity_crops=crops[0][:8], threshold=0.42
    )
    assert overridden.threshold == pytest.approx(0.42)
    assert overridden.threshold_source == "operator"
    assert "0.370000" in overridden.manifest["threshold_provenance"]

    state = torch.load(checkpoint, weights_only=False)
    state["threshold"] = None
    unthresholded = tmp_path / "none.pt"
    torch.save(state, unthresholded)
    with pytest.raises(BundleError, match="--threshold"):
        export_bundle(unthresholded, tmp_path / "c", parity_crops=crops[0][:8])


def test_cli_export_onnx(checkpoint, celeba_root, tmp_path, capsys):
    from facegate.cli import main

    out = tmp_path / "cli-bundle"
    argv = ["export", "onnx", str(checkpoint), str(out), "--name", "tiny", "--version", "9"]
    argv += ["--parity-images", "8", "--parity-data", str(celeba_root), "--threshold", "0.3"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    loaded = load_bundle(out)
    assert loaded.model_id == printed["model_id"] and loaded.name == "tiny"
    assert printed["parity"]["crops"] == 8 and printed["parity"]["passed"]


def test_parity_report_flags_drift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 32))
    assert parity_report(a, a * 3.0, min_cosine=0.9999)["passed"]  # scale does not matter
    drifted = a.copy()
    drifted[4] = rng.normal(size=32)
    report = parity_report(a, drifted, min_cosine=0.9999)
    assert not report["passed"] and report["min_cosine"] < 0.9


def test_verification_pairs_and_accuracy_change():
    identities = ["a", "a", "b", "b", "c"]
    i, j, labels = metrics.verification_pairs(identities, seed=0)
    assert labels.sum() == 2 and (~labels).sum() == 2  # (0,1), (2,3) + as many impostors
    assert all(
        (identities[p] == identities[q]) == lab for p, q, lab in zip(i, j, labels, strict=True)
    )
    e = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], dtype=float)
    same = accuracy_change(e, e, identities, 0.5)
    assert same["change_points"] == 0 and same["passed"] and same["reference_accuracy"] == 100.0
    worse = e.copy()
    worse[1] = [0, 1]  # the first genuine pair now falls below the threshold
    changed = accuracy_change(e, worse, identities, 0.5)
    assert changed["change_points"] < -0.1 and not changed["passed"]

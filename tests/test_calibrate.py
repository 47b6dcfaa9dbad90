"""`facegate calibrate`: the USS threshold learned on frozen embeddings of real crops.

Crops of a handful of real CelebA identities are made once by `facegate prepare`
(the project's face-preparation path) and embedded with the committed default bundle.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from facegate.core.bundle import add_file, load_bundle, sha256_file
from facegate.core.manifest import MANIFEST_NAME
from facegate.train.uss_threshold import (
    CalibrationError,
    expected_uss,
    learn_threshold,
    negative_weight_for_far,
    pair_rates,
)
from server_support import default_bundle

from facegate.cli import main

IDENTITIES, PHOTOS = 10, 10


@pytest.fixture(scope="module")
def crops(tmp_path_factory, celeba_index) -> Path:
    """Crops of the first 10 identities (10 photos each at most) via `facegate prepare`."""
    photos = tmp_path_factory.mktemp("calib-photos")
    by_identity: dict[str, list[Path]] = defaultdict(list)
    for path, identity in celeba_index:
        by_identity[identity].append(path)
    for identity in sorted(by_identity)[:IDENTITIES]:
        (photos / identity).mkdir()
        for path in by_identity[identity][:PHOTOS]:
            (photos / identity / path.name).symlink_to(path)
    out = tmp_path_factory.mktemp("calib") / "celeba-crops"
    argv = ["prepare", str(photos), str(out), "--no-cnn-fallback", "--workers", "2", "--quiet"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def embedded(crops, tmp_path_factory) -> tuple[np.ndarray, np.ndarray, Path]:
    """(embeddings, labels, .npz) of the crops with the default bundle (flip, as served)."""
    npz = tmp_path_factory.mktemp("calib-emb") / "embeddings.npz"
    argv = ["calibrate", str(default_bundle()), str(crops), "--dry-run", "--quiet",
            "--save-embeddings", str(npz)]
    assert main(argv) == 0
    with np.load(npz) as table:
        embeddings, labels = table["embeddings"], table["labels"]
    assert embeddings.shape == (len(labels), 128) and len(set(labels)) == IDENTITIES
    return embeddings, labels, npz


def test_calibrate_does_not_import_torch() -> None:
    code = "import sys, facegate.train.calibrate, facegate.train.uss_threshold; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_paper_form_is_stricter_than_verification(embedded) -> None:
    z, y, _ = embedded
    paper = learn_threshold(z, y, negatives="sum")
    verification = learn_threshold(z, y, negatives="mean", negative_weight=1.0)
    assert paper > verification + 0.05
    # The mean over C-1 classes times C-1 is the sum: the same root.
    scaled = learn_threshold(z, y, negatives="mean", negative_weight=IDENTITIES - 1)
    assert scaled == pytest.approx(paper, abs=2e-6)


@pytest.mark.parametrize(("negatives", "weight"), [("sum", 1.0), ("mean", 1.0), ("mean", 5.0)])
def test_learned_t_is_the_minimiser_of_the_expected_loss(embedded, negatives, weight) -> None:
    z, y, _ = embedded
    t = learn_threshold(z, y, negatives=negatives, negative_weight=weight)

    def loss(at: float) -> float:
        return expected_uss(z, y, at, negatives=negatives, negative_weight=weight).loss

    h = 1e-4
    slope_at_t = (loss(t + h) - loss(t - h)) / (2 * h)  # dL/dt by finite differences
    slope_off = (loss(t + 0.02 + h) - loss(t + 0.02 - h)) / (2 * h)
    assert abs(slope_at_t) < 1e-3 * abs(slope_off)
    assert loss(t) < loss(t - 0.01) and loss(t) < loss(t + 0.01)
    terms = expected_uss(z, y, t, negatives=negatives, negative_weight=weight)
    assert terms.positive == pytest.approx(terms.negative, rel=1e-4)  # soft FRR = lambda soft FAR


def test_more_training_classes_make_the_paper_threshold_stricter(embedded) -> None:
    z, y, _ = embedded
    subset = np.isin(y, sorted(set(y))[:3])
    few = learn_threshold(z[subset], y[subset], negatives="sum")
    everyone = learn_threshold(z, y, negatives="sum")
    assert everyone > few
    # The verification form does not drift that way with the number of classes.
    few_mean = learn_threshold(z[subset], y[subset], negatives="mean")
    all_mean = learn_threshold(z, y, negatives="mean")
    assert abs(all_mean - few_mean) < everyone - few


@pytest.mark.parametrize("far", [0.01, 0.05])
def test_target_far_is_hit_on_the_calibration_pairs(embedded, far) -> None:
    z, y, _ = embedded
    weight = negative_weight_for_far(z, y, far)
    t = learn_threshold(z, y, negatives="mean", negative_weight=weight)
    measured, frr = pair_rates(z, y, t)
    counts = np.unique(y, return_counts=True)[1]
    impostors = (len(y) ** 2 - (counts**2).sum()) // 2
    assert far - 1.0 / impostors <= measured <= far
    assert 0.0 < frr < 1.0
    stricter = negative_weight_for_far(z, y, far / 5)
    assert stricter > weight


def test_cli_writes_a_new_bundle_and_leaves_the_original(embedded, crops, tmp_path, capsys) -> None:
    z, y, _ = embedded
    source = default_bundle()
    before = {p.name: sha256_file(p) for p in source.iterdir() if p.is_file()}
    out = tmp_path / "calibrated"
    argv = ["calibrate", str(source), str(crops), "--target-far", "0.05", "--out", str(out),
            "--quiet"]
    assert main(argv) == 0
    assert {p.name: sha256_file(p) for p in source.iterdir() if p.is_file()} == before
    bundle = load_bundle(out)
    expected = learn_threshold(z, y, negatives="mean",
                               negative_weight=negative_weight_for_far(z, y, 0.05))
    assert bundle.threshold == pytest.approx(expected, abs=1e-5)
    assert bundle.threshold_source == "uss-calibrated"
    provenance = bundle.threshold_provenance
    for part in ("verification form", "s=64", "m=0.1", "lambda=", "FAR 0.05", "celeba-crops",
                 f"{IDENTITIES} identities", f"{len(y)} samples"):
        assert part in provenance
    original = load_bundle(source).manifest
    for key in ("name", "version", "input", "output", "training", "evaluation"):
        assert bundle.manifest[key] == original[key]
    assert bundle.manifest["calibration"]["previous_threshold"] == original["threshold"]
    assert f"learned t = {bundle.threshold:.6f}" in capsys.readouterr().out
    # Re-sealed with the new threshold: another model id (galleries re-embed), same network.
    assert bundle.sealed and bundle.model_id != load_bundle(source).model_id
    # The error model is fitted on the same data and written beside the threshold.
    section = bundle.manifest["error_model"]
    assert section["data"] == "celeba-crops" and section["samples"] == len(y)
    assert section["identities"] == IDENTITIES and bundle.error_model is not None


def test_error_model_only_keeps_the_threshold(embedded, tmp_path, capsys) -> None:
    from facegate.core.error_model import fit_error_model

    z, y, npz = embedded
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(default_bundle(), bundle_dir)
    before = load_bundle(bundle_dir)
    argv = ["calibrate", str(bundle_dir), "--embeddings", str(npz), "--error-model-only"]
    assert main(argv) == 0
    after = load_bundle(bundle_dir)
    assert (after.threshold, after.threshold_source) == (before.threshold,
                                                         before.threshold_source)
    assert after.threshold_provenance == before.threshold_provenance
    assert after.manifest["calibration"] == before.manifest["calibration"]
    expected, _ = fit_error_model(z, y)
    assert after.error_model.rho == pytest.approx(expected.rho, abs=1e-9)
    assert np.allclose(after.error_model.mean, expected.mean, atol=1e-6)
    assert "kept" in capsys.readouterr().out
    assert after.model_id != before.model_id  # another decision setting, another model


def test_cli_in_place_keeps_other_files_and_fields(embedded, tmp_path) -> None:
    z, y, npz = embedded
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(default_bundle(), bundle_dir)
    (tmp_path / "fake.engine").write_bytes(b"not really an engine")
    add_file(bundle_dir, tmp_path / "fake.engine", role="engine", gpu="H100", precision="fp16")
    argv = ["calibrate", str(bundle_dir), "--embeddings", str(npz), "--form", "paper"]
    assert main(argv) == 0
    bundle = load_bundle(bundle_dir)
    assert bundle.threshold == pytest.approx(learn_threshold(z, y, negatives="sum"), abs=1e-5)
    assert "paper form" in bundle.threshold_provenance
    assert "embeddings.npz" in bundle.threshold_provenance
    engine = bundle.manifest["files"]["fake.engine"]
    assert engine["gpu"] == "H100" and engine["precision"] == "fp16"
    assert engine["sha256"] == sha256_file(bundle_dir / "fake.engine")


def test_cli_dry_run_writes_nothing_and_bad_requests_fail(embedded, celeba_root, tmp_path,
                                                          capsys) -> None:
    _, _, npz = embedded
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(default_bundle(), bundle_dir)
    manifest = (bundle_dir / MANIFEST_NAME).read_bytes()
    assert main(["calibrate", str(bundle_dir), "--embeddings", str(npz), "--dry-run"]) == 0
    assert (bundle_dir / MANIFEST_NAME).read_bytes() == manifest
    capsys.readouterr()
    # Photos (not crops) go through the server's prepare_face path: 3 people x 3 photos.
    photos = tmp_path / "photos"
    for folder in sorted((celeba_root / "images").iterdir())[:3]:
        (photos / folder.name).mkdir(parents=True)
        for path in sorted(folder.glob("*.jpg"))[:3]:
            (photos / folder.name / path.name).symlink_to(path)
    assert main(["calibrate", str(bundle_dir), str(photos), "--quiet", "--dry-run"]) == 0
    assert (bundle_dir / MANIFEST_NAME).read_bytes() == manifest
    capsys.readouterr()
    assert main(["calibrate", str(bundle_dir), "--embeddings", str(npz), "--form", "paper",
                 "--target-far", "0.01"]) == 2
    assert main(["calibrate", str(bundle_dir)]) == 2
    assert (bundle_dir / MANIFEST_NAME).read_bytes() == manifest


def test_threshold_above_one_is_flagged_and_not_written(tmp_path, capsys) -> None:
    """The paper's sum over many classes at a small scale wants t > 1: reject everything."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 128))
    labels = np.repeat(np.arange(50), 3)
    z = centres[labels] + 0.3 * rng.standard_normal((150, 128)) + 0.5
    t = learn_threshold(z, labels, s=4.0, negatives="sum")
    assert t > 1.0
    npz = tmp_path / "synthetic.npz"
    np.savez(npz, embeddings=z, labels=labels)
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(default_bundle(), bundle_dir)
    manifest = (bundle_dir / MANIFEST_NAME).read_bytes()
    assert main(["calibrate", str(bundle_dir), "--embeddings", str(npz), "--form", "paper",
                 "--s", "4"]) == 2
    assert "rejects every pair" in capsys.readouterr().err
    assert (bundle_dir / MANIFEST_NAME).read_bytes() == manifest
    with pytest.raises(CalibrationError, match="above t = 1.5"):
        learn_threshold(z, labels, s=1.0, negatives="sum")


def test_bad_inputs_are_refused() -> None:
    z = np.eye(4)
    # Singletons have no positive pair and are left out: here only one identity remains.
    with pytest.raises(CalibrationError, match="at least 2 identities"):
        learn_threshold(z, [0, 0, 1, 2])
    with pytest.raises(CalibrationError, match="at least 2 identities"):
        learn_threshold(z, [0, 0, 0, 0])
    with pytest.raises(ValueError, match="negatives"):
        learn_threshold(z, [0, 0, 1, 1], negatives="max")
    assert json.loads(json.dumps(pair_rates(z, [0, 0, 1, 1], 0.5))) == [0.0, 1.0]

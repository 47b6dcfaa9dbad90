"""The face-quality score (core.quality): its signals on real photos, the embedder's
stability output, the detector stage, its manifest section and `facegate calibrate
--quality-only` fitting it on real photos."""

from __future__ import annotations

import io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from facegate.core.bundle import load_bundle
from facegate.core.embed import create_embedder, embed_with_stability
from facegate.core.errors import BundleError
from facegate.core.face import make_detector, prepare_face
from facegate.core.manifest import MANIFEST_NAME, validate_manifest
from facegate.core.quality import COMPONENTS, QualityModel, Signals, sharpness
from PIL import Image, ImageFilter
from server_support import default_bundle

from facegate.cli import main


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(default_bundle())


@pytest.fixture(scope="module")
def faces(bundle, celeba_index):
    """Prepared faces of the first 6 shared photos."""
    detector = make_detector(bundle.geometry)
    return [prepare_face(path.read_bytes(), detector, bundle.geometry) for path, _ in celeba_index[:6]]


def _scaled_jpeg(path: Path, factor: float, blur: float = 0.0) -> bytes:
    image = Image.open(path).convert("RGB")
    image = image.resize((round(image.width * factor), round(image.height * factor)))
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_stability_keeps_the_served_embedding_exactly(bundle, faces) -> None:
    embedder = create_embedder(bundle, runtime="onnxruntime-cpu", flip=True)
    crops = np.stack([f.crop for f in faces])
    vectors, stability = embed_with_stability(embedder, crops)
    assert np.array_equal(vectors, embedder.embed(crops))  # the summed output is unchanged
    raw = embedder.raw(np.concatenate([crops, crops[:, :, ::-1]]))
    a, b = raw[: len(crops)], raw[len(crops):]
    expected = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.allclose(stability, expected, atol=1e-6)
    assert ((stability > 0.5) & (stability <= 1.0)).all()


def test_each_face_says_which_detector_step_found_it(bundle, celeba_index, celeba_root) -> None:
    detector = make_detector(bundle.geometry)
    path = celeba_index[0][0]
    full = prepare_face(path.read_bytes(), detector, bundle.geometry)
    half = prepare_face(_scaled_jpeg(path, 0.5), detector, bundle.geometry)
    assert full.face.stage == "hog0"  # an 80 px face: HOG at upsample 0 finds it
    assert half.face.stage == "hog1"  # a 40 px face needs the upsampled pass
    hard = celeba_root / "images" / "7308" / "141226.jpg"  # HOG finds no face here
    assert prepare_face(hard.read_bytes(), detector, bundle.geometry).face.stage == "mmod"


def test_signals_follow_the_photo(bundle, celeba_index) -> None:
    detector = make_detector(bundle.geometry)
    path = celeba_index[0][0]
    sharp = prepare_face(path.read_bytes(), detector, bundle.geometry)
    blurred = prepare_face(_scaled_jpeg(path, 1.0, blur=2.5), detector, bundle.geometry)
    half = prepare_face(_scaled_jpeg(path, 0.5), detector, bundle.geometry)
    assert sharpness(blurred.crop) < 0.5 * sharpness(sharp.crop)
    s_full = Signals.of(sharp.crop, sharp.face.landmarks, 0.9, sharp.face.stage)
    s_half = Signals.of(half.crop, half.face.landmarks, 0.9, half.face.stage)
    assert s_half.eye_distance < 0.7 * s_full.eye_distance  # landmarks on a 40 px face are rough
    model = load_bundle(default_bundle()).quality_model
    assert model is not None
    q_sharp = model.assess(Signals.of(sharp.crop, sharp.face.landmarks, 0.95, "hog0"))
    q_blur = model.assess(Signals.of(blurred.crop, blurred.face.landmarks, 0.95, "hog0"))
    assert q_blur.components["sharpness"] < q_sharp.components["sharpness"]
    assert q_half_size(model, half) < model.assess(s_full).components["size"]
    assert set(q_sharp.components) == set(COMPONENTS)
    assert all(0.0 <= v <= 1.0 for v in [q_sharp.score, *q_sharp.components.values()])


def q_half_size(model: QualityModel, prepared) -> float:
    return model.assess(Signals.of(prepared.crop, prepared.face.landmarks, 0.9,
                                   prepared.face.stage)).components["size"]


def test_score_falls_with_instability_and_later_detector_steps() -> None:
    model = load_bundle(default_bundle()).quality_model
    crop = np.full((150, 150, 3), 128, np.uint8)
    eyes = np.array([[50, 60], [100, 60], [75, 85], [55, 110], [95, 110]], np.float32)

    def score(stability: float, stage: str) -> float:
        return model.assess(Signals.of(crop, eyes, stability, stage)).score

    assert score(0.99, "hog0") > score(0.9, "hog0") > score(0.7, "hog0")
    assert score(0.95, "hog0") > score(0.95, "hog1") > score(0.95, "mmod")
    assert 0.0 <= score(0.0, "mmod") <= score(1.0, "hog0") <= 1.0


def test_manifest_quality_section_is_validated(tmp_path) -> None:
    manifest = json.loads((default_bundle() / MANIFEST_NAME).read_text())
    section = manifest["quality_model"]
    assert QualityModel.from_manifest(section).to_manifest({})["score"] == section["score"]
    for broken in ({**section, "form": "other"},
                   {**section, "components": {"size": section["components"]["size"]}},
                   {**section, "score": {**section["score"], "std": [0.0] * 3}},
                   {**section, "score": {**section["score"], "features": ["nose"]}}):
        with pytest.raises(BundleError, match="quality_model"):
            validate_manifest({**manifest, "quality_model": broken})


def test_calibrate_quality_only_fits_on_photos_and_keeps_the_rest(celeba_index, tmp_path,
                                                                   capsys) -> None:
    photos = tmp_path / "photos"
    by_identity: dict[str, list[Path]] = defaultdict(list)
    for path, identity in celeba_index:
        by_identity[identity].append(path)
    for identity in sorted(by_identity)[:8]:
        (photos / identity).mkdir(parents=True)
        for path in by_identity[identity][:6]:
            (photos / identity / path.name).symlink_to(path)
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(default_bundle(), bundle_dir)
    before = load_bundle(bundle_dir)
    npz = tmp_path / "signals.npz"
    argv = ["calibrate", str(bundle_dir), str(photos), "--quality-only", "--quiet",
            "--save-embeddings", str(npz)]
    assert main(argv) == 0
    after = load_bundle(bundle_dir)
    assert (after.threshold, after.threshold_provenance) == (before.threshold,
                                                            before.threshold_provenance)
    assert after.manifest["error_model"] == before.manifest["error_model"]
    section = after.manifest["quality_model"]
    assert section["data"] == "photos" and section["identities"] == 8
    assert section["threshold"] == before.threshold
    assert after.model_id != before.model_id  # re-sealed: another decision setting
    with np.load(npz) as table:
        assert table["quality_features"].shape == (section["samples"], 8)
        rows = table["quality_features"]
    scores = after.quality_model.scores(rows)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert after.quality_model.cut(0.05) == pytest.approx(np.quantile(scores, 0.05), abs=1e-6)
    # the saved signals refit the same model without the photos
    again = tmp_path / "again"
    assert main(["calibrate", str(bundle_dir), "--embeddings", str(npz), "--quality-only",
                 "--out", str(again)]) == 0
    assert load_bundle(again).manifest["quality_model"]["score"] == section["score"]
    assert "error model kept" in capsys.readouterr().out


def test_quality_eval_runs_held_out_splits_on_saved_signals(celeba_index, tmp_path) -> None:
    """The evidence script end to end on real photos of 12 people (2 seeds x 4 folds):
    every method's curve starts at the undiscarded FNMR, the score is fitted per split."""
    from facegate.train import quality_eval

    photos = tmp_path / "photos"
    by_identity: dict[str, list[Path]] = defaultdict(list)
    for path, identity in celeba_index:
        by_identity[identity].append(path)
    for identity in sorted(by_identity)[:12]:
        (photos / identity).mkdir(parents=True)
        for path in by_identity[identity][:8]:
            (photos / identity / path.name).symlink_to(path)
    npz = tmp_path / "signals.npz"
    assert main(["calibrate", str(default_bundle()), str(photos), "--quality-only", "--quiet",
                 "--dry-run", "--save-embeddings", str(npz)]) == 0
    out = tmp_path / "eval"
    threshold = load_bundle(default_bundle()).threshold
    assert quality_eval.main([str(npz), "--threshold", str(threshold), "--seeds", "2",
                              "--out", str(out), "--figure", str(tmp_path / "edc.png")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"] == 8 and (tmp_path / "edc.png").stat().st_size > 10_000
    methods = summary["methods"]
    assert set(methods) == {"score", "random", *COMPONENTS}
    start = {m: e["fnmr@served"]["mean"][0] for m, e in methods.items()}
    assert len(set(start.values())) == 1  # nothing discarded: every method the same FNMR
    assert set(summary["review"]) == {"1", "3"}

"""`facegate prepare` on real CelebA photos: crops, report, resumability, teacher vectors."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from facegate.core.align import ARCFACE_112
from facegate.core.errors import FacegateError
from facegate.train.photo_crops import list_photos
from facegate.train.prepare import prepare

from facegate.cli import main


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, celeba_index) -> Path:
    """Identity folders of symlinks to 3 + 3 + 3 real photos, plus one blank image (no face)."""
    root = tmp_path_factory.mktemp("photos")
    by_identity: dict[str, list[Path]] = defaultdict(list)
    for path, identity in celeba_index:
        by_identity[identity].append(path)
    for identity in sorted(by_identity)[:3]:
        (root / identity).mkdir()
        for path in by_identity[identity][:3]:
            (root / identity / path.name).symlink_to(path)
    blank = np.full((200, 160, 3), 128, np.uint8)
    cv2.imwrite(str(root / sorted(by_identity)[0] / "blank.jpg"), blank)
    return root


def test_list_photos_reads_the_celeba_csv(celeba_root, celeba_index):
    photos = list_photos(celeba_root / "identities.csv")
    assert [(p.path, p.identity) for p in photos] == celeba_index
    assert all(p.crop == f"{p.identity}/{p.path.stem}.png" for p in photos)
    assert photos[0].source == str(celeba_index[0][0].relative_to(celeba_root))


def test_prepare_crops_reports_and_resumes(photo_folder, tmp_path, capsys):
    out = tmp_path / "crops"
    argv = ["prepare", str(photo_folder), str(out), "--no-cnn-fallback", "--workers", "2", "--quiet",
            "--geometry", "arcface_template"]
    assert main(argv) == 0
    assert "photos cropped" in capsys.readouterr().out

    report = json.loads((out / "prepare_report.json").read_text())
    assert report["photos"] == 10 and report["identities"] == 3
    assert report["crops"] + report["failed"] == 10
    blank = [f for f in report["failures"] if f["source"].endswith("blank.jpg")]
    assert len(blank) == 1 and blank[0]["reason"] == "no_face"
    assert report["crops"] >= 7, report["failures"]

    with open(out / "crops.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["crops"]
    for row in rows:
        crop = cv2.imread(str(out / row["path"]))
        assert crop.shape == (112, 112, 3)
        assert crop.std() > 10  # a face, not an empty warp
        assert row["path"].split("/")[0] == row["identity"]
        assert (photo_folder / row["source"]).exists()

    second = prepare(photo_folder, out, geometry=ARCFACE_112, workers=2, cnn_fallback=False, progress=False)
    assert second["this_run"]["processed"] == 0
    assert second["crops"] == report["crops"] and second["failed"] == report["failed"]

    (out / rows[0]["path"]).unlink()
    third = prepare(photo_folder, out, geometry=ARCFACE_112, workers=1, cnn_fallback=False, progress=False)
    assert third["this_run"]["processed"] == 1 and third["this_run"]["ok"] == 1
    assert third["crops"] == report["crops"]


def test_teacher_descriptors_separate_identities(photo_folder, tmp_path):
    out = tmp_path / "crops"
    report = prepare(photo_folder, out, workers=1, cnn_fallback=False, teacher="dlib", progress=False)
    with np.load(out / "teacher_dlib.npz") as data:
        vectors = {key: data[key] for key in data.files}
    with open(out / "crops.csv", newline="") as f:
        identity = {row["path"]: row["identity"] for row in csv.DictReader(f)}
    assert set(vectors) == set(identity) and report["teacher"]["vectors"] == len(vectors)
    assert all(v.shape == (128,) and v.dtype == np.float32 for v in vectors.values())

    keys = sorted(vectors)
    same, different = [], []
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            distance = float(np.linalg.norm(vectors[keys[a]] - vectors[keys[b]]))
            (same if identity[keys[a]] == identity[keys[b]] else different).append(distance)
    # dlib's own decision threshold is 0.6 on these descriptors.
    assert np.mean(same) < 0.6 < np.mean(different)


def test_prepare_defaults_to_dlib_chips_and_records_the_geometry(photo_folder, tmp_path, capsys):
    out = tmp_path / "chips"
    report = prepare(photo_folder, out, workers=1, progress=False)
    assert report["geometry"] == {"method": "dlib_chip", "size": 150, "padding": 0.25}
    assert report["detector"] == {"name": "dlib", "upsample": 1, "landmarks": "5", "cnn_fallback": True}
    recorded = json.loads((out / "geometry.json").read_text())
    assert recorded["geometry"] == report["geometry"] and recorded["detector"]["landmarks"] == "5"
    with open(out / "crops.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(cv2.imread(str(out / r["path"])).shape == (150, 150, 3) for r in rows)
    # The folder is never extended with crops of another geometry or landmark model.
    assert main(["prepare", str(photo_folder), str(out), "--geometry", "arcface_template", "--quiet"]) == 2
    assert "holds crops made with geometry dlib_chip 150x150 padding 0.25" in capsys.readouterr().err
    with pytest.raises(FacegateError, match="5-point landmarks, not dlib_chip 150x150 padding 0.25 and 68"):
        prepare(photo_folder, out, landmarks="68", progress=False)

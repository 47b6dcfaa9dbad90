"""Accuracy cost of dlib chips made from ArcFace five points (what SCRFD gives) instead of
dlib's five, for the default model on the 48 held-out identities (same pairs, flip).

The ArcFace five come from the 68-point predictor (``five_points_from_68``), standing in
for SCRFD's; the chips from dlib's five are the prepared crops themselves.
Usage: python -m facegate.train.compare_landmarks [CROPS] (after make default-model).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from facegate.core import metrics
from facegate.core.align import DLIB_CHIP_150
from facegate.core.bundle import load_bundle
from facegate.core.detect import DlibDetector, Face, select_face
from facegate.core.embed import create_embedder
from facegate.core.face import align_face
from facegate.core.image import decode
from facegate.train.data import CropFolder, split_identities
from facegate.train.verification import verification_metrics


def main(argv: list[str]) -> int:
    crops = Path(argv[0] if argv else "data/celeba-chips")
    photos = Path("../shared/data/celeba-subset")
    bundle = load_bundle("models/default")
    _, test_ids = split_identities(CropFolder(crops).identities, 48, 0)
    test = CropFolder(crops, test_ids)
    with open(crops / "crops.csv", newline="") as f:
        sources = {row["path"]: row["source"] for row in csv.DictReader(f)}
    detector = DlibDetector(landmarks="68")
    mapped, kept = [], []
    for i, rel in enumerate(test.relative_paths):
        image = decode((photos / sources[rel]).read_bytes())
        faces = detector.detect(image)
        if faces:
            face = select_face(faces)
            arcface_only = Face(box=face.box, score=face.score, landmarks=face.landmarks)
            mapped.append(align_face(image, arcface_only, DLIB_CHIP_150))
            kept.append(i)
    index = np.asarray(kept)
    embedder = create_embedder(bundle, flip=True)
    first, second, same = metrics.verification_pairs(test.labels[index], seed=0)
    t = bundle.threshold
    print("| chip made from | 10-fold acc. | TAR@FAR1e-3 | acc. at t | FAR at t | FRR at t |")
    for name, chips in (("dlib's five points", test.load()[index]),
                        ("ArcFace five (mapped)", np.stack(mapped))):
        scores = metrics.pair_cosines(embedder.embed(chips), first, second)
        m = verification_metrics(scores, same, t)
        far = ((scores >= t) & ~same).sum() / (~same).sum()
        frr = ((scores < t) & same).sum() / same.sum()
        print(f"| {name} | {100 * m['accuracy']:.2f}% | {100 * m['tar@far=1e-3']:.2f}% "
              f"| {100 * m['accuracy@t']:.2f}% | {100 * far:.2f}% | {100 * frr:.2f}% |")
    print(f"{len(index)} of {len(test)} held-out faces, {len(same)} pairs, t = {t:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

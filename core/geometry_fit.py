"""Re-derive :data:`facegate.core.dlib_chip.ARCFACE_IN_DLIB_FRAME` from real photos, and measure it.

``python -m facegate.core.geometry_fit [CSV] [--per-identity N]`` detects the faces of
the shared CelebA subset with dlib's HOG detector, fits both of dlib's shape
predictors on the same box, and

* fits: averages where the ArcFace five points (``five_points_from_68`` of the
  68-point shape) fall in dlib's chip frame (the inverse of the similarity that
  ``dlib_chip`` fits from ``DLIB5_TEMPLATE`` to the 5-point shape), over the photos
  of every other identity (sorted by name);
* evaluates on the other identities: the error of ``arcface_from_dlib5`` against the
  68-point ArcFace points, in pixels of the 112x112 ArcFace crop, and the mean
  absolute pixel difference between the dlib chip made from dlib's five and the one
  made from the ArcFace five (``dlib_chip_from_arcface``).

It prints the constants to paste into core/align.py. Needs the 68-point predictor
(iBUG 300-W licence, non-commercial) for the ArcFace points; only the derivation uses
it, the constants do not carry it.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facegate.core.align import (
    ARCFACE_112,
    DLIB_CHIP_150,
    align,
    similarity_transform,
    template_for,
)
from facegate.core.dlib_chip import (
    ARCFACE_IN_DLIB_FRAME,
    DLIB5_TEMPLATE,
    arcface_from_dlib5,
    dlib_chip,
    dlib_chip_from_arcface,
    dlib_chip_transform,
)

DEFAULT_CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeba-subset" / "identities.csv"


@dataclass(frozen=True)
class Sample:
    """One photo's largest HOG face: its image, dlib's five parts and the 68-derived ArcFace five."""

    path: Path
    image: np.ndarray
    dlib5: np.ndarray
    arcface: np.ndarray


def samples(paths: Iterable[Path], upsample: int = 1) -> list[Sample]:
    """Detect, and fit both predictors on the same (largest) HOG box of each photo."""
    import dlib
    from facegate.core.detect import dlib_model_file, five_points_from_68
    from facegate.core.image import decode

    hog = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
    sp68 = dlib.shape_predictor(str(dlib_model_file("shape_predictor_68_face_landmarks.dat")))
    out = []
    for path in paths:
        image = decode(Path(path).read_bytes())
        rects = hog(image, upsample)
        if not rects:
            continue
        rect = max(rects, key=lambda r: r.area())
        p5 = np.array([(p.x, p.y) for p in sp5(image, rect).parts()], np.float64)
        p68 = np.array([(p.x, p.y) for p in sp68(image, rect).parts()], np.float64)
        out.append(Sample(Path(path), image, p5, five_points_from_68(p68).astype(np.float64)))
    return out


def _to_unit_frame(dlib5: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points`` in dlib's unit chip frame: the inverse of the chip's unit -> image similarity."""
    m = similarity_transform(DLIB5_TEMPLATE, dlib5)
    a, t = m[:, :2], m[:, 2]
    return (np.asarray(points, np.float64) - t) @ np.linalg.inv(a).T


def fit_arcface_in_dlib_frame(fit: Sequence[Sample]) -> np.ndarray:
    """Mean position of the ArcFace five in dlib's unit chip frame, (5, 2)."""
    if not fit:
        raise ValueError("no faces to fit on")
    return np.mean([_to_unit_frame(s.dlib5, s.arcface) for s in fit], axis=0)


def evaluate(held_out: Sequence[Sample], template: np.ndarray | None = None) -> dict:
    """How well dlib's five stand in for the ArcFace five and vice versa, on held-out faces.

    ``template``: the ArcFace five in dlib's unit chip frame (default: the shipped
    ``ARCFACE_IN_DLIB_FRAME``).
    """
    template = ARCFACE_IN_DLIB_FRAME if template is None else np.asarray(template, np.float64)
    g = DLIB_CHIP_150
    assert g.padding is not None
    size = ARCFACE_112.size
    grid = np.stack(np.meshgrid(np.arange(g.size), np.arange(g.size)), -1).reshape(-1, 2)
    grid = np.hstack([grid, np.ones((len(grid), 1))])
    point_errors: list[np.ndarray] = []
    crop_diffs: list[float] = []
    chip_diffs: list[float] = []
    grid_shifts: list[float] = []
    for s in held_out:
        # Point error in the 112 ArcFace crop's pixels (both mapped by the 68-point crop transform).
        m = similarity_transform(s.arcface, template_for(size))
        derived = arcface_from_dlib5(s.dlib5, template) @ m[:, :2].T + m[:, 2]
        reference = s.arcface @ m[:, :2].T + m[:, 2]
        point_errors.append(np.linalg.norm(derived - reference, axis=1))
        # The ArcFace-template crop from the derived points vs from the 68-point ones.
        crop68 = align(s.image, s.arcface, size).astype(np.int16)
        crop5 = align(s.image, arcface_from_dlib5(s.dlib5, template), size).astype(np.int16)
        crop_diffs.append(float(np.abs(crop68 - crop5).mean()))
        # The dlib chip from dlib's five vs from the ArcFace five.
        exact = dlib_chip(s.image, s.dlib5, g.size, g.padding).astype(np.int16)
        approx = dlib_chip_from_arcface(s.image, s.arcface, g.size, g.padding, template)
        chip_diffs.append(float(np.abs(exact - approx.astype(np.int16)).mean()))
        # How far the chip's sampling grid moves, in chip pixels (mean over the chip).
        a_exact = dlib_chip_transform(s.dlib5, g.size, g.padding)
        a_approx = dlib_chip_transform(s.arcface, g.size, g.padding, template=template)
        scale = float(np.sqrt(abs(np.linalg.det(a_exact[:, :2]))))
        grid_shifts.append(float((np.linalg.norm(grid @ (a_exact - a_approx).T, axis=1) / scale).mean()))
    errors = np.array(point_errors)
    names = ["left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right"]
    return {
        "faces": len(held_out),
        "arcface_from_dlib5_error_px112": {
            "median": dict(zip(names, np.round(np.median(errors, axis=0), 2).tolist(), strict=True)),
            "mean": dict(zip(names, np.round(errors.mean(axis=0), 2).tolist(), strict=True)),
        },
        "arcface_crop_from_dlib5_vs_68_mean_abs_diff": _summary(crop_diffs),
        "chip_from_arcface_vs_dlib5_mean_abs_diff": _summary(chip_diffs),
        "chip_from_arcface_vs_dlib5_grid_shift_px150": _summary(grid_shifts),
    }


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": round(float(np.mean(values)), 2),
        "median": round(float(np.median(values)), 2),
        "p90": round(float(np.percentile(values, 90)), 2),
    }


def split_photos(csv_path: Path, per_identity: int) -> tuple[list[Path], list[Path]]:
    """(fit, held-out) photos: up to ``per_identity`` of every other identity each."""
    by_id: dict[str, list[Path]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            by_id.setdefault(row["identity"], []).append(csv_path.parent / row["path"])
    names = sorted(by_id)
    fit = [p for name in names[0::2] for p in by_id[name][:per_identity]]
    held = [p for name in names[1::2] for p in by_id[name][:per_identity]]
    return fit, held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, nargs="?", default=DEFAULT_CSV, help="identities.csv (path,identity)")
    parser.add_argument("--per-identity", type=int, default=4, help="photos per identity")
    args = parser.parse_args(argv)
    fit_paths, held_paths = split_photos(args.csv, args.per_identity)
    fit = samples(fit_paths)
    template = fit_arcface_in_dlib_frame(fit)
    report = {"fit_faces": len(fit), "template": np.round(template, 6).tolist()}
    report["held_out"] = evaluate(samples(held_paths), template)
    print(json.dumps(report, indent=2))
    print("ARCFACE_IN_DLIB_FRAME = np.array(")
    print("    [")
    for x, y in template:
        print(f"        [{x:.6f}, {y:.6f}],")
    print("    ],\n    dtype=np.float64,\n)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

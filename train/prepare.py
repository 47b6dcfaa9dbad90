"""``facegate prepare SRC OUT``: detect + align photo collections into training crops.

Training reads crops made by the same function the server uses
(``facegate.core.face.prepare_face``) with the same detector settings by default
(dlib HOG, upsample 1, 5-point landmarks, no CNN fallback), so a model never sees a
crop the server would not make. The crop geometry is the model's: dlib chips 150x150
with padding 0.25 by default, ``--geometry arcface_template [--size 112]`` for the
ArcFace template, or ``--bundle B`` for whatever bundle B's manifest declares. The
geometry used is written to OUT/geometry.json, and a folder is never extended with
crops of another geometry. Decoding and detection are the slow part (seconds per
photo with the optional CNN fallback), so the work is spread over processes and the
step is resumable: photos whose crop already exists are skipped, photos that failed
before are not retried unless asked, and the optional teacher file is merged rather
than rewritten from scratch.

Outputs in OUT:
    <identity>/<stem>.png   lossless crops
    crops.csv               path,identity,source,score (paths relative to OUT)
    geometry.json           the crop geometry and detector settings
    teacher_dlib.npz        optional: dlib's 128-d descriptor per crop path
    prepare_report.json     counts and per-photo failures with their reason
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.align import ARCFACE_112, DLIB_CHIP_150, Geometry
from facegate.core.errors import FacegateError
from facegate.core.face import (
    GEOMETRY_FILE,
    add_geometry_arguments,
    add_landmark_argument,
    geometry_from_args,
    landmarks_for,
    read_geometry_file,
    write_geometry_file,
)
from facegate.train.photo_crops import (
    Outcome,
    Photo,
    PhotoProcessor,
    init_worker,
    list_photos,
    process_in_worker,
)
from facegate.train.teacher import TEACHERS, read_table, teacher_filename, write_table
from tqdm import tqdm

CROPS_CSV = "crops.csv"
REPORT_JSON = "prepare_report.json"
# Teacher vectors are flushed to disk this often so an interrupted run loses little.
TEACHER_FLUSH_EVERY = 250


def load_crop_rows(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def save_crop_rows(path: Path, rows: dict[str, dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "identity", "source", "score"])
        writer.writeheader()
        writer.writerows(rows[key] for key in sorted(rows))


def load_failures(path: Path) -> dict[str, dict[str, str]]:
    """Failures recorded by an earlier run, by source photo."""
    if not path.is_file():
        return {}
    return {f["source"]: f for f in json.loads(path.read_text()).get("failures", [])}


def pending_photos(
    photos: list[Photo],
    out: Path,
    *,
    teacher_vectors: dict[str, np.ndarray] | None,
    failures: dict[str, dict[str, str]],
    retry_failed: bool,
) -> list[Photo]:
    """Photos still to process: no crop yet (or no teacher vector when one is asked for)."""
    pending = []
    for photo in photos:
        if not retry_failed and photo.source in failures:
            continue
        done = (out / photo.crop).is_file()
        if done and (teacher_vectors is None or photo.crop in teacher_vectors):
            continue
        pending.append(photo)
    return pending


def _check_folder_matches(out: Path, geometry: Geometry, landmarks: str) -> None:
    """Refuse to add crops to a folder whose crops were made with another geometry or landmarks."""
    existing = read_geometry_file(out)
    if existing is not None:
        recorded = json.loads((out / GEOMETRY_FILE).read_text()).get("detector", {}).get("landmarks")
    elif (out / CROPS_CSV).is_file():
        existing, recorded = ARCFACE_112, "68"  # a folder from before geometry.json: all were these
    else:
        return
    if existing != geometry or (recorded is not None and recorded != landmarks):
        raise FacegateError(
            f"{out} holds crops made with geometry {existing} and {recorded}-point landmarks, "
            f"not {geometry} and {landmarks}-point: use another folder"
        )


def prepare(
    src: Path,
    out: Path,
    *,
    geometry: Geometry = DLIB_CHIP_150,
    workers: int = 1,
    cnn_fallback: bool = True,
    upsample: int = 1,
    landmarks: str = "auto",
    teacher: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict:
    """Crop every photo of SRC into OUT (resumably) and return the report it also writes.

    The defaults are the server's detector settings (HOG upsample 1, landmarks "auto":
    5-point for dlib chips, 68-point for the ArcFace template, see
    ``core.face.landmarks_for``; no CNN fallback) and the dlib-chip geometry. Raises
    ``FacegateError`` when OUT already holds crops of another geometry or landmark model.
    """
    started = time.perf_counter()
    landmarks = landmarks_for(geometry, landmarks)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_folder_matches(out, geometry, landmarks)
    write_geometry_file(
        out,
        geometry,
        detector={"name": "dlib", "upsample": upsample, "landmarks": landmarks, "cnn_fallback": cnn_fallback},
    )
    photos = list_photos(Path(src))
    crop_owner: dict[str, str] = {}
    for photo in photos:
        other = crop_owner.setdefault(photo.crop, photo.source)
        if other != photo.source:
            raise FacegateError(f"{photo.source} and {other} would both be cropped to {photo.crop}")

    teacher_path = out / teacher_filename(teacher) if teacher else None
    teacher_vectors = read_table(teacher_path) if teacher_path else None
    rows = load_crop_rows(out / CROPS_CSV)
    failures = load_failures(out / REPORT_JSON)
    todo = pending_photos(
        photos, out, teacher_vectors=teacher_vectors, failures=failures, retry_failed=retry_failed
    )
    wanted = {p.source for p in photos}
    failures = {s: f for s, f in failures.items() if s in wanted}

    options: dict[str, Any] = {
        "geometry": geometry,
        "cnn_fallback": cnn_fallback,
        "upsample": upsample,
        "landmarks": landmarks,
        "teacher": teacher,
    }
    workers = max(1, min(workers, len(todo)))
    new_ok, new_failed = 0, 0
    since_flush = 0
    bar = tqdm(total=len(todo), desc="prepare", unit="photo", disable=not progress)
    pool = None
    outcomes: Iterable[Outcome]
    if workers == 1 or not todo:
        outcomes = map(PhotoProcessor(out, **options), todo) if todo else []
    else:
        pool = multiprocessing.get_context("fork").Pool(workers, init_worker, (out, options))
        outcomes = pool.imap_unordered(process_in_worker, todo, chunksize=2)
    try:
        for outcome in outcomes:
            photo = outcome.photo
            bar.update()
            if outcome.reason is not None:
                new_failed += 1
                failures[photo.source] = {
                    "source": photo.source,
                    "identity": photo.identity,
                    "reason": outcome.reason,
                    "message": outcome.message or "",
                }
                continue
            new_ok += 1
            failures.pop(photo.source, None)
            rows[photo.crop] = {
                "path": photo.crop,
                "identity": photo.identity,
                "source": photo.source,
                "score": f"{outcome.score:.4f}",
            }
            if teacher_path is not None and teacher_vectors is not None and outcome.teacher is not None:
                teacher_vectors[photo.crop] = outcome.teacher
                since_flush += 1
                if since_flush >= TEACHER_FLUSH_EVERY:
                    write_table(teacher_path, teacher_vectors)
                    save_crop_rows(out / CROPS_CSV, rows)
                    since_flush = 0
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        # Keep whatever finished, even when interrupted, so the next run resumes from it.
        if teacher_path is not None and teacher_vectors is not None:
            write_table(teacher_path, teacher_vectors)
        save_crop_rows(out / CROPS_CSV, rows)

    present = {p.crop for p in photos if (out / p.crop).is_file()}
    report = {
        "source": str(src),
        "photos": len(photos),
        "identities": len({p.identity for p in photos}),
        "crops": len(present),
        "crop_identities": len({rows[c]["identity"] for c in present if c in rows}),
        "failed": len(failures),
        "failures_by_reason": dict(Counter(f["reason"] for f in failures.values())),
        "this_run": {
            "processed": len(todo),
            "ok": new_ok,
            "failed": new_failed,
            "skipped": len(photos) - len(todo),
            "seconds": round(time.perf_counter() - started, 2),
            "workers": workers,
        },
        "geometry": geometry.to_dict(),
        "detector": {"name": "dlib", "upsample": upsample, "landmarks": landmarks, "cnn_fallback": cnn_fallback},
        "teacher": {"name": teacher, "file": teacher_path.name, "vectors": len(teacher_vectors)}
        if teacher_path is not None and teacher_vectors is not None
        else None,
        "failures": sorted(failures.values(), key=lambda f: f["source"]),
    }
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="folder of identity sub-folders, or CSV of path,identity")
    parser.add_argument("out", type=Path, help="output folder for crops, crops.csv and the report")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    add_geometry_arguments(parser)
    parser.add_argument("--upsample", type=int, default=1, help="dlib HOG upsampling passes (server default 1)")
    add_landmark_argument(parser)
    parser.add_argument(
        "--cnn-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="where HOG finds no face, dlib's MMOD CNN (ONNX Runtime, ~0.5 s per miss): the "
        "server's default detector (FACEGATE_DETECTOR_BOXES=hog+mmod), so training sees the "
        "faces the server finds; --no-cnn-fallback for HOG alone",
    )
    parser.add_argument("--teacher", choices=TEACHERS, help="also store a teacher embedding per crop")
    parser.add_argument("--retry-failed", action="store_true", help="retry photos that failed in an earlier run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        geometry = geometry_from_args(args)
        report = _prepare_from_args(args, geometry)
    except (ValueError, FacegateError) as exc:  # bad geometry options, unreadable bundle, folder clash
        print(f"facegate prepare: {exc}", file=sys.stderr)
        return 2
    this_run = report["this_run"]
    print(
        f"{report['crops']}/{report['photos']} photos cropped ({report['crop_identities']} of "
        f"{report['identities']} identities); {report['failed']} failed {report['failures_by_reason']}; "
        f"this run: {this_run['processed']} processed ({this_run['ok']} ok, {this_run['failed']} failed), "
        f"{this_run['skipped']} skipped, {this_run['seconds']} s on {this_run['workers']} workers; "
        f"geometry {geometry}"
    )
    print(f"report: {Path(args.out) / REPORT_JSON}")
    return 0


def _prepare_from_args(args: argparse.Namespace, geometry: Geometry) -> dict:
    return prepare(
        args.src,
        args.out,
        geometry=geometry,
        workers=args.workers,
        cnn_fallback=args.cnn_fallback,
        upsample=args.upsample,
        landmarks=args.landmarks,
        teacher=args.teacher,
        retry_failed=args.retry_failed,
        progress=not args.quiet,
    )

"""``facegate prepare SRC OUT``: detect + align photo collections into 112x112 training crops.

Training reads crops made by the same detector and aligner the server uses, so a
model never sees a crop the server would not make. Decoding and detection are the
slow part (seconds per photo with the CNN fallback), so the work is spread over
processes and the step is resumable: photos whose crop already exists are skipped,
photos that failed before are not retried unless asked, and the optional teacher
file is merged rather than rewritten from scratch.

Outputs in OUT:
    <identity>/<stem>.png   lossless aligned crops
    crops.csv               path,identity,source,score (paths relative to OUT)
    teacher_dlib.npz        optional: dlib's 128-d descriptor per crop path
    prepare_report.json     counts and per-photo failures with their reason
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from facegate.core.align import align
from facegate.core.detect import DlibDetector, select_face
from facegate.core.detect import dlib_model_file as find_dlib_model
from facegate.core.errors import FacegateError
from facegate.core.image import decode
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CROPS_CSV = "crops.csv"
REPORT_JSON = "prepare_report.json"
TEACHER_FILES = {"dlib": "teacher_dlib.npz"}
# Teacher vectors are flushed to disk this often so an interrupted run loses little.
TEACHER_FLUSH_EVERY = 250


@dataclass(frozen=True)
class Photo:
    """One source photo: its file, its identity, and where its crop goes (relative to OUT)."""

    path: Path
    identity: str
    source: str
    crop: str


@dataclass
class Outcome:
    """What happened to one photo in a worker."""

    photo: Photo
    score: float | None = None
    reason: str | None = None
    message: str | None = None
    teacher: np.ndarray | None = None


def list_photos(src: Path) -> list[Photo]:
    """Photos of SRC: a CSV of ``path,identity`` (paths relative to the CSV) or identity folders."""
    src = Path(src)
    if src.is_file():
        root = src.parent
        with open(src, newline="") as f:
            rows = [(root / row["path"], row["identity"]) for row in csv.DictReader(f)]
    elif src.is_dir():
        root = src
        rows = [
            (p, folder.name)
            for folder in sorted(d for d in src.iterdir() if d.is_dir())
            for p in sorted(folder.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        raise FileNotFoundError(f"no such photo folder or CSV: {src}")
    photos = []
    for path, identity in rows:
        source = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        photos.append(Photo(path, identity, source, f"{identity}/{path.stem}.png"))
    return photos


class DlibTeacher:
    """dlib's pretrained ResNet descriptor of a face, computed on the original photo.

    Uses the 68-point shape of the same box the detector chose, as dlib intends.
    """

    def __init__(self) -> None:
        import dlib

        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(find_dlib_model("shape_predictor_68_face_landmarks.dat")))
        self._net = dlib.face_recognition_model_v1(
            str(find_dlib_model("dlib_face_recognition_resnet_model_v1.dat"))
        )

    def describe(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        shape = self._shape(image, self._dlib.rectangle(x1, y1, x2, y2))
        return np.asarray(self._net.compute_face_descriptor(image, shape), dtype=np.float32)


class PhotoProcessor:
    """Decode, detect, align, write one photo's crop; held once per worker process."""

    def __init__(self, out: Path, *, cnn_fallback: bool, upsample: int, teacher: str | None) -> None:
        self.out = out
        self.detector = DlibDetector(upsample=upsample, cnn_fallback=cnn_fallback)
        self.teacher = DlibTeacher() if teacher == "dlib" else None

    def __call__(self, photo: Photo) -> Outcome:
        try:
            image = decode(photo.path.read_bytes())
            face = select_face(self.detector.detect(image), policy="largest")
        except FacegateError as err:
            return Outcome(photo, reason=err.code, message=err.message)
        except OSError as err:
            return Outcome(photo, reason="unreadable", message=str(err))
        crop = align(image, face.landmarks)
        target = self.out / photo.crop
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so an interrupted run never leaves a half-written crop to skip.
        partial = target.with_name(f".{target.name}.{os.getpid()}.png")
        if not cv2.imwrite(str(partial), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {partial}")
        partial.replace(target)
        teacher = self.teacher.describe(image, face.box) if self.teacher else None
        return Outcome(photo, score=float(face.score), teacher=teacher)


_processor: PhotoProcessor | None = None


def _init_worker(out: Path, options: dict[str, Any]) -> None:
    global _processor
    _processor = PhotoProcessor(out, **options)


def _process(photo: Photo) -> Outcome:
    assert _processor is not None, "worker not initialised"
    return _processor(photo)


def load_teacher(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def save_teacher(path: Path, vectors: dict[str, np.ndarray]) -> None:
    partial = path.with_name(f".{path.name}.partial.npz")
    np.savez(partial, **dict(sorted(vectors.items())))  # type: ignore[arg-type]  # keys are paths
    partial.replace(path)


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


def prepare(
    src: Path,
    out: Path,
    *,
    workers: int = 1,
    cnn_fallback: bool = True,
    upsample: int = 1,
    teacher: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict:
    """Crop every photo of SRC into OUT (resumably) and return the report it also writes."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    photos = list_photos(Path(src))
    crop_owner: dict[str, str] = {}
    for photo in photos:
        other = crop_owner.setdefault(photo.crop, photo.source)
        if other != photo.source:
            raise FacegateError(f"{photo.source} and {other} would both be cropped to {photo.crop}")

    teacher_path = out / TEACHER_FILES[teacher] if teacher else None
    teacher_vectors = load_teacher(teacher_path) if teacher_path else None
    rows = load_crop_rows(out / CROPS_CSV)
    failures = load_failures(out / REPORT_JSON)
    todo = pending_photos(
        photos, out, teacher_vectors=teacher_vectors, failures=failures, retry_failed=retry_failed
    )
    wanted = {p.source for p in photos}
    failures = {s: f for s, f in failures.items() if s in wanted}

    options: dict[str, Any] = {"cnn_fallback": cnn_fallback, "upsample": upsample, "teacher": teacher}
    workers = max(1, min(workers, len(todo)))
    new_ok, new_failed = 0, 0
    since_flush = 0
    bar = tqdm(total=len(todo), desc="prepare", unit="photo", disable=not progress)
    pool = None
    outcomes: Iterable[Outcome]
    if workers == 1 or not todo:
        outcomes = map(PhotoProcessor(out, **options), todo) if todo else []
    else:
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (out, options))
        outcomes = pool.imap_unordered(_process, todo, chunksize=2)
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
                    save_teacher(teacher_path, teacher_vectors)
                    save_crop_rows(out / CROPS_CSV, rows)
                    since_flush = 0
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        # Keep whatever finished, even when interrupted, so the next run resumes from it.
        if teacher_path is not None and teacher_vectors is not None:
            save_teacher(teacher_path, teacher_vectors)
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
        "detector": {"name": "dlib", "upsample": upsample, "cnn_fallback": cnn_fallback},
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
    parser.add_argument("--upsample", type=int, default=1, help="dlib HOG upsampling passes")
    parser.add_argument(
        "--no-cnn-fallback",
        dest="cnn_fallback",
        action="store_false",
        help="do not retry with dlib's CNN detector when HOG finds no face (faster, fewer crops)",
    )
    parser.add_argument("--teacher", choices=sorted(TEACHER_FILES), help="also store a teacher embedding per crop")
    parser.add_argument("--retry-failed", action="store_true", help="retry photos that failed in an earlier run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    report = prepare(
        args.src,
        args.out,
        workers=args.workers,
        cnn_fallback=args.cnn_fallback,
        upsample=args.upsample,
        teacher=args.teacher,
        retry_failed=args.retry_failed,
        progress=not args.quiet,
    )
    this_run = report["this_run"]
    print(
        f"{report['crops']}/{report['photos']} photos cropped ({report['crop_identities']} of "
        f"{report['identities']} identities); {report['failed']} failed {report['failures_by_reason']}; "
        f"this run: {this_run['processed']} processed ({this_run['ok']} ok, {this_run['failed']} failed), "
        f"{this_run['skipped']} skipped, {this_run['seconds']} s on {this_run['workers']} workers"
    )
    print(f"report: {Path(args.out) / REPORT_JSON}")
    return 0

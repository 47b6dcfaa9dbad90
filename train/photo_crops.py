"""One photo into one training crop: list a collection's photos, then decode, detect, crop
and write each one (with dlib's descriptor when a teacher is asked for), in a worker
process. ``train.prepare`` runs this over a collection, resumably."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from facegate.core.align import Geometry
from facegate.core.detect import LANDMARK_MODELS, DlibDetector, Landmarks
from facegate.core.detect import dlib_model_file as find_dlib_model
from facegate.core.errors import FacegateError
from facegate.core.face import prepare_face

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


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

    Uses the shape of the same box the detector chose, from the same predictor
    (``landmarks``: "5", dlib's recommended alignment for this network, or "68").
    """

    def __init__(self, landmarks: Landmarks = "5") -> None:
        import dlib

        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(find_dlib_model(LANDMARK_MODELS[landmarks])))
        self._net = dlib.face_recognition_model_v1(
            str(find_dlib_model("dlib_face_recognition_resnet_model_v1.dat"))
        )

    def describe(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        shape = self._shape(image, self._dlib.rectangle(x1, y1, x2, y2))
        return np.asarray(self._net.compute_face_descriptor(image, shape), dtype=np.float32)


class PhotoProcessor:
    """Decode, detect, crop by ``geometry``, write one photo's crop; held once per worker process."""

    def __init__(
        self,
        out: Path,
        *,
        geometry: Geometry,
        cnn_fallback: bool,
        upsample: int,
        teacher: str | None,
        landmarks: Landmarks = "5",
    ) -> None:
        self.out = out
        self.geometry = geometry
        self.detector = DlibDetector(
            upsample=upsample, boxes="hog+mmod" if cnn_fallback else "hog", landmarks=landmarks
        )
        self.teacher = DlibTeacher(landmarks) if teacher == "dlib" else None

    def __call__(self, photo: Photo) -> Outcome:
        try:
            prepared = prepare_face(
                photo.path.read_bytes(),
                self.detector,
                self.geometry,
                policy="largest",
                keep_image=self.teacher is not None,
            )
        except FacegateError as err:
            return Outcome(photo, reason=err.code, message=err.message)
        except OSError as err:
            return Outcome(photo, reason="unreadable", message=str(err))
        face, crop = prepared.face, prepared.crop
        target = self.out / photo.crop
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so an interrupted run never leaves a half-written crop to skip.
        partial = target.with_name(f".{target.name}.{os.getpid()}.png")
        if not cv2.imwrite(str(partial), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {partial}")
        partial.replace(target)
        teacher = None
        if self.teacher is not None:
            assert prepared.image is not None
            teacher = self.teacher.describe(prepared.image, face.box)
        return Outcome(photo, score=float(face.score), teacher=teacher)


_processor: PhotoProcessor | None = None


def init_worker(out: Path, options: dict[str, Any]) -> None:
    global _processor
    _processor = PhotoProcessor(out, **options)


def process_in_worker(photo: Photo) -> Outcome:
    assert _processor is not None, "worker not initialised"
    return _processor(photo)

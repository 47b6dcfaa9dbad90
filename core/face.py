"""The one path from image bytes to a model's input crop: decode -> detect -> select -> align.

The server (``server.pipeline``), training's ``facegate prepare``, export's parity
crops and ``facegate align`` all call :func:`prepare_face` with the geometry of the
model the crop is for, so training and serving cannot make different crops.
Also the command-line options every tool uses to name a geometry.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.align import DLIB_CHIP_150, GEOMETRY_METHODS, Geometry, align
from facegate.core.detect import (
    LANDMARK_MODELS,
    Detector,
    DlibDetector,
    Face,
    Landmarks,
    Policy,
    select_face,
)
from facegate.core.dlib_chip import dlib_chip_from_arcface, face_chip
from facegate.core.errors import NoFaceError
from facegate.core.image import decode_scaled
from facegate.core.photo import Photo
from facegate.core.plan import Located, locate_faces

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "GEOMETRY_FILE",
    "PreparedFace",
    "LANDMARK_CHOICES",
    "add_geometry_arguments",
    "align_face",
    "landmarks_for",
    "geometry_from_args",
    "prepare_face",
    "prepare_faces",
    "read_geometry_file",
    "write_geometry_file",
]

DEFAULT_MAX_BYTES = 10_000_000
DEFAULT_MAX_PIXELS = 40_000_000
# Seconds a photo's decode and detection may take before optional finer steps are
# skipped (core.plan); the server's FACEGATE_DETECT_BUDGET_S.
DEFAULT_DETECT_BUDGET_S = 2.5
# Written by `facegate prepare` into its crops folder: the geometry the crops were made with.
GEOMETRY_FILE = "geometry.json"


LANDMARK_CHOICES = ("auto", *LANDMARK_MODELS)


def landmarks_for(geometry: Geometry, choice: str = "auto") -> Landmarks:
    """The dlib landmark model to crop for ``geometry``: ``choice`` "5" or "68", or "auto".

    "auto" takes the 5-point model (public domain) for dlib chips, which are made from
    dlib's five points themselves, and the 68-point model (trained on iBUG 300-W:
    non-commercial) for the ArcFace template, because the 5-point model sees neither
    nose tip nor mouth corners and ArcFace-template models were trained on crops from
    measured points. Measured with models/default (2026.11.22, threshold 0.62) on 94
    same-person and 93 different-person CelebA pairs (of identities it was trained on):
    TAR 45.7% with derived points vs 56.4% with the 68-point ones, FAR 1.1% both,
    accuracy 72.2% vs 77.5%. Choose "5" to keep the 68-point model out of an
    ArcFace-template deployment, at that cost.
    """
    if choice == "auto":
        return "5" if geometry.method == "dlib_chip" else "68"
    if choice not in LANDMARK_MODELS:
        raise ValueError(f"landmarks must be one of {list(LANDMARK_CHOICES)}, got {choice!r}")
    return choice  # type: ignore[return-value]


def make_detector(geometry: Geometry, landmarks: str = "auto") -> Detector:
    """The server's default detector (dlib HOG, with the MMOD CNN where HOG finds no face)
    with the landmark model ``geometry`` needs."""
    return DlibDetector(boxes="hog+mmod", landmarks=landmarks_for(geometry, landmarks))


@dataclass(frozen=True)
class PreparedFace:
    """One image's chosen face, its crop, and what each step cost (seconds).

    ``face`` is in the upload's own (upright) pixels. ``image`` is the decoded photo
    only when asked for (``keep_image=True``), so a server does not hold every upload's
    pixels for the life of a request; it is at ``scale`` of the original (below 1 when
    the photo was over ``max_detect_pixels``), so its coordinates are ``face``'s times ``scale``.
    """

    face: Face
    faces_in_image: int
    crop: np.ndarray
    timings: dict[str, float]
    geometry: Geometry
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    scale: float = 1.0

    def face_dict(self) -> dict:
        return {**self.face.to_dict(), "faces_in_image": self.faces_in_image}


def prepare_face(
    data: bytes,
    detector: Detector,
    geometry: Geometry,
    *,
    policy: Policy | str = "largest",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_detect_pixels: int | None = None,
    decode_slot: AbstractContextManager[Any] | None = None,
    keep_image: bool = False,
    detect_budget_s: float = DEFAULT_DETECT_BUDGET_S,
) -> PreparedFace:
    """Decode ``data``, detect, select one face by ``policy`` and crop it by ``geometry``.

    A photo larger than the dlib detector's working size (``max_side``) is searched
    coarse to fine by face size (``core.plan``, within ``detect_budget_s``) on reduced
    decodes, and each face cropped from the photo's own pixels around it; smaller
    photos, other detectors and ``keep_image`` take the whole-image path: one decode
    (reduced when over ``max_detect_pixels``, holding ``decode_slot`` meanwhile:
    :func:`facegate.core.image.decode_scaled`), one ``detector.detect``. Either way the
    face comes back in the photo's own pixels. Raises the ``FacegateError`` of the
    failing step (undecodable, too large or degenerate image, no face, several faces
    under ``strict``, budget exceeded). The crop is ``(size, size, 3)`` uint8 RGB.
    """
    found = _locate(data, detector, geometry, max_bytes, max_pixels, max_detect_pixels,
                    decode_slot, detect_budget_s, keep_image)
    face = select_face([f.face for f in found.faces], policy=policy)  # type: ignore[arg-type]
    chosen = next(f for f in found.faces if f.face is face)
    return _crop(found, chosen, geometry, found.decode_s, found.detect_s,
                 found.image if keep_image else None)


def prepare_faces(
    data: bytes,
    detector: Detector,
    geometry: Geometry,
    *,
    max_faces: int,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_detect_pixels: int | None = None,
    decode_slot: AbstractContextManager[Any] | None = None,
    detect_budget_s: float = DEFAULT_DETECT_BUDGET_S,
) -> list[PreparedFace]:
    """Every face of the photo, largest first, at most ``max_faces`` of them (a crowd
    photo must not cost a crop and an embedding per face), each cropped by ``geometry``.

    The same decode, limits and errors as :func:`prepare_face` (no face: NoFaceError).
    The first face carries the photo's decode and detect time, every face its own align
    time, so summing the faces' timings counts each stage once.
    """
    if max_faces < 1:
        raise ValueError(f"max_faces must be >= 1, got {max_faces}")
    found = _locate(data, detector, geometry, max_bytes, max_pixels, max_detect_pixels,
                    decode_slot, detect_budget_s, False)
    if not found.faces:
        raise NoFaceError("no face found in the image")
    largest = sorted(found.faces, key=lambda f: f.face.area(), reverse=True)[:max_faces]
    return [
        _crop(found, located, geometry,
              found.decode_s if rank == 0 else 0.0, found.detect_s if rank == 0 else 0.0)
        for rank, located in enumerate(largest)
    ]


@dataclass(frozen=True)
class _Found:
    """Every face of one photo, what it cost, and (whole-image path) the decoded image."""

    faces: list[Located]
    decode_s: float
    detect_s: float
    image: np.ndarray | None = None
    scale: float = 1.0


def _crop(
    found: _Found,
    located: Located,
    geometry: Geometry,
    decode_s: float,
    detect_s: float,
    kept_image: np.ndarray | None = None,
) -> PreparedFace:
    """``located``'s crop from its own pixels, timed; the face in the photo's own pixels."""
    t0 = time.perf_counter()
    crop = align_face(located.pixels, located.local, geometry)
    return PreparedFace(
        face=located.face,
        faces_in_image=len(found.faces),
        crop=crop,
        timings={"decode": decode_s, "detect": detect_s, "align": time.perf_counter() - t0},
        geometry=geometry,
        image=kept_image,
        scale=found.scale,
    )


def align_face(image: np.ndarray, face: Face, geometry: Geometry) -> np.ndarray:
    """The crop ``geometry`` makes of ``face`` in ``image``: (size, size, 3) uint8.

    ``arcface_template`` uses ``face.landmarks`` (the ArcFace five); ``dlib_chip`` uses
    ``face.dlib5`` when the face has them (exactly dlib's chip) and otherwise maps the
    ArcFace five through ``dlib_chip.ARCFACE_IN_DLIB_FRAME`` (SCRFD faces).
    """
    if geometry.method == "arcface_template":
        return align(image, face.landmarks, geometry.size)
    if geometry.method == "dlib_chip":
        assert geometry.padding is not None
        dlib5 = getattr(face, "dlib5", None)
        if dlib5 is not None:
            return face_chip(image, dlib5, geometry.size, geometry.padding)
        return dlib_chip_from_arcface(image, face.landmarks, geometry.size, geometry.padding)
    raise ValueError(f"unknown geometry method {geometry.method!r}")


def _locate(
    data: bytes,
    detector: Detector,
    geometry: Geometry,
    max_bytes: int,
    max_pixels: int,
    max_detect_pixels: int | None,
    decode_slot: AbstractContextManager[Any] | None,
    budget_s: float,
    whole_image: bool,
) -> _Found:
    """The faces of the photo by the plan (large photos) or the whole-image path."""
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    t0 = time.perf_counter()
    photo = Photo(data, max_bytes=max_bytes, max_pixels=max_pixels,
                  max_detect_pixels=max_detect_pixels)
    planned = (isinstance(detector, DlibDetector) and detector.boxes != "mmod" and not whole_image
               and max(photo.width, photo.height) > detector.max_side)
    if planned:
        heavy = max_detect_pixels is not None and photo.pixels > max_detect_pixels
        with decode_slot if heavy and decode_slot is not None else nullcontext():
            started = time.perf_counter()  # the budget counts work, not the wait for the slot
            located, _ = locate_faces(photo, detector, budget_s=budget_s, started=started)  # type: ignore[arg-type]
        total = time.perf_counter() - started
        return _Found(located, photo.decode_s, total - photo.decode_s)
    image, scale = decode_scaled(data, max_bytes=max_bytes, max_pixels=max_pixels,
                                 max_detect_pixels=max_detect_pixels, slot=decode_slot)
    t1 = time.perf_counter()
    faces = detector.detect(image)
    located = [Located(face if scale == 1.0 else _scaled(face, 1.0 / scale), image, face)
               for face in faces]
    return _Found(located, t1 - t0, time.perf_counter() - t1, image, scale)


def _scaled(face: Face, factor: float) -> Face:
    """``face`` with its box and points multiplied by ``factor``."""
    x1, y1, x2, y2 = face.box
    return replace(
        face,
        box=(x1 * factor, y1 * factor, x2 * factor, y2 * factor),
        landmarks=face.landmarks * np.float32(factor),
        dlib5=None if face.dlib5 is None else face.dlib5 * np.float32(factor),
    )


def add_landmark_argument(parser: argparse.ArgumentParser) -> None:
    """``--landmarks``: the shape predictor to crop with (``landmarks_for`` resolves "auto")."""
    parser.add_argument(
        "--landmarks",
        choices=LANDMARK_CHOICES,
        default="auto",
        help="dlib shape predictor: 5-point (public domain) or 68-point (trained on iBUG 300-W: "
        "non-commercial licence); auto (the server's default): 5 for dlib chips, 68 for the "
        "ArcFace template",
    )


def add_geometry_arguments(parser: argparse.ArgumentParser, default: Geometry = DLIB_CHIP_150) -> None:
    """``--bundle`` (take the geometry from a bundle's manifest) or ``--geometry/--size/--padding``."""
    group = parser.add_argument_group(f"crop geometry (default: {default})")
    group.add_argument(
        "--bundle",
        dest="geometry_bundle",
        type=Path,
        help="make the crops this model bundle expects (its manifest's geometry)",
    )
    group.add_argument("--geometry", choices=GEOMETRY_METHODS, help="crop method")
    group.add_argument("--size", type=int, help="crop side in pixels (default: 150 dlib_chip, 112 arcface_template)")
    group.add_argument("--padding", type=float, help="dlib_chip padding (default 0.25)")
    parser.set_defaults(_default_geometry=default)


def geometry_from_args(args: argparse.Namespace) -> Geometry:
    """The geometry named by :func:`add_geometry_arguments`' options (ValueError if contradictory)."""
    bundle = getattr(args, "geometry_bundle", None)
    method = getattr(args, "geometry", None)
    size = getattr(args, "size", None)
    padding = getattr(args, "padding", None)
    if bundle is not None:
        if method is not None or size is not None or padding is not None:
            raise ValueError("--bundle sets the geometry; do not combine it with --geometry/--size/--padding")
        from facegate.core.bundle import load_bundle

        return load_bundle(bundle, verify=False).geometry
    default: Geometry = getattr(args, "_default_geometry", DLIB_CHIP_150)
    method = method or default.method
    if method == "dlib_chip":
        same = default.method == "dlib_chip"
        return Geometry(
            "dlib_chip",
            size if size is not None else (default.size if same else DLIB_CHIP_150.size),
            padding if padding is not None else (default.padding if same else DLIB_CHIP_150.padding),
        )
    if padding is not None:
        raise ValueError("--padding applies to --geometry dlib_chip only")
    same = default.method == "arcface_template"
    return Geometry("arcface_template", size if size is not None else (default.size if same else 112))


def write_geometry_file(folder: Path, geometry: Geometry, **details: Any) -> Path:
    """Record in ``folder/geometry.json`` the geometry (and e.g. the detector) its crops were made with."""
    path = Path(folder) / GEOMETRY_FILE
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({"geometry": geometry.to_dict(), **details}, indent=2) + "\n")
    partial.replace(path)
    return path


def read_geometry_file(folder: Path) -> Geometry | None:
    """The geometry a crops folder records, or None when it has no ``geometry.json``."""
    path = Path(folder) / GEOMETRY_FILE
    if not path.is_file():
        return None
    return Geometry.from_dict(json.loads(path.read_text())["geometry"])

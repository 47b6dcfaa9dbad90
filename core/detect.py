"""Face detection: boxes, scores and the landmarks each crop geometry needs.

The default detector is dlib's: HOG boxes, with dlib's MMOD CNN (run by ONNX Runtime,
``facegate.core.mmod``) for photos where HOG finds no face, plus dlib's 5-point shape
predictor (``shape_predictor_5_face_landmarks.dat``), because all of them ship as files
in registry packages (dlib-bin, face_recognition_models), run offline on CPU and are
licence-clean: dlib is Boost-licensed, and Davis King released the 5-point model
(trained on his own 7198-face annotations) and the MMOD network into the public domain
(CC0; see the dlib-models README). The 68-point predictor (``landmarks="68"``) stays
available, but it was trained on iBUG 300-W, whose licence excludes commercial use
(its authors ask that the model not be used in commercial products), so it is not
the default. SCRFD (facegate.core.scrfd) is the GPU alternative; all return the same
`Face` objects.

A `Face` always carries the five ArcFace points (``landmarks``: eye centres, nose
tip, mouth corners; the API's JSON and the ArcFace-template geometry use them) and,
from dlib's detector, dlib's five parts (``dlib5``: eye corners and nose base; the
dlib-chip geometry uses them). With the 5-point predictor the ArcFace points are
derived (``align.arcface_from_dlib5``: eye centres from the detected corners, nose
tip and mouth corners from the average face), so ArcFace-template crops from them
are approximate; with the 68-point predictor they are measured and ``dlib5`` is taken
from the 68 points that dlib's five correspond to.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
from facegate.core.dlib_chip import arcface_from_dlib5
from facegate.core.errors import MultipleFacesError, NoFaceError

Box = tuple[float, float, float, float]
Policy = Literal["largest", "strict"]
Landmarks = Literal["5", "68"]
BoxFinder = Literal["hog", "mmod", "hog+mmod"]
BOX_FINDERS: tuple[BoxFinder, ...] = ("hog", "mmod", "hog+mmod")
# The MMOD CNN's input (after upsampling) is kept under this many pixels; see mmod_upsample.
MMOD_MAX_PIXELS = 2_000_000
LANDMARK_MODELS: dict[str, str] = {
    "5": "shape_predictor_5_face_landmarks.dat",  # public domain (Davis King's own annotations)
    "68": "shape_predictor_68_face_landmarks.dat",  # trained on iBUG 300-W: no commercial use
}
# Indices of the 68-point layout that dlib's five parts correspond to, in dlib's order:
# image-right eye outer and inner corner, image-left eye outer and inner corner, nose base.
DLIB5_FROM_68 = (45, 42, 36, 39, 33)


@dataclass(frozen=True)
class Face:
    """One detected face in image pixel coordinates.

    ``landmarks`` are the ArcFace five, (5, 2) float32, image-left first: left eye
    centre, right eye centre, nose tip, left and right mouth corner. ``dlib5`` are
    dlib's five shape parts, (5, 2) float32 in dlib's order, or None when the
    detector has none (SCRFD).
    """

    box: Box
    score: float
    landmarks: np.ndarray
    dlib5: np.ndarray | None = None
    # The detector step that found it ("hog0", "hog1", "mmod": each later one means a
    # harder face, which core.quality uses); None for detectors without steps (SCRFD).
    stage: str | None = None

    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (coordinates rounded to 1/1000 px)."""
        return {
            "box": [round(float(v), 3) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": [[round(float(x), 3), round(float(y), 3)] for x, y in self.landmarks],
        }


class Detector(Protocol):
    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB image, best first."""
        ...


def five_points_from_68(shape68: np.ndarray) -> np.ndarray:
    """ArcFace five points from the iBUG 68-point layout: eye centres, nose tip, mouth corners.

    Eye centres are the mean of each eye's six contour points (36-41, 42-47),
    which is closer to the pupil than either eye corner; the nose tip is point
    30 and the mouth corners are 48 and 54. Pairs are ordered image-left first.
    """
    pts = np.asarray(shape68, dtype=np.float32)
    if pts.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {pts.shape}")
    eye_a, eye_b = pts[36:42].mean(axis=0), pts[42:48].mean(axis=0)
    mouth_a, mouth_b = pts[48], pts[54]
    if eye_a[0] > eye_b[0]:
        eye_a, eye_b = eye_b, eye_a
    if mouth_a[0] > mouth_b[0]:
        mouth_a, mouth_b = mouth_b, mouth_a
    return np.stack([eye_a, eye_b, pts[30], mouth_a, mouth_b]).astype(np.float32)


def dlib_model_file(name: str) -> Path:
    """A model file from face_recognition_models, found without importing it (its import needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.is_file():
        raise RuntimeError(f"dlib model file missing: {path}")
    return path


class _DlibModels:
    """Models loaded once per process, on first use.

    Shape predictors (5-point ~9 MB, 68-point ~100 MB) and the MMOD network's ONNX Runtime
    session (whose ``run`` is thread-safe) are shared; dlib documents object detectors as
    unsafe for concurrent use, so each thread gets its own HOG detector (cheap to build).
    """

    _lock = threading.Lock()
    _predictors: dict[str, Any] = {}
    _mmod: Any = None
    _local = threading.local()

    @classmethod
    def predictor(cls, landmarks: str = "5") -> Any:
        predictor = cls._predictors.get(landmarks)
        if predictor is None:
            with cls._lock:
                predictor = cls._predictors.get(landmarks)
                if predictor is None:
                    import dlib

                    path = dlib_model_file(LANDMARK_MODELS[landmarks])
                    predictor = cls._predictors[landmarks] = dlib.shape_predictor(str(path))
        return predictor

    @classmethod
    def hog(cls) -> Any:
        detector = getattr(cls._local, "hog", None)
        if detector is None:
            import dlib

            detector = cls._local.hog = dlib.get_frontal_face_detector()
        return detector

    @classmethod
    def mmod(cls) -> Any:
        if cls._mmod is None:
            with cls._lock:
                if cls._mmod is None:
                    from facegate.core.mmod import MmodDetector, mmod_onnx

                    cls._mmod = MmodDetector(mmod_onnx())
        return cls._mmod


class DlibDetector:
    """dlib's face detectors (HOG, the MMOD CNN, or HOG with the CNN as fallback) + dlib's
    5-point (default) or 68-point shape predictor.

    ``boxes="hog"``: the HOG frontal detector at ``upsample``. ``"mmod"``: dlib's MMOD CNN
    (``mmod_human_face_detector.dat``, public domain) run by ONNX Runtime
    (``facegate.core.mmod``: the boxes of ``dlib.cnn_face_detection_model_v1``, 7-9x
    faster). ``"hog+mmod"``: HOG at upsampling 0, then 1, ... up to ``upsample``, stopping
    at the first step that finds a face, then the CNN at ``upsample`` for photos where HOG
    found none. On the 5,221 shared CelebA photos this finds a face in 99.5% of them
    (HOG at 1: 95.7%) in less time than HOG at 1 alone, because most photos stop at
    upsampling 0 (docs/mmod.md).

    ``landmarks="5"``: ``shape_predictor_5_face_landmarks.dat`` (public domain); ``dlib5`` are its
    parts and ``landmarks`` the ArcFace five derived from them (approximate nose tip and
    mouth corners). ``landmarks="68"``: ``shape_predictor_68_face_landmarks.dat``
    (trained on iBUG 300-W, whose licence excludes commercial use); ``landmarks`` from
    ``five_points_from_68`` and ``dlib5`` the 68 points 45, 42, 36, 39, 33.
    Images whose longer side exceeds `max_side` are downscaled for the box search
    (detection time grows with pixels); landmarks are then fitted on the full-resolution
    image inside the mapped-back box. Scores are the HOG SVM margin or the CNN's
    confidence, not probabilities. Faces are sorted largest first.
    """

    def __init__(
        self,
        upsample: int = 1,
        boxes: BoxFinder = "hog",
        max_side: int = 1024,
        landmarks: Landmarks = "5",
    ) -> None:
        if upsample < 0 or max_side < 64:
            raise ValueError("upsample must be >= 0 and max_side >= 64")
        if landmarks not in LANDMARK_MODELS:
            raise ValueError(f"landmarks must be one of {sorted(LANDMARK_MODELS)}, got {landmarks!r}")
        if boxes not in BOX_FINDERS:
            raise ValueError(f"boxes must be one of {list(BOX_FINDERS)}, got {boxes!r}")
        self.landmarks = landmarks
        self.upsample = upsample
        self.boxes = boxes
        self.max_side = max_side

    def detect(self, image: np.ndarray) -> list[Face]:
        image = _check_image(image)
        small, scale = _downscale(image, self.max_side)
        found, stage = self._find_boxes(small)
        boxes = [((x1 / scale, y1 / scale, x2 / scale, y2 / scale), s) for (x1, y1, x2, y2), s in found]
        return self.fit_landmarks(image, boxes, stage)

    def fit_landmarks(self, image: np.ndarray, boxes: list[tuple[Box, float]],
                      stage: str | None = None) -> list[Face]:
        """A Face per (box, score) in ``image``'s pixels: the shape predictor inside each box;
        ``stage`` names the detector step that found the boxes."""
        predictor = _DlibModels.predictor(self.landmarks)
        import dlib

        faces = []
        for box, score in boxes:
            rect = dlib.rectangle(*(int(round(v)) for v in box))
            shape = predictor(image, rect)
            pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            if self.landmarks == "68":
                five, dlib5 = five_points_from_68(pts), pts[list(DLIB5_FROM_68)].copy()
            else:
                five, dlib5 = arcface_from_dlib5(pts), pts
            faces.append(Face(box=box, score=float(score), landmarks=five, dlib5=dlib5, stage=stage))
        faces.sort(key=Face.area, reverse=True)
        return faces

    def _find_boxes(self, image: np.ndarray) -> tuple[list[tuple[Box, float]], str]:
        """The boxes and the step that found them (``Face.stage``)."""
        if self.boxes == "hog":
            return self.hog_boxes(image, self.upsample), f"hog{self.upsample}"
        if self.boxes == "hog+mmod":
            for upsample in range(self.upsample + 1):
                found = self.hog_boxes(image, upsample)
                if found:
                    return found, f"hog{upsample}"
        return self.mmod_boxes(image, mmod_upsample(image.shape, self.upsample)), "mmod"

    @staticmethod
    def hog_boxes(image: np.ndarray, upsample: int) -> list[tuple[Box, float]]:
        rects, scores, _ = _DlibModels.hog().run(image, upsample, 0.0)
        return [
            ((float(r.left()), float(r.top()), float(r.right()), float(r.bottom())), float(s))
            for r, s in zip(rects, scores, strict=True)
        ]

    @staticmethod
    def mmod_boxes(image: np.ndarray, upsample: int) -> list[tuple[Box, float]]:
        return [((x1, y1, x2, y2), score) for x1, y1, x2, y2, score in _DlibModels.mmod().detect(image, upsample)]


def mmod_upsample(shape: tuple[int, ...], upsample: int) -> int:
    """``upsample``, or fewer steps where the doubled image would exceed ``MMOD_MAX_PIXELS``:
    the CNN's time and memory grow with its input's pixels, and a photo that large holds
    faces big enough to find without upsampling."""
    h, w = shape[:2]
    while upsample > 0 and h * w * 4**upsample > MMOD_MAX_PIXELS:
        upsample -= 1
    return upsample


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be an (H, W, 3) uint8 RGB array")
    return np.ascontiguousarray(image)


def _downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink so the longer side is at most max_side; returns (image, scale applied)."""
    longer = max(image.shape[:2])
    if longer <= max_side:
        return image, 1.0
    scale = max_side / longer
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    # Use the realised scale so boxes map back exactly.
    return np.ascontiguousarray(small), small.shape[1] / w


def select_face(faces: list[Face], policy: Policy = "largest") -> Face:
    """Pick the face to use: the largest, or (strict) the only one."""
    if policy not in ("largest", "strict"):
        raise ValueError(f"unknown face policy {policy!r}")
    if not faces:
        raise NoFaceError("no face found in the image")
    if policy == "strict" and len(faces) > 1:
        raise MultipleFacesError(f"expected one face, found {len(faces)}")
    return max(faces, key=Face.area)


def create_detector(name: str = "dlib", **options: Any) -> Detector:
    """Build a detector by name: "dlib" (options as DlibDetector, e.g. boxes="hog+mmod",
    landmarks="5"|"68") or "scrfd" (path=... required)."""
    if name == "dlib":
        return DlibDetector(**options)
    if name == "scrfd":
        from facegate.core.scrfd import ScrfdDetector

        path = options.pop("path", None) or options.pop("model_path", None)
        if path is None:
            raise ValueError("the scrfd detector needs path=<model.onnx>")
        return ScrfdDetector(path, **options)
    raise ValueError(f"unknown detector {name!r} (expected 'dlib' or 'scrfd')")

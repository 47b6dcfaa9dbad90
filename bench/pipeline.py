"""Part 1, pipeline: one verify (two real photos) stage by stage, facegate vs its peers.

- facegate: ``core.face.prepare_face`` (``core.image.decode`` -> ``core.detect.DlibDetector``:
  HOG, then the MMOD CNN where HOG finds nothing, + dlib's landmarks, as the server -> ``core.face.align_face``
  in the bundle's geometry) -> ``core.embed`` on ORT CPU.
- face_recognition / dlib, rebuilt from the installed model files exactly as
  ``face_recognition.face_encodings`` runs them: PIL decode, HOG (upsample 1), the
  5-point shape predictor, ``get_face_chip`` (150 px) and the dlib ResNet descriptor.
  (face_recognition calls chip extraction inside ``compute_face_descriptor``; here it
  is called separately so align and embed are timed apart; the work is the same.)
- insightface ``FaceAnalysis`` (SCRFD + ArcFace), only when ``FACEGATE_INSIGHTFACE_PACK``
  names a model pack folder (e.g. ``~/.insightface/models/buffalo_l``); no download.
"""

from __future__ import annotations

import importlib.util
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.assets import bundle_info, photo_pairs, resolve_bundle
from bench.measure import summarise
from bench.report import fmt, ratio, table

SIZES = {"full": {"pairs": 60}, "smoke": {"pairs": 2}}
STAGES = ("decode", "detect", "align", "embed")
SLOWER_BECAUSE = {
    "decode": " (facegate sniffs the format, checks size and pixel limits and applies EXIF "
              "orientation before decoding)",
    "align": " (both call dlib.get_face_chip; facegate first checks the landmarks and builds "
             "dlib's shape object from them: about 0.1 ms)",
    "detect": " (where HOG finds no face facegate runs dlib's MMOD CNN, where face_recognition "
              "gives up and leaves the pair out)",
}
Stages = Callable[[bytes], tuple[np.ndarray, dict[str, float]]]


def dlib_model_file(name: str) -> Path:
    """A file of face_recognition_models, found without importing it (needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / name


def facegate_stages(bundle_path: Path) -> Stages:
    from facegate.core.bundle import load_bundle
    from facegate.core.embed import create_embedder
    from facegate.core.face import make_detector, prepare_face

    bundle = load_bundle(bundle_path)
    detector = make_detector(bundle.geometry)  # as the server
    # flip on, as the server embeds by default
    embedder = create_embedder(bundle, runtime="onnxruntime-cpu", flip=True)

    def run(data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        prepared = prepare_face(data, detector, bundle.geometry)
        t3 = time.perf_counter()
        vector = embedder.embed(prepared.crop[None])[0]
        t4 = time.perf_counter()
        return vector, {**prepared.timings, "embed": t4 - t3}

    return run


def dlib_stages() -> Stages:
    import dlib
    from PIL import Image

    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))
    encoder = dlib.face_recognition_model_v1(
        str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat"))
    )

    def run(data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        t0 = time.perf_counter()
        image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # load_image_file
        t1 = time.perf_counter()
        rects = hog(image, 1)
        if not len(rects):
            raise LookupError("dlib found no face")
        rect = max(rects, key=lambda r: r.area())
        shape = predictor(image, rect)
        t2 = time.perf_counter()
        chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
        t3 = time.perf_counter()
        vector = np.asarray(encoder.compute_face_descriptor(chip), dtype=np.float32)
        t4 = time.perf_counter()
        return vector, {"decode": t1 - t0, "detect": t2 - t1, "align": t3 - t2, "embed": t4 - t3}

    return run


def insightface_stages(pack: Path) -> Stages:
    """insightface's SCRFD detector and recognition model from a local pack (no download)."""
    import cv2
    from insightface.model_zoo import get_model
    from insightface.utils import face_align

    models = {}
    for onnx_file in sorted(pack.glob("*.onnx")):
        model = get_model(str(onnx_file), providers=["CPUExecutionProvider"])
        if model is not None and model.taskname in ("detection", "recognition"):
            models.setdefault(model.taskname, model)
    if set(models) != {"detection", "recognition"}:
        raise RuntimeError(f"{pack}: needs a detection and a recognition model")
    models["detection"].prepare(ctx_id=-1, input_size=(640, 640), det_thresh=0.5)
    models["recognition"].prepare(ctx_id=-1)

    def run(data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        t0 = time.perf_counter()
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # BGR, as insightface
        t1 = time.perf_counter()
        boxes, kpss = models["detection"].detect(image, max_num=1, metric="default")
        if not len(boxes):
            raise LookupError("insightface found no face")
        t2 = time.perf_counter()
        crop = face_align.norm_crop(image, landmark=kpss[0])
        t3 = time.perf_counter()
        vector = models["recognition"].get_feat(crop)[0]
        t4 = time.perf_counter()
        return vector / np.linalg.norm(vector), {
            "decode": t1 - t0, "detect": t2 - t1, "align": t3 - t2, "embed": t4 - t3}

    return run


def verify_pair(stages: Stages, a: bytes, b: bytes) -> tuple[float, list[dict], float] | None:
    """(seconds, per-image stage timings, cosine) of one verify, or None if a photo had no face."""
    try:
        start = time.perf_counter()
        (va, ta), (vb, tb) = stages(a), stages(b)
        similarity = float(np.dot(va, vb) / (np.linalg.norm(va) * np.linalg.norm(vb)))
        return time.perf_counter() - start, [ta, tb], similarity
    except LookupError:
        return None
    except Exception as exc:  # noqa: BLE001 - facegate's NoFaceError and friends
        if type(exc).__name__ not in ("NoFaceError", "MultipleFacesError"):
            raise
        return None


def measure_verify(systems: dict[str, Stages], pairs: list[tuple[bytes, bytes]]) -> dict:
    """Per-stage and per-verify latency of each system over `pairs`, interleaved: every pair
    goes through all systems before the next, so a slow spell of a shared machine hits them
    alike. A pair where a system finds no face is counted for it, not timed."""
    per_stage = {name: {s: [] for s in STAGES} for name in systems}
    totals: dict[str, list[float]] = {name: [] for name in systems}
    similarities: dict[str, list[float]] = {name: [] for name in systems}
    failed = dict.fromkeys(systems, 0)
    for stages in systems.values():
        stages(pairs[0][0])  # warm-up: model loading and first-call costs are not a verify
    for a, b in tqdm(pairs, desc="verify", unit="pair", leave=False):
        for name, stages in systems.items():
            done = verify_pair(stages, a, b)
            if done is None:
                failed[name] += 1
                continue
            seconds, timings, similarity = done
            totals[name].append(seconds)
            similarities[name].append(similarity)
            for image in timings:
                for stage in STAGES:
                    per_stage[name][stage].append(image[stage])
    return {name: {
        "stages": {s: summarise(v) for s, v in per_stage[name].items()},
        "verify": summarise(totals[name]),
        "pairs_without_face": failed[name],
        "same_person_similarity_mean": (float(np.mean(similarities[name]))
                                        if similarities[name] else None),
    } for name in systems}


def run(sizes: dict, workdir: Path) -> dict:
    bundle_path, stand_in = resolve_bundle(workdir)
    pairs = [(a.read_bytes(), b.read_bytes()) for a, b in photo_pairs(sizes["pairs"])]
    stages = {"facegate": facegate_stages(bundle_path), "face_recognition (dlib)": dlib_stages()}
    pack = os.environ.get("FACEGATE_INSIGHTFACE_PACK")
    skipped = {}
    if pack:
        stages["insightface FaceAnalysis"] = insightface_stages(Path(pack))
    else:
        skipped["insightface FaceAnalysis"] = (
            "skipped: set FACEGATE_INSIGHTFACE_PACK to a local model pack folder "
            "(nothing is downloaded)")
    return {
        "pairs": len(pairs),
        "model": bundle_info(bundle_path, stand_in),
        "systems": measure_verify(stages, pairs),
        "skipped": skipped,
    }


def markdown(result: dict) -> str:
    systems = result["systems"]
    peer = "face_recognition (dlib)"
    names = list(systems)
    headers = ["stage (per image)"] + [f"{n} p50 / p95 ms" for n in names] + [
        "facegate / dlib (p50)"]
    rows = []
    for stage in (*STAGES, "verify"):
        cells = []
        for name in names:
            s = systems[name]["verify" if stage == "verify" else "stages"]
            s = s if stage == "verify" else s[stage]
            cells.append(f"{fmt(s['p50_ms'])} / {fmt(s['p95_ms'])}")
        label = "whole verify (2 images + cosine)" if stage == "verify" else stage
        rows.append([label, *cells, _p50_ratio(systems, peer, stage)])
    model = result["model"]
    text = (
        f"One verify of two real photos of the same person ({result['pairs']} pairs from "
        f"the shared CelebA subset, one warm-up call first; each pair goes through every "
        f"system before the next pair), timed per stage. "
        f"facegate runs `{model['model_id']}` ({model['embedding_size']}-d) on ORT CPU "
        f"with flip (crop + mirror, the server default)"
        + (" (an untrained stand-in MobileFaceNet: speed only)" if model["stand_in"] else "")
        + "; face_recognition is rebuilt from dlib and face_recognition_models "
        "(HOG upsample 1, 5-point shape predictor, 150 px chip, dlib ResNet). "
        "facegate's detect stage is the server's: HOG at upsampling 0, then 1, then dlib's "
        "MMOD CNN (ONNX Runtime) where HOG found nothing, plus the shape predictor the bundle "
        "needs; dlib's is HOG at 1 plus the 5-point predictor. A pair where a system found no "
        "face is left out of that system's timings.\n\n"
    )
    text += table(headers, rows)
    missed = {n: s["pairs_without_face"] for n, s in systems.items() if s["pairs_without_face"]}
    if missed:
        text += f"\nPairs left out because a photo had no detected face: {missed}.\n"
    for name, why in result["skipped"].items():
        text += f"\n{name}: {why}.\n"
    slower = [
        stage for stage in (*STAGES, "verify")
        if _p50_ratio(systems, peer, stage) > 1.05
    ]
    for stage in slower:
        r = _p50_ratio(systems, peer, stage)
        what = "a whole verify" if stage == "verify" else f"the {stage} stage"
        text += (f"\nfacegate is slower than face_recognition on {what}: {r:.2f}x its p50"
                 f"{SLOWER_BECAUSE.get(stage, '')}.\n")
    return text


def _p50_ratio(systems: dict, peer: str, stage: str) -> float:
    def p50(name: str) -> float:
        s = systems[name]
        return s["verify"]["p50_ms"] if stage == "verify" else s["stages"][stage]["p50_ms"]

    return ratio(p50("facegate"), p50(peer))

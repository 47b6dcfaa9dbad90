"""Part: phone-size photos, facegate vs face_recognition in the same run.

The set (``bench.phone_set``): the first shared photo of each of the first identities
in which facegate finds exactly one face, each placed at several face widths (its box)
into 1, 3 and 12 MP frames, plus insightface's bundled 6-face group photo as it is and
enlarged to 12 MP. Every photo goes through both systems back to back:

- facegate: ``core.face.prepare_face`` with the server's detector and limits
  (``max_detect_pixels`` 4 MP), so the plan of ``core.plan``; stage times from it.
- face_recognition: ``face_locations`` + ``face_landmarks`` as it runs them, rebuilt
  from the installed model files as in ``bench.pipeline``: PIL decode of the whole
  photo, HOG at upsample 1 on it, the 5-point predictor.

A face counts as found when a returned box overlaps the placed one by IoU > 0.3. Then a
real server over HTTP: verify of same-person pairs as the small CelebA photos and as
12 MP photos with 600 px faces (interleaved), and ``/v1/embed`` of 100 px faces in 3
and 12 MP photos.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.assets import photo_pairs, resolve_bundle
from bench.measure import summarise
from bench.phone_set import FRAMES, iou, place
from bench.pipeline import dlib_model_file
from bench.report import fmt, ratio, table
from bench.server import Server, loopback_client

SIZES = {
    "full": {"photos": 5, "face_px": [40, 60, 100, 400], "pairs": 6, "rounds": 3},
    "smoke": {"photos": 1, "face_px": [200], "pairs": 1, "rounds": 1},
}
STAGES = ("decode", "detect", "align")


def _facegate():
    from facegate.core.align import DLIB_CHIP_150
    from facegate.core.errors import FacegateError
    from facegate.core.face import make_detector, prepare_faces

    detector = make_detector(DLIB_CHIP_150)

    def run(data: bytes) -> tuple[list[tuple], dict[str, float]]:
        try:
            faces = prepare_faces(data, detector, DLIB_CHIP_150, max_faces=16,
                                  max_detect_pixels=4_000_000)
        except FacegateError:
            return [], {}
        return [f.face.box for f in faces], faces[0].timings

    return run


def _face_recognition():
    import dlib

    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))

    def run(data: bytes) -> tuple[list[tuple], dict[str, float]]:
        t0 = time.perf_counter()
        image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # load_image_file
        t1 = time.perf_counter()
        rects = hog(image, 1)  # face_locations(model="hog")
        t2 = time.perf_counter()
        for rect in rects:
            predictor(image, rect)  # face_landmarks(model="small")
        t3 = time.perf_counter()
        boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
        return boxes, {"decode": t1 - t0, "detect": t2 - t1, "align": t3 - t2}

    return run


def _sources(n: int) -> list[tuple[Path, Image.Image, tuple]]:
    """(path, photo, facegate's face box) of the first ``n`` identities' one-face photos."""
    from facegate.core.align import DLIB_CHIP_150
    from facegate.core.face import make_detector, prepare_faces

    from bench.assets import photos_by_identity

    detector = make_detector(DLIB_CHIP_150)
    out = []
    for paths in photos_by_identity().values():
        data = paths[0].read_bytes()
        faces = prepare_faces(data, detector, DLIB_CHIP_150, max_faces=4)
        if len(faces) == 1:
            out.append((paths[0], Image.open(io.BytesIO(data)), faces[0].face.box))
        if len(out) == n:
            break
    return out


def detection(sizes: dict) -> dict:
    systems = {"facegate": _facegate(), "face_recognition": _face_recognition()}
    cells: dict[str, dict] = {}
    for seed, (path, photo, box) in enumerate(_sources(sizes["photos"])):
        photos = [("small", "as shot", path.read_bytes(), box)]
        for frame, size in FRAMES.items():
            for face_px in sizes["face_px"]:
                placed = place(photo, box, face_px, size, seed)
                if placed is not None:
                    photos.append((frame, face_px, *placed))
        for frame, face_px, data, expected in photos:
            for name, run in systems.items():
                t0 = time.perf_counter()
                boxes, stages = run(data)
                seconds = time.perf_counter() - t0
                cell = cells.setdefault(f"{name}|{frame}|{face_px}", {"found": 0, "n": 0, "s": [],
                                                                       **{k: [] for k in STAGES}})
                cell["n"] += 1
                cell["found"] += any(iou(b, expected) > 0.3 for b in boxes)
                cell["s"].append(seconds)
                for k in STAGES:
                    cell[k].append(stages.get(k, float("nan")))
    return {key: {"found": c["found"], "n": c["n"], "p50_ms": summarise(c["s"])["p50_ms"],
                  **{f"{k}_ms": float(np.nanmedian(c[k]) * 1000) if not np.isnan(c[k]).all()
                     else float("nan") for k in STAGES}}
            for key, c in cells.items()}


def group_photo() -> dict:
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    root = Path(next(iter(spec.submodule_search_locations)))  # type: ignore[union-attr]
    photo = Image.open(sorted(root.glob("data/images/t1.*"))[0]).convert("RGB")
    big = photo.resize((4000, round(photo.height * 4000 / photo.width)), Image.Resampling.BICUBIC)
    out = {}
    for name, run in {"facegate": _facegate(), "face_recognition": _face_recognition()}.items():
        for label, img in (("as shipped", photo), ("enlarged to 12 MP", big)):
            t0 = time.perf_counter()
            boxes, _ = run(photo_bytes(img))
            out[f"{name}|{label}"] = {"faces": len(boxes), "ms": (time.perf_counter() - t0) * 1000,
                                      "size": f"{img.width}x{img.height}"}
    return out


def photo_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def over_http(sizes: dict, workdir: Path) -> dict:
    """Verify p50 of small vs 12 MP pairs, and /v1/embed of 100 px faces, on a real server."""
    from facegate.core.align import DLIB_CHIP_150
    from facegate.core.errors import FacegateError
    from facegate.core.face import make_detector, prepare_face

    detector = make_detector(DLIB_CHIP_150)
    pairs = []
    for seed, (a, b) in enumerate(photo_pairs(sizes["pairs"] * 2)):
        try:
            small = [p.read_bytes() for p in (a, b)]
            boxes = [prepare_face(d, detector, DLIB_CHIP_150).face.box for d in small]
        except FacegateError:
            continue
        large = [place(Image.open(io.BytesIO(d)), box, 600, FRAMES["12 MP"], seed + i)
                 for i, (d, box) in enumerate(zip(small, boxes, strict=True))]
        if all(x is not None for x in large):
            pairs.append((small, [x[0] for x in large]))  # type: ignore[index]
        if len(pairs) == sizes["pairs"]:
            break
    probes = [(frame, place(photo, box, 100, FRAMES[frame], seed))
              for seed, (_, photo, box) in enumerate(_sources(sizes["photos"])) for frame in ("3 MP", "12 MP")]
    bundle, _ = resolve_bundle(workdir)
    server = Server(bundle, workdir / "phone.sqlite", {}, log=workdir / "phone-server.log")
    times: dict[str, list[float]] = {"small": [], "12 MP": [], "3 MP 100 px": [], "12 MP 100 px": []}
    found = {"3 MP 100 px": 0, "12 MP 100 px": 0}
    try:
        with loopback_client(server.url) as client:
            for (a, b), _ in pairs[:1]:  # warm-up
                client.post("/v1/verify", files={"image1": ("a.jpg", a), "image2": ("b.jpg", b)})
            for round_ in range(sizes["rounds"]):
                for small, large in pairs:
                    for label, (a, b) in (("small", small), ("12 MP", large))[:: 1 if round_ % 2 else -1]:
                        t0 = time.perf_counter()
                        r = client.post("/v1/verify", files={"image1": ("a.jpg", a), "image2": ("b.jpg", b)})
                        if r.status_code == 200:
                            times[label].append(time.perf_counter() - t0)
            for frame, (data, expected) in probes:  # type: ignore[misc]
                label = f"{frame} 100 px"
                t0 = time.perf_counter()
                r = client.post("/v1/embed", files={"image": ("p.jpg", data)})
                times[label].append(time.perf_counter() - t0)
                found[label] += r.status_code == 200 and iou(r.json()["faces"][0]["box"], expected) > 0.3
    finally:
        server.stop()
    return {"verify": {k: summarise(times[k]) for k in ("small", "12 MP")},
            "embed_100px": {k: {**summarise(times[k]), "found": found[k]} for k in found}}


def run(sizes: dict, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    return {"sizes": sizes, "detection": detection(sizes), "group": group_photo(),
            "http": over_http(sizes, workdir)}


def markdown(result: dict) -> str:
    det, http = result["detection"], result["http"]
    rows = []
    keys = sorted({k.split("|", 1)[1] for k in det}, key=lambda k: (
        ("small", "1 MP", "3 MP", "12 MP").index(k.split("|")[0]), str(k.split("|")[1]).zfill(5)))
    for key in keys:
        fg, fr = det.get(f"facegate|{key}"), det.get(f"face_recognition|{key}")
        if fg is None or fr is None:
            continue
        frame, face_px = key.split("|")
        rows.append([frame, face_px, f"{fg['found']}/{fg['n']}", f"{fr['found']}/{fr['n']}",
                     fg["p50_ms"], fr["p50_ms"], ratio(fg["p50_ms"], fr["p50_ms"]),
                     *(f"{fmt(fg[f'{k}_ms'])} / {fmt(fr[f'{k}_ms'])}" for k in STAGES)])
    v = http["verify"]
    group = result["group"]
    from facegate.core.align import DLIB_CHIP_150
    from facegate.core.face import make_detector
    from facegate.core.plan import smallest_face

    detector = make_detector(DLIB_CHIP_150)
    guaranteed = ", ".join(f"{frame} {smallest_face(*size, detector):.0f} px"
                           for frame, size in FRAMES.items())
    lines = [
        "Phone-size photos (`bench/phone.py`). " + (__doc__ or "").split("\n\n", 1)[1].strip() + "\n",
        f"The smallest face facegate always searches for (`core.plan.smallest_face`): {guaranteed}.\n",
        "Faces found and per-photo time (p50 ms; stages p50, facegate / face_recognition; "
        "facegate's detect includes its landmarks and its align is the crop, face_recognition's "
        "align is its landmarks):\n",
        table(["photo", "face px", "facegate found", "face_recognition found", "facegate ms",
               "face_recognition ms", "ratio", "decode ms", "detect ms", "align ms"], rows),
        "insightface's group photo (6 faces):\n",
        table(["system", "photo", "size", "faces", "ms"],
              [[k.split("|")[0], k.split("|")[1], g["size"], g["faces"], g["ms"]] for k, g in group.items()]),
        f"Real server over HTTP (default settings): verify of two small CelebA photos p50 "
        f"{fmt(v['small']['p50_ms'])} ms (n={v['small']['n']}), of the same people as 12 MP photos "
        f"with 600 px faces p50 {fmt(v['12 MP']['p50_ms'])} ms (n={v['12 MP']['n']}): "
        f"**{fmt(ratio(v['12 MP']['p50_ms'], v['small']['p50_ms']))}x**. `/v1/embed` of a 100 px "
        "face: " + "; ".join(f"{k} p50 {fmt(e['p50_ms'])} ms, max {fmt(e['p99_ms'])} ms, found "
                             f"{e['found']}/{e['n']}" for k, e in http["embed_100px"].items()) + ".\n",
    ]
    return "\n".join(lines)

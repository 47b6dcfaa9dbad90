"""Part decisions: the error model's decisions through a real server, its extrapolation to
galleries of 1k-1M identities, and what deciding this way costs a request.

1. **Over HTTP** (real uvicorn, real photos): for held-out folds of identities (the same
   folds as ``python -m facegate.train.decision_eval``), a bundle whose error model and
   USS threshold were fitted on the other folds only; the fold's people are strangers.
   Galleries of 20-200 of the other people (3 photos each, enrolled as photo uploads)
   are searched with every stranger photo and one unseen photo per enrolled person
   (sent as the embeddings the server's pipeline makes of them, `calibrate.embed_folder`, so
   each photo is embedded once, not once per fold); verify-against-identity with 1/3/5
   enrolled photos and 1:1 pairs use the strangers' photos. Each response's threshold
   is checked against the offline model's for the same gallery.
2. **Extrapolation**: a synthetic world shaped like the real embeddings
   (``bench.gallery_data.Shape``): an error model is fitted on 247 of its identities, as
   on the real set, and its thresholds for 1k-1M identities are tested on fresh
   synthetic strangers against synthetic galleries of that size. Its limits: the fill is
   Gaussian, so it tests the extrapolation's mechanics on data like ours, not tails
   that real faces may have beyond what 247 people show.
3. **Cost**: the decision work a request adds (cached threshold, estimates, the
   gallery's composition) timed in-process, p50 in microseconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.gallery_data import Shape
from bench.server import Server

SIZES = {
    "full": {"folds": list(range(8)), "galleries": [20, 50, 100, 200], "impostors": 40,
             "extrapolate": [1_000, 10_000, 100_000, 1_000_000], "strangers": 3000,
             "calls": 2000},
    "smoke": {"folds": [0], "galleries": [3, 6], "impostors": 3, "extrapolate": [300],
              "strangers": 200, "calls": 50, "identities": 16},
}
TARGET = 0.01


def _embeddings(workdir: Path, identities: int | None) -> tuple[np.ndarray, np.ndarray, list]:
    """The shared photos embedded as the server embeds them (cached per model id)."""
    from facegate.core.bundle import load_bundle
    from facegate.train.calibrate import embed_folder, list_identity_images

    from bench.assets import REPO, data_root

    bundle = load_bundle(REPO / "models" / "default")
    paths, names = list_identity_images(data_root() / "images")
    if identities is not None:
        keep = sorted(set(names))[:identities]
        paths, names = zip(*[(p, n) for p, n in zip(paths, names, strict=True) if n in keep],
                           strict=True)
    cache = workdir / f"decisions-{bundle.model_id.split('#')[-1]}-{identities}.npz"
    if not cache.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        np.savez(cache, embeddings=embed_folder(bundle, list(paths)), labels=np.asarray(names))
    with np.load(cache) as table:
        return table["embeddings"], table["labels"], list(paths)


def _fold_bundle(workdir: Path, fold: Any, name: str) -> Path:
    from facegate.core.bundle import load_bundle
    from facegate.train.calibrate import write_calibrated_bundle

    from bench.assets import REPO

    bundle = load_bundle(REPO / "models" / "default")
    out = workdir / f"bundle-{name}"
    section = fold.model.to_manifest({"data": f"celeba-subset without {name}"})
    write_calibrated_bundle(bundle, out, threshold=fold.pair_threshold,
                            provenance=f"USS (verification form, FAR 1%) on the shared photos "
                            f"without {name}", error_model=section)
    return out


def _probe(vector: np.ndarray, model_id: str) -> dict:
    return {"model_id": model_id, "vector": [float(v) for v in vector]}


def http_fold(sizes: dict, workdir: Path, z, labels, paths, f: int) -> dict[str, Any]:
    """One held-out fold through a real server: every figure of section 1."""
    from facegate.train.decision_eval import FOLDS, fit_fold, merge_duplicates

    rng = np.random.default_rng(f)
    merged, _ = merge_duplicates(z, labels)
    folds = np.array_split(np.random.default_rng(0).permutation(np.unique(merged)), FOLDS)
    fold = fit_fold(z, merged, folds[f])
    bundle = _fold_bundle(workdir, fold, f"fold{f}")
    server = Server(bundle, workdir / f"decisions-fold{f}.sqlite", {})
    out: dict[str, Any] = {"fold": f, "pair_threshold": fold.pair_threshold, "sizes": []}
    try:
        with httpx.Client(base_url=server.url, timeout=120, verify=False) as http:
            model_id = http.get("/readyz").json()["model_id"]

            strangers = [(row, z[row]) for row in np.nonzero(fold.test)[0]]
            pool = rng.permutation(np.unique(merged[fold.train]))
            enrolled, mated, max_gap = 0, [], 0.0
            for size in sizes["galleries"]:
                for name in pool[enrolled:size]:
                    rows = rng.permutation(np.nonzero(merged == name)[0])
                    files = [("images", (paths[r].name, paths[r].read_bytes())) for r in rows[:3]]
                    r = http.post("/v1/identities", data={"name": str(name),
                                  "identity_id": str(name)}, files=files)
                    if r.status_code == 201 and len(rows) > 3:
                        mated.append((str(name), z[rows[3]]))
                enrolled = size
                found, hits = [], []
                offline = fold.curves.threshold(fold.curves.curve(_composition(http)), TARGET)
                for _, v in strangers:
                    s = http.post("/v1/search", json={"embedding": _probe(v, model_id), "k": 1}).json()
                    found.append(s["match"] is not None)
                    max_gap = max(max_gap, abs(s["threshold"] - offline))
                for name, v in mated:
                    s = http.post("/v1/search", json={"embedding": _probe(v, model_id), "k": 1}).json()
                    hits.append(s["match"] is not None and s["match"]["identity_id"] == name)
                out["sizes"].append({"gallery": s["gallery"]["identities"], "threshold": offline,
                                     "fpir": float(np.mean(found)), "tpir": float(np.mean(hits)),
                                     "strangers": len(found), "mated": len(hits)})
            out["threshold_gap_max"] = max_gap
            out["identity"] = _identity_checks(http, sizes, strangers, merged, paths, model_id, rng)
            out["pair"] = _pair_checks(http, strangers, merged, model_id, rng, sizes["calls"])
    finally:
        server.stop()
    return out


def _composition(http: httpx.Client) -> dict[int, int]:
    points = http.get("/v1/consistency").json()["operating_points"]["identity"]
    return {p["templates"]: p["identities"] for p in points if p["identities"]}


def _identity_checks(http, sizes, strangers, labels, paths, model_id, rng) -> list[dict]:
    """Each stranger enrolled with 1, 3, 5 photos; its other photos genuine, others' impostors."""
    by_name: dict[str, list] = {}
    for row, v in strangers:
        by_name.setdefault(str(labels[row]), []).append((row, v))
    rows = []
    for n in (1, 3, 5):
        far, frr, est = [], [], []
        for name, items in by_name.items():
            if len(items) <= n:
                continue
            files = [("images", (paths[r].name, paths[r].read_bytes())) for r, _ in items[:n]]
            enrolled = http.post("/v1/identities", data={"name": name,
                                 "identity_id": f"{name}-{n}"}, files=files)
            if enrolled.status_code != 201:  # a photo the server finds no usable face in
                continue
            others = [v for o, its in by_name.items() if o != name for _, v in its]
            picks = rng.choice(len(others), min(sizes["impostors"], len(others)), replace=False)
            for v, genuine in [(v, True) for _, v in items[n:]] + [(others[i], False) for i in picks]:
                r = http.post("/v1/verify/identity", json={
                    "identity_id": f"{name}-{n}", "embedding": _probe(v, model_id)}).json()
                (frr if genuine else far).append(r["match"] != genuine)
                if not genuine:
                    est.append(r["threshold"])
        rows.append({"templates": n, "far": float(np.mean(far)), "frr": float(np.mean(frr)),
                     "threshold": float(np.mean(est)), "impostor_trials": len(far),
                     "genuine_trials": len(frr)})
    return rows


def _pair_checks(http, strangers, labels, model_id, rng, calls) -> dict:
    """1:1 verify of stranger embedding pairs at the fold bundle's learned threshold."""
    far, frr = [], []
    for _ in range(calls):
        (a, va), (b, vb) = (strangers[i] for i in rng.choice(len(strangers), 2, replace=False))
        r = http.post("/v1/verify", json={"embedding1": _probe(va, model_id),
                                          "embedding2": _probe(vb, model_id)}).json()
        (frr if labels[a] == labels[b] else far).append(r["match"] != (labels[a] == labels[b]))
    return {"far": float(np.mean(far)), "impostor_pairs": len(far)}


def extrapolate(sizes: dict, z: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Synthetic world: fit on 247 identities x 20 templates, test at 1k-1M identities."""
    from facegate.core.error_model import ErrorCurves, fit_error_model

    rng = np.random.default_rng(7)
    shape = Shape(z.astype(np.float32), list(labels))
    calibration_ids = len(np.unique(labels))
    cal = shape.sample(calibration_ids, 20, rng)
    model, _ = fit_error_model(cal, np.repeat(np.arange(calibration_ids), 20))
    curves = ErrorCurves(model)
    strangers = shape.sample(sizes["strangers"], 1, rng)
    rows = []
    for size in sizes["extrapolate"]:
        curve = curves.curve({3: size})
        t = curves.threshold(curve, TARGET)
        best = np.full(len(strangers), -1.0, dtype=np.float32)
        for start in range(0, size, 50_000):
            chunk = shape.sample(min(50_000, size - start), 3, rng)
            best = np.maximum(best, (strangers @ chunk.T).max(axis=1))
        rows.append({"gallery": size, "threshold": t, "fpir": float(np.mean(best >= t)),
                     "estimated_at_t": curves.rate(curve, t), "strangers": len(strangers)})
        print(f"bench decisions: synthetic gallery {size}: t {t:.4f}, "
              f"FPIR {rows[-1]['fpir']:.4f}", flush=True)
    return rows


def cost(calls: int) -> dict[str, float]:
    """p50 microseconds of what deciding with the error model adds to a request."""
    from facegate.core.bundle import load_bundle
    from facegate.gallery.cache import IndexCache
    from facegate.server.settings import Settings
    from facegate.server.thresholds import Thresholds

    from bench.assets import REPO

    thresholds = Thresholds(load_bundle(REPO / "models" / "default"), Settings())
    cache = IndexCache(8)
    ids = np.arange(300_000)
    cache.build({}, [(int(i), f"p{i // 3}", f"t{i}") for i in ids],
                np.ones((len(ids), 8), dtype=np.float32))
    composition = cache.composition()
    thresholds.search(composition), thresholds.identity(3)  # the cached state a server is in

    def p50(fn) -> float:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e6)

    search = p50(lambda: (thresholds.search(cache.composition()),
                          [thresholds.fpir(0.95, composition) for _ in range(5)]))
    return {"search_us": search, "verify_us": p50(lambda: thresholds.far(0.93)),
            "verify_identity_us": p50(lambda: (thresholds.identity(3), thresholds.far(0.93, 3))),
            "gallery_identities": 100_000}


def run(sizes: dict, workdir: Path) -> dict:
    z, labels, paths = _embeddings(workdir, sizes.get("identities"))
    found = ~np.isnan(z).any(axis=1)
    z, labels, paths = z[found], labels[found], [p for p, k in zip(paths, found, strict=True) if k]
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return {"cost": cost(sizes["calls"]), "extrapolation": extrapolate(sizes, z, labels),
            "http": [http_fold(sizes, workdir, z, labels, paths, f) for f in sizes["folds"]]}


def markdown(result: dict) -> str:
    from bench.decisions_report import render

    return render(result)

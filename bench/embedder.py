"""Part 3, embedder: aligned crops per second against batch size, facegate vs dlib's ResNet.

facegate's ``core.embed`` on ONNX Runtime CPU, fed real aligned crops; the peer is the
face_recognition descriptor (dlib ResNet, batched through ``compute_face_descriptor``
on a list of 150 px chips, here the same crops resized). GPU rows (ORT CUDA, TensorRT
fp16/int8) are listed as pending: no GPU was lent to this task.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from bench.assets import bundle_info, real_crops, resolve_bundle
from bench.measure import summarise
from bench.pipeline import dlib_model_file
from bench.report import fmt, ratio, table

SIZES = {
    "full": {"batches": [1, 8, 32, 64], "min_crops": 192, "budget_s": 20.0, "real_crops": 64},
    "smoke": {"batches": [1, 4], "min_crops": 4, "budget_s": 2.0, "real_crops": 4},
}
PENDING_GPU = ("onnxruntime-cuda", "tensorrt fp16", "tensorrt int8")


def throughput(embed, crops: np.ndarray, batch: int, min_crops: int, budget_s: float) -> dict:
    """Crops/s of `embed` on batches of `batch` crops (one warm-up call, >= min_crops or budget)."""
    reps = -(-batch // len(crops))
    pool = np.concatenate([crops] * reps)[:batch] if reps > 1 else crops[:batch]
    embed(pool)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) * batch < min_crops and (not times or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        embed(pool)
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "calls": len(times), "crops_per_s": batch * len(times) / sum(times),
            "per_call": summarise(times)}


def run(sizes: dict, workdir: Path) -> dict:
    import dlib
    from facegate.core.bundle import load_bundle
    from facegate.core.embed import create_embedder

    bundle_path, stand_in = resolve_bundle(workdir)
    bundle = load_bundle(bundle_path)
    embedder = create_embedder(bundle, runtime="onnxruntime-cpu")
    crops, _ = real_crops(sizes["real_crops"], geometry=bundle.geometry)
    chips = [cv2.resize(c, (150, 150), interpolation=cv2.INTER_LINEAR) for c in crops]
    encoder = dlib.face_recognition_model_v1(
        str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat")))

    def dlib_embed(batch: np.ndarray) -> object:
        return encoder.compute_face_descriptor([chips[i % len(chips)] for i in range(len(batch))])

    rows = []
    for batch in tqdm(sizes["batches"], desc="embedder batch sizes", leave=False):
        rows.append({
            "batch": batch,
            "facegate": throughput(embedder.embed, crops, batch, sizes["min_crops"], sizes["budget_s"]),
            "dlib": throughput(dlib_embed, crops, batch, sizes["min_crops"], sizes["budget_s"]),
        })
    return {
        "model": bundle_info(bundle_path, stand_in),
        "runtime": embedder.runtime,
        "rows": rows,
        "pending": {name: "pending: no GPU lent to this task" for name in PENDING_GPU},
    }


def markdown(result: dict) -> str:
    model = result["model"]
    text = (
        f"Aligned real crops per second on `{model['model_id']}` "
        + ("(untrained stand-in MobileFaceNet, same compute as a trained one) " if model["stand_in"] else "")
        + f"via {result['runtime']}, against the dlib ResNet descriptor of face_recognition "
        "at the same batch size (one warm-up call, then at least the stated crops or the "
        "time budget).\n\n"
    )
    rows = []
    for r in result["rows"]:
        f, d = r["facegate"], r["dlib"]
        rows.append([r["batch"], f["crops_per_s"], f["per_call"]["p50_ms"], d["crops_per_s"],
                     d["per_call"]["p50_ms"], ratio(f["crops_per_s"], d["crops_per_s"])])
    text += table(["batch", "facegate crops/s", "facegate ms/call p50", "dlib crops/s",
                   "dlib ms/call p50", "facegate / dlib"], rows)
    text += "\n" + table(["GPU runtime", "crops/s"], [[k, v] for k, v in result["pending"].items()])
    for r in result["rows"]:
        q = ratio(r["facegate"]["crops_per_s"], r["dlib"]["crops_per_s"])
        if q < 0.95:
            text += (f"\nAt batch {r['batch']} facegate embeds fewer crops per second than dlib "
                     f"({fmt(q)}x).\n")
    return text

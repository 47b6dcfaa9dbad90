"""Part 3, embedder: aligned crops per second against batch size, facegate vs dlib's ResNet,
and the int8 embedder against fp32.

facegate's ``core.embed`` on ONNX Runtime CPU, fed real aligned crops; the peer is the
face_recognition descriptor (dlib ResNet, batched through ``compute_face_descriptor``
on a list of 150 px chips, here the same crops resized). int8: the default bundle (quantised by
``facegate export int8``, ``export.quantize``, on training identities), timed interleaved
with its fp32 source (dlib's ResNet port, exported here), flip on and off, one call of
each per round; a bundle that is not quantised is quantised here on half of the bench's
crops (speed does not depend on which crops set the ranges). GPU rows (ORT CUDA, TensorRT fp16/int8) are listed
as pending: no GPU was lent to this task.
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
    "full": {"batches": [1, 8, 32, 64], "min_crops": 192, "budget_s": 20.0, "real_crops": 64,
             "int8_batches": [1, 32], "int8_rounds": 15, "int8_budget_s": 45.0},
    "smoke": {"batches": [1, 4], "min_crops": 4, "budget_s": 2.0, "real_crops": 4,
              "int8_batches": [1, 4], "int8_rounds": 2, "int8_budget_s": 2.0},
}
# batch 1: one request's face; 32: the server's largest micro-batch (FACEGATE_BATCH_MAX_SIZE).
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


def interleaved(embedders: dict, crops: np.ndarray, batch: int, rounds: int,
                budget_s: float) -> dict:
    """Per-call times of each embedder on the same batch, one call of each per round (after
    one warm-up round), so a load change on the shared machine hits them alike."""
    pool = np.concatenate([crops] * -(-batch // len(crops)))[:batch]
    for embed in embedders.values():
        embed(pool)
    times: dict[str, list[float]] = {name: [] for name in embedders}
    deadline, first = time.perf_counter() + budget_s, times[next(iter(times))]
    while not first or (len(first) < rounds and time.perf_counter() < deadline):
        for name, embed in embedders.items():
            t0 = time.perf_counter()
            embed(pool)
            times[name].append(time.perf_counter() - t0)
    return {"batch": batch, **{name: summarise(t) for name, t in times.items()}}


def int8_rows(bundle, crops: np.ndarray, sizes: dict, workdir: Path) -> dict:
    """The int8 bundle (the one benchmarked above when it is quantised, else the fp32 port
    quantised here on half of ``crops``) against dlib's ResNet port in fp32, flip on and
    off, interleaved. The port is exported here (torch: a bench, not the server)."""
    from facegate.core.bundle import load_bundle
    from facegate.core.embed import create_embedder
    from facegate.export.onnx import export_bundle
    from facegate.export.quantize import quantize_bundle
    from facegate.train.checkpoint import PRETRAINED_DLIB

    half = max(1, len(crops) // 2)
    port = export_bundle(Path(PRETRAINED_DLIB), workdir / "fp32-port", parity_crops=crops[:half],
                         name="dlib-resnet-port", version="bench", threshold=0.9)
    int8 = bundle if "quantization" in bundle.manifest else quantize_bundle(
        port.path, workdir / "int8-bundle", crops[:half], crops[half:] if len(crops) > half
        else crops, calibration_source="bench crops")
    int8 = load_bundle(int8.path)
    embedders = {f"{name} flip={flip}": create_embedder(b, runtime="onnxruntime-cpu",
                                                        flip=flip).embed
                 for flip in (True, False) for name, b in (("fp32", port), ("int8", int8))}
    rows = [interleaved(embedders, crops, batch, sizes["int8_rounds"], sizes["int8_budget_s"])
            for batch in sizes["int8_batches"]]
    return {"model_id": int8.model_id, "fp32_model_id": port.model_id,
            "parity": int8.manifest["parity"], "rows": rows}


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
        "int8": int8_rows(bundle, crops, sizes, workdir),
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
    text += int8_markdown(result["int8"])
    for r in result["rows"]:
        q = ratio(r["facegate"]["crops_per_s"], r["dlib"]["crops_per_s"])
        if q < 0.95:
            text += (f"\nAt batch {r['batch']} facegate embeds fewer crops per second than dlib "
                     f"({fmt(q)}x).\n")
    return text


def int8_markdown(result: dict) -> str:
    """The int8 vs fp32 table: p50 ms per call and the ratios, from the same rounds."""
    text = (f"\nint8 (`{result['model_id']}`, `facegate export int8`, min cosine to fp32 "
            f"{result['parity']['min_cosine']:.4f} on {result['parity']['crops']} crops) against "
            f"fp32 (`{result['fp32_model_id']}`), interleaved (one call of each per round), p50 ms per call. The server "
            "always embeds crop + mirror when the bundle has a quality model (the mirror "
            "gives the stability signal), so flip=False is what it would cost without one.\n\n")
    rows = []
    for r in result["rows"]:
        p = {name: r[name]["p50_ms"] for name in r if name != "batch"}
        rows.append([r["batch"], p["fp32 flip=True"], p["int8 flip=True"],
                     ratio(p["int8 flip=True"], p["fp32 flip=True"]), p["fp32 flip=False"],
                     p["int8 flip=False"], ratio(p["int8 flip=False"], p["fp32 flip=False"]),
                     ratio(p["fp32 flip=False"], p["fp32 flip=True"]),
                     r["fp32 flip=True"]["n"]])
    return text + table(["batch", "fp32 flip ms", "int8 flip ms", "int8 / fp32 (flip)",
                         "fp32 no-flip ms", "int8 no-flip ms", "int8 / fp32 (no flip)",
                         "no flip / flip (fp32)", "rounds"], rows)

"""Part dlib_chip: embed time per face at batch 1, dlib's ResNet in dlib vs its ONNX port.

The issue's bar: embedding one face on ONNX Runtime CPU at batch 1 costs at most a third
of dlib's ``face_recognition_model_v1.compute_face_descriptor`` in the same run. Both
embed the same real 150x150 dlib chips, made by facegate's own path
(``core.face.prepare_face`` with the bundle's dlib_chip geometry and dlib's 5-point
landmarks, via ``bench.assets.real_crops``). The bundle is models/default (or
FACEGATE_BENCH_BUNDLE) when its geometry is dlib_chip, else the port of dlib's
pretrained ResNet (``load_checkpoint("dlib")``) exported into a temporary folder.
Timing is interleaved: each round embeds one chip with dlib, with the bundle without
flip and with flip (crop + mirror, the server's default), in an order that rotates
round by round, so no side gets the quieter moments of a shared machine.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.assets import DEFAULT_BUNDLE, bundle_info, real_crops
from bench.measure import summarise
from bench.pipeline import dlib_model_file
from bench.report import fmt, ratio, table

SIZES = {
    "full": {"chips": 32, "rounds": 160, "budget_s": 120.0},
    "smoke": {"chips": 2, "rounds": 2, "budget_s": 1.0},
}
BAR = 1 / 3  # ORT CPU time per face / dlib's, at most
SYSTEMS = {
    "dlib": "dlib compute_face_descriptor (150 px chip)",
    "ort": "bundle on ORT CPU, batch 1, no flip",
    "ort_flip": "bundle on ORT CPU, batch 1, flip (server default)",
}
PORT_THRESHOLD = 0.9  # the manifest needs one; speed does not depend on it


def dlib_chip_bundle(workdir: Path, stack: ExitStack, parity: int) -> tuple[Path, str]:
    """(bundle folder, where it came from): FACEGATE_BENCH_BUNDLE or models/default when its
    geometry is dlib_chip, else the dlib port exported into a temporary folder of `workdir`
    (removed when `stack` closes), its parity checked on `parity` real chips."""
    from facegate.core.align import DLIB_CHIP_150
    from facegate.core.bundle import load_bundle
    from facegate.export.onnx import PRETRAINED_DLIB, export_bundle

    for candidate in (os.environ.get("FACEGATE_BENCH_BUNDLE"), DEFAULT_BUNDLE):
        if candidate and (Path(candidate) / "manifest.json").is_file():
            if load_bundle(candidate, verify=False).geometry.method == "dlib_chip":
                return Path(candidate), f"{candidate} (its geometry is dlib_chip)"
    workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dlib-port-", dir=workdir)))
    crops, _ = real_crops(parity, geometry=DLIB_CHIP_150)  # cached: the chips timed below
    export_bundle(Path(PRETRAINED_DLIB), folder / "bundle", parity_crops=crops,
                  name="dlib-resnet-port", version="bench", threshold=PORT_THRESHOLD)
    return folder / "bundle", ("dlib's pretrained ResNet ported to PyTorch and exported by "
                               "facegate.export.onnx.export_bundle (models/default is not a "
                               "dlib_chip bundle)")


def interleaved(fns: dict[str, Callable[[np.ndarray], object]], chips: np.ndarray,
                rounds: int, budget_s: float) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each fn on one chip per round, order rotating each round
    (one warm-up call of each first; >= 1 round, then up to `rounds` or the budget)."""
    names = list(fns)
    for name in names:
        fns[name](chips[0])
    out = {name: {"wall": [], "cpu": []} for name in names}
    deadline = time.perf_counter() + budget_s
    bar = tqdm(total=rounds, desc="dlib_chip rounds", leave=False)
    r = 0
    while r < rounds and (r == 0 or time.perf_counter() < deadline):
        chip = chips[r % len(chips)]
        for name in names[r % len(names):] + names[: r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name](chip)
            t1, c1 = time.perf_counter(), time.process_time()
            out[name]["wall"].append(t1 - t0)
            out[name]["cpu"].append(c1 - c0)
        r += 1
        bar.update()
    bar.close()
    return out


def run(sizes: dict, workdir: Path) -> dict:
    import dlib
    import onnxruntime as ort
    from facegate.core.bundle import load_bundle
    from facegate.core.embed import create_embedder, l2_normalise

    with ExitStack() as stack:
        bundle_path, source = dlib_chip_bundle(workdir, stack, sizes["chips"])
        bundle = load_bundle(bundle_path)
        chips, identities = real_crops(sizes["chips"], geometry=bundle.geometry)
        assert chips.shape[1:] == (150, 150, 3), chips.shape
        chips = np.ascontiguousarray(chips)
        encoder = dlib.face_recognition_model_v1(
            str(dlib_model_file("dlib_face_recognition_resnet_model_v1.dat")))
        plain = create_embedder(bundle, runtime="onnxruntime-cpu")
        flipped = create_embedder(bundle, runtime="onnxruntime-cpu", flip=True)
        fns: dict[str, Callable[[np.ndarray], object]] = {
            "dlib": lambda chip: encoder.compute_face_descriptor(chip),
            "ort": lambda chip: plain.embed(chip[None]),
            "ort_flip": lambda chip: flipped.embed(chip[None]),
        }
        times = interleaved(fns, chips, sizes["rounds"], sizes["budget_s"])
        # Same model? dlib's descriptor vs the bundle's embedding of every chip (no flip).
        ref = l2_normalise(np.asarray([list(encoder.compute_face_descriptor(c)) for c in chips],
                                      dtype=np.float32))
        cosines = np.sum(ref * plain.embed(chips), axis=1)
        info = {**bundle_info(bundle_path, stand_in=False), "source": source,
                "geometry": str(bundle.geometry)}

    systems = {name: {"wall": summarise(t["wall"]), "cpu": summarise(t["cpu"])}
               for name, t in times.items()}
    dlib_wall = systems["dlib"]["wall"]
    return {
        "model": info,
        "chips": len(chips),
        "identities": len(set(identities)),
        "rounds": len(times["dlib"]["wall"]),
        "threads": {"onnxruntime_intra_op": "default (one per core)",
                    "onnxruntime": ort.__version__, "dlib_use_blas": bool(dlib.DLIB_USE_BLAS)},
        "systems": systems,
        "ratios": {name: {"p50": ratio(systems[name]["wall"]["p50_ms"], dlib_wall["p50_ms"]),
                          "mean": ratio(systems[name]["wall"]["mean_ms"], dlib_wall["mean_ms"])}
                   for name in ("ort", "ort_flip")},
        "bar": BAR,
        "agreement": {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean())},
    }


def markdown(result: dict) -> str:
    model = result["model"]
    text = (
        f"Embed time per face at batch 1 on the same {result['chips']} real 150x150 dlib chips "
        f"({result['identities']} people; made by facegate's `prepare_face` with the bundle's "
        f"geometry, {model['geometry']}, and dlib's 5-point landmarks), interleaved over "
        f"{result['rounds']} rounds: each round embeds one chip with dlib's "
        "`face_recognition_model_v1.compute_face_descriptor`, and with the bundle on ONNX "
        "Runtime CPU without and with flip (crop + mirror, what the server does), in an order "
        "that rotates each round; one warm-up call each first. Bundle: "
        f"`{model['model_id']}`, {model['source']}. ORT runs with its default intra-op threads "
        f"(one per core); dlib is built {'with' if result['threads']['dlib_use_blas'] else 'without'} "
        "BLAS. CPU ms is the process CPU time per call (all threads), so it shows what a "
        "face costs the machine as well as how long it takes. The issue's bar: ORT at most "
        f"{fmt(result['bar'])} of dlib's time.\n\n"
    )
    rows = []
    for name, label in SYSTEMS.items():
        wall, cpu = result["systems"][name]["wall"], result["systems"][name]["cpu"]
        q = result["ratios"].get(name)
        rows.append([label, f"{fmt(wall['p50_ms'])} / {fmt(wall['p95_ms'])}", wall["mean_ms"],
                     cpu["mean_ms"], q["p50"] if q else 1.0, q["mean"] if q else 1.0,
                     ("yes" if q["p50"] <= result["bar"] and q["mean"] <= result["bar"] else "no")
                     if q else "-"])
    text += table(["embedder", "ms p50 / p95", "ms mean", "CPU ms mean", "/ dlib (p50)",
                   "/ dlib (mean)", f"within {fmt(result['bar'])}"], rows)
    agreement = result["agreement"]
    text += (f"\nSame model: the bundle's embedding (no flip) against dlib's descriptor of each "
             f"chip, cosine min {agreement['min_cosine']:.6f}, mean {agreement['mean_cosine']:.6f}.\n")
    for name in ("ort", "ort_flip"):
        q = result["ratios"][name]["p50"]
        if not q <= result["bar"]:
            text += (f"\n{SYSTEMS[name]} takes {fmt(q)}x dlib's time per face (p50), above the "
                     f"bar of {fmt(result['bar'])}.\n")
    return text

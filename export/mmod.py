"""dlib's MMOD face detector: PyTorch rebuild from the .dat, ONNX export, parity and timings.

The model is ``mmod_human_face_detector.dat`` from dlib-models (Davis King, public
domain / CC0 1.0), shipped in ``face_recognition_models``. Its file (read by
``core.dlib_dnn``) holds a plain chain, the ``net_type`` of dlib's
``tools/python/src/cnn_face_detector.cpp``: three 5x5 stride-2 convs (16, 32, 32
filters, pad 0), three 5x5 convs (45 filters, pad 2), each followed by batch norm and
relu, then one 9x9 conv (pad 4) giving one score map per detector window. The batch
norms are stored as ``bn_con`` (training form); dlib loads them into ``affine`` layers
as gamma / sqrt(running_var + eps) and beta - scale * running_mean, and so does this.
What the file does not hold comes from dlib's source: ``pyramid_down<6>`` (a C++ type),
pyramid padding 10/11 for the v1 input layer, and 5-row minimum pyramid levels.

``python -m facegate.export.mmod export OUT.onnx`` writes the ONNX (dynamic height and
width, the detector spec in its metadata); ``run`` times dlib CNN, dlib HOG and the
ONNX Runtime detector photo by photo (cached, resumable) and ``report`` sums up parity,
timings and detection rates (docs/mmod.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from facegate.core.dlib_dnn import DlibFormatError, DlibNet, read_dlib_dnn
from facegate.core.mmod import METADATA_KEY, MODEL_FILE, MmodDetector, MmodSpec
from facegate.export.parity import DEFAULT_DATA
from facegate.train.backbones import Affine
from torch import nn

PYRAMID_N = 6  # input_rgb_image_pyramid<pyramid_down<6>> in cnn_face_detector.cpp
PYRAMID_PADDING = {"input_rgb_image_pyramid": (10, 11)}  # v1 file: dlib's defaults
MIN_LEVEL_ROWS = 5  # compute_tiled_image_pyramid_details' min_height
LICENCE = "mmod_human_face_detector.dat: dlib-models (Davis King), public domain / CC0 1.0"


def model_file() -> Path:
    from facegate.core.detect import dlib_model_file

    return dlib_model_file(MODEL_FILE)


def mmod_layers(net: DlibNet) -> nn.Sequential:
    """The file's layer chain as PyTorch modules, weights loaded (bn_con folded as dlib does)."""
    if net.loss != "loss_mmod_" or not net.input.startswith("input_rgb_image_pyramid"):
        raise DlibFormatError(f"not an MMOD detector: {net.loss} over {net.input}")
    modules: list[nn.Module] = []
    for i, layer in enumerate(net.layers):
        a, p = layer.attrs, layer.params.reshape(-1)
        if layer.wrappers:
            raise DlibFormatError(f"layer {i}: tag/skip layers are not part of an MMOD chain")
        if layer.kind == "con":
            out, inp, kh, kw = a["filters"]
            conv = nn.Conv2d(inp, out, (kh, kw), (a["stride_y"], a["stride_x"]),
                             (a["pad_y"], a["pad_x"]))
            n = out * inp * kh * kw
            conv.weight.data.copy_(torch.from_numpy(p[:n].reshape(out, inp, kh, kw)))
            conv.bias.data.copy_(torch.from_numpy(p[n:]))
            modules.append(conv)
        elif layer.kind in ("bn_con", "affine"):
            k = p.size // 2
            gamma, beta = p[:k], p[k:]
            if layer.kind == "bn_con":
                mean = layer.tensors["running_means"].reshape(-1)
                var = layer.tensors["running_variances"].reshape(-1)
                gamma = gamma / np.sqrt(var + np.float32(a["eps"]))
                beta = beta - gamma * mean
            affine = Affine(k)
            affine.gamma.data.copy_(torch.from_numpy(gamma.astype(np.float32)))
            affine.beta.data.copy_(torch.from_numpy(beta.astype(np.float32)))
            modules.append(affine)
        elif layer.kind == "relu":
            modules.append(nn.ReLU())
        else:
            raise DlibFormatError(f"layer {i}: {layer.name} is not part of an MMOD chain")
    return nn.Sequential(*modules).eval()


def mmod_spec(net: DlibNet) -> MmodSpec:
    """The detector's settings: from the file, from dlib's source, and from the conv chain."""
    convs = [layer.attrs for layer in net.layers if layer.kind == "con"]
    stride, offset = 1, 0
    for c in reversed(convs):  # con_::map_output_to_input, outermost layer first
        stride, offset = stride * c["stride_x"], offset * c["stride_x"] - c["pad_x"] + c["nc"] // 2
    min_input = 1
    while True:  # smallest side with a non-empty output
        side = min_input
        for c in convs:
            side = (side + 2 * c["pad_y"] - c["nr"]) // c["stride_y"] + 1 if side > 0 else 0
        if side >= 1:
            break
        min_input += 1
    a = net.loss_attrs
    padding, outer = PYRAMID_PADDING.get(
        net.input, (net.input_attrs.get("pyramid_padding"), net.input_attrs.get("pyramid_outer_padding"))
    )
    return MmodSpec(
        windows=((a["detector_width"], a["detector_height"]),),
        nms_iou=a["nms_iou_thresh"], nms_covered=a["nms_percent_covered_thresh"],
        mean_rgb=net.mean_rgb, pyramid_n=PYRAMID_N, padding=padding, outer_padding=outer,
        min_level_rows=MIN_LEVEL_ROWS, stride=stride, offset=offset, min_input=min_input,
    )


def export_mmod_onnx(out_path: str | Path, dat_path: str | Path | None = None,
                     opset: int = 17) -> Path:
    """Write the ONNX (input ``image`` (1, 3, H, W), output ``scores``) and check it against
    PyTorch on a random tile: 1e-4 of the score range or ``DlibFormatError``."""
    net = read_dlib_dnn(model_file() if dat_path is None else dat_path)
    model, spec = mmod_layers(net), mmod_spec(net)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.tmp.onnx")  # atomic publish
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice is expected
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 3, 64, 64),), str(tmp), input_names=["image"],
            output_names=["scores"], opset_version=opset, dynamo=False,
            dynamic_axes={"image": {2: "height", 3: "width"}, "scores": {2: "rows", 3: "cols"}},
        )
    proto = onnx.load(str(tmp))
    for key, value in ((METADATA_KEY, spec.to_json()), ("licence", LICENCE)):
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp))
    tile = np.random.default_rng(0).normal(0, 0.3, (3, 157, 211)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(tile)[None])[0].numpy()
    got = MmodDetector(tmp).scores(tile)
    if got.shape != expected.shape or np.abs(got - expected).max() > 1e-4 * np.ptp(expected):
        tmp.unlink()
        raise DlibFormatError("the ONNX export does not reproduce the PyTorch rebuild")
    tmp.replace(out_path)
    return out_path


# ---------------------------------------------------------------- parity, timings, detection rates

# hog68: HOG + the 68-point predictor (the detector before the cascade); server: HOG at
# 0..upsample, then MMOD, + the 5-point predictor (the server's default since).
METHODS = ("dlib-cnn", "ort", "hog", "hog68", "server")


def sample_photos(data: Path, n: int) -> list[Path]:
    """The first ``n`` of a fixed shuffle (seed 0) of the set's photos: a spread sample that
    grows by appending, so cached results stay valid."""
    with open(data / "identities.csv", newline="") as f:
        paths = sorted(row["path"] for row in csv.DictReader(f))
    order = np.random.default_rng(0).permutation(len(paths))
    return [data / paths[i] for i in order[:n]]


def _detectors(onnx_path: Path) -> dict[str, Any]:
    import dlib

    cnn = dlib.cnn_face_detection_model_v1(str(model_file()))
    hog = dlib.get_frontal_face_detector()
    ort_detector = MmodDetector(onnx_path)

    def dlib_cnn(img: np.ndarray, up: int) -> list:
        return [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence)
                for d in cnn(img, up)]

    def hog_run(img: np.ndarray, up: int) -> list:
        rects, scores, _ = hog.run(img, up, 0.0)
        return [(r.left(), r.top(), r.right(), r.bottom(), s) for r, s in zip(rects, scores, strict=True)]

    def whole(boxes: str, landmarks: str) -> Any:
        """A full DlibDetector (boxes and landmarks), as the server runs it."""
        from facegate.core.detect import DlibDetector

        detectors: dict[int, DlibDetector] = {}

        def detect(img: np.ndarray, up: int) -> list:
            if up not in detectors:
                detectors[up] = DlibDetector(up, boxes, landmarks=landmarks)  # type: ignore[arg-type]
            detector = detectors[up]
            return [(*f.box, f.score) for f in detector.detect(img)]

        return detect

    return {"dlib-cnn": dlib_cnn, "ort": ort_detector.detect, "hog": hog_run,
            "server": whole("hog+mmod", "5"), "hog68": whole("hog", "68")}


def run(data: Path, n: int, jobs: list[str], onnx_path: Path, cache: Path,
        where_none: str | None = None) -> None:
    """Detect on the sample photo by photo, every job ("method@upsample") back to back on
    the same photo (so load from other processes hits all alike); append to ``cache``.
    With ``where_none`` (a cached job), only the photos where that job found no face: what
    a fallback detector sees."""
    from PIL import Image

    done, empty = set(), set()
    if cache.exists():
        for r in map(json.loads, cache.read_text().splitlines()):
            done.add((r["job"], r["path"]))
            if r["job"] == where_none and not r["boxes"]:
                empty.add(r["path"])
    detectors = _detectors(onnx_path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("a") as out:
        for path in sample_photos(data, n):
            rel = str(path.relative_to(data))
            if where_none is not None and ((where_none, rel) not in done or rel not in empty):
                continue
            todo = [job for job in jobs if (job, rel) not in done]
            if not todo:
                continue
            img = np.asarray(Image.open(path).convert("RGB"))
            for job in todo:
                method, up = job.split("@")
                start = time.perf_counter()
                boxes = detectors[method](img, int(up))
                seconds = time.perf_counter() - start
                row = {"job": job, "path": rel, "seconds": seconds,
                       "boxes": [[float(v) for v in b] for b in boxes]}
                out.write(json.dumps(row) + "\n")
            out.flush()


def box_iou(a: list[float], b: list[float]) -> float:
    """Plain IoU of inclusive integer boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0.0, w) * max(0.0, h)
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area - inter)


def compare(reference: list[list[float]], candidate: list[list[float]]) -> tuple[list[float], list[float]]:
    """Greedy one-to-one matching by IoU: (IoUs of matched pairs, their score differences)."""
    pairs = sorted(((box_iou(r, c), i, j) for i, r in enumerate(reference)
                    for j, c in enumerate(candidate)), reverse=True)
    used_r, used_c, ious, dscore = set(), set(), [], []
    for iou, i, j in pairs:
        if iou > 0 and i not in used_r and j not in used_c:
            used_r.add(i), used_c.add(j)
            ious.append(iou)
            dscore.append(abs(reference[i][4] - candidate[j][4]))
    return ious, dscore


def report(cache: Path, jobs: list[str] | None = None) -> dict[str, Any]:
    """Per job: detection rate and time; per upsample: ORT vs dlib CNN parity. Every figure
    is over the photos that all the chosen ``jobs`` (default: all cached) have done."""
    rows: dict[str, dict[str, dict]] = {}
    for r in map(json.loads, cache.read_text().splitlines()):
        if jobs is None or r["job"] in jobs:
            rows.setdefault(r["job"], {})[r["path"]] = r
    common = sorted(set.intersection(*(set(by_path) for by_path in rows.values())))
    out: dict[str, Any] = {"photos": len(common), "jobs": {}, "parity": {}}
    for job, by_path in sorted(rows.items()):
        seconds = np.array([by_path[p]["seconds"] for p in common])
        out["jobs"][job] = {
            "detection_rate": float(np.mean([len(by_path[p]["boxes"]) > 0 for p in common])),
            "faces": sum(len(by_path[p]["boxes"]) for p in common),
            "mean_s": float(seconds.mean()), "median_s": float(np.median(seconds)),
        }
    for job in rows:
        method, up = job.split("@")
        ref = rows.get(f"dlib-cnn@{up}")
        if method != "ort" or ref is None:
            continue
        ious, dscore, same = [], [], 0
        for p in common:
            a, b = ref[p]["boxes"], rows[job][p]["boxes"]
            same += len(a) == len(b)
            i, d = compare(a, b)
            ious += i
            dscore += d
        iou = np.array(ious) if ious else np.zeros(1)
        out["parity"][f"upsample {up}"] = {
            "same_count": same / max(len(common), 1),
            "dlib_faces": sum(len(ref[p]["boxes"]) for p in common),
            "ort_faces": sum(len(rows[job][p]["boxes"]) for p in common),
            "matched": len(ious), "iou_min": float(iou.min()),
            "iou_p01": float(np.percentile(iou, 1)), "iou_median": float(np.median(iou)),
            "iou_ge_0.9": float(np.mean(iou >= 0.9)), "identical_boxes": float(np.mean(iou == 1)),
            "max_abs_score_diff": float(max(dscore, default=0.0)),
            "dlib_mean_s": float(np.mean([ref[p]["seconds"] for p in common])),
            "ort_mean_s": float(np.mean([rows[job][p]["seconds"] for p in common])),
        }
    return out


def _through_chain(by_job: dict[str, dict], chain: list[str]) -> tuple[bool, float] | None:
    """(face found, seconds paid) for one photo sent down ``chain``; None when a job it
    would reach was not run on it."""
    total = 0.0
    for job in chain:
        if job not in by_job:
            return None
        total += by_job[job]["seconds"]
        if by_job[job]["boxes"]:
            return True, total
    return False, total


def cascade(cache: Path, chain: list[str]) -> dict[str, Any]:
    """A detection policy simulated from the cache: each photo goes through ``chain`` (jobs)
    until one finds a face, paying each job's recorded time. Photos missing a job they
    would reach are left out and counted."""
    rows: dict[str, dict[str, dict]] = {}
    for r in map(json.loads, cache.read_text().splitlines()):
        if r["job"] in chain:
            rows.setdefault(r["path"], {})[r["job"]] = r
    outcomes = [_through_chain(by_job, chain) for by_job in rows.values()]
    done = [o for o in outcomes if o is not None]
    missing = len(outcomes) - len(done)
    found, seconds = [hit for hit, _ in done], [total for _, total in done]
    times = np.array(seconds)
    return {"policy": " > ".join(chain), "photos": len(found), "left_out": missing,
            "detection_rate": float(np.mean(found)), "mean_s": float(times.mean()),
            "p50_s": float(np.median(times)), "p95_s": float(np.percentile(times, 95))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facegate.export.mmod", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the ONNX detector")
    ex.add_argument("out", type=Path)
    ex.add_argument("--dat", type=Path, help=f"default: face_recognition_models' {MODEL_FILE}")
    rn = sub.add_parser("run", help="detect on sample photos (appends to the cache)")
    rn.add_argument("--onnx", type=Path, default=Path("runs/mmod/mmod.onnx"))
    rn.add_argument("--images", type=int, default=200)
    rn.add_argument("--jobs", nargs="+", default=["dlib-cnn@0", "ort@0", "hog@0"],
                    help=f"method@upsample, method one of {', '.join(METHODS)}")
    rn.add_argument("--where-none", metavar="JOB",
                    help="only photos where this cached job found no face (a fallback's input)")
    rep = sub.add_parser("report", help="parity, timings and detection rates as JSON")
    rep.add_argument("--jobs", nargs="+", help="only these jobs (default: all in the cache)")
    rep.add_argument("--cascade", nargs="+", action="append", metavar="JOB",
                     help="also simulate a policy: these jobs in turn until one finds a face "
                     "(repeatable), e.g. --cascade hog@0 hog@1 ort@1")
    for p in (rn, rep):
        p.add_argument("--cache", type=Path, default=Path("runs/mmod/detections.jsonl"))
    rn.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    if args.command == "export":
        print(export_mmod_onnx(args.out, args.dat))
    elif args.command == "run":
        if not args.onnx.exists():
            export_mmod_onnx(args.onnx)
        run(args.data, args.images, args.jobs, args.onnx, args.cache, args.where_none)
    else:
        result = report(args.cache, args.jobs)
        result["cascades"] = [cascade(args.cache, chain) for chain in args.cascade or []]
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``facegate export onnx|tensorrt``: checkpoint -> ONNX bundle, bundle ONNX -> TensorRT engine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facegate.core.errors import FacegateError
from facegate.export.parity import DEFAULT_DATA
from facegate.export.quantize import METHODS

PRECISIONS = ("fp32", "fp16", "int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_target", required=True, metavar="TARGET")

    onnx = sub.add_parser("onnx", help="export a training checkpoint to an ONNX model bundle")
    onnx.add_argument("checkpoint", type=Path, help="training checkpoint (.pt)")
    onnx.add_argument("out_bundle", type=Path, help="bundle folder to write")
    onnx.add_argument("--name", help="bundle name (default: the checkpoint's run folder)")
    onnx.add_argument("--version", help="bundle version (default: step<N>)")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17")
    onnx.add_argument(
        "--simplify", action="store_true", help="simplify with onnxslim if parity still holds"
    )
    onnx.add_argument(
        "--threshold", type=float, help="override the checkpoint's (learned or calibrated) one"
    )
    onnx.add_argument(
        "--parity-images", type=int, default=16, help="real photos for the parity check"
    )
    onnx.add_argument(
        "--parity-data", type=Path, default=DEFAULT_DATA, help="photo folder for parity crops"
    )

    int8 = sub.add_parser("int8", help="a statically quantised (QDQ int8) copy of a bundle for "
                          "CPUs with int8 dot products (no torch, no GPU)")
    int8.add_argument("bundle", type=Path, help="fp32 bundle folder")
    int8.add_argument("out_bundle", type=Path, help="new bundle folder to write")
    int8.add_argument("--calibration", type=Path, required=True,
                      help="identity sub-folders of the bundle's crops (facegate prepare)")
    int8.add_argument("--holdout", type=int, default=48,
                      help="identities the trainer's split holds out (never calibrated on)")
    int8.add_argument("--seed", type=int, default=0, help="the split's seed")
    int8.add_argument("--calibration-crops", type=int, default=256)
    int8.add_argument("--parity-crops", type=int, default=64)
    int8.add_argument("--method", choices=METHODS,
                      default="percentile", help="how activation ranges are taken")

    trt = sub.add_parser("tensorrt", help="build a TensorRT engine for this GPU into a bundle")
    trt.add_argument("bundle", type=Path, help="bundle folder (from `facegate export onnx`)")
    trt.add_argument("--precision", choices=PRECISIONS, default="fp16")
    trt.add_argument("--max-batch", type=int, default=64, help="largest batch of the profile")
    trt.add_argument(
        "--calibration-dir", type=Path, help="photos or aligned crops for int8 calibration"
    )
    trt.add_argument("--calibration-images", type=int, default=512)
    trt.add_argument(
        "--eval-data", type=Path, default=DEFAULT_DATA, help="photos for parity and accuracy"
    )
    trt.add_argument("--eval-images", type=int, default=400)


def run(args: argparse.Namespace) -> int:
    try:
        summary = _export(args)
    except FacegateError as exc:  # no GPU, parity failure, bad bundle: say why, no traceback
        print(f"facegate export {args.export_target}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _export(args: argparse.Namespace) -> dict:
    if args.export_target == "onnx":
        from facegate.core.align import as_geometry
        from facegate.export.onnx import export_bundle
        from facegate.export.parity import sample_crops
        from facegate.train.backbones import geometry_of
        from facegate.train.checkpoint import build_backbone, load_checkpoint

        # Parity crops in the geometry the model takes (export_bundle writes the same one).
        geometry = as_geometry(geometry_of(build_backbone(load_checkpoint(args.checkpoint))))
        crops, _ = sample_crops(args.parity_data, args.parity_images, geometry=geometry)
        bundle = export_bundle(
            args.checkpoint,
            args.out_bundle,
            parity_crops=crops,
            name=args.name,
            version=args.version,
            opset=args.opset,
            simplify=args.simplify,
            threshold=args.threshold,
        )
        summary = {
            "bundle": str(bundle.path),
            "model_id": bundle.model_id,
            "threshold": bundle.threshold,
            "threshold_source": bundle.threshold_source,
            "parity": bundle.manifest["parity"],
            "simplification": bundle.manifest["export"]["simplification"],
        }
    elif args.export_target == "int8":
        from facegate.core.bundle import load_bundle
        from facegate.export.quantize import quantize_bundle, training_crops

        size = load_bundle(args.bundle).input_spec["size"]
        calibration, parity, where = training_crops(
            args.calibration, size, holdout=args.holdout, seed=args.seed,
            calibration=args.calibration_crops, parity=args.parity_crops)
        bundle = quantize_bundle(args.bundle, args.out_bundle, calibration, parity,
                                 calibration_source=where, method=args.method)
        summary = {"bundle": str(bundle.path), "model_id": bundle.model_id,
                   "quantization": bundle.manifest["quantization"],
                   "parity": bundle.manifest["parity"]}
    else:
        from facegate.export.tensorrt import export_embedder_engine

        summary = {
            "engine": export_embedder_engine(
                args.bundle,
                precision=args.precision,
                max_batch=args.max_batch,
                calibration_dir=args.calibration_dir,
                calibration_images=args.calibration_images,
                eval_dir=args.eval_data,
                eval_images=args.eval_images,
            )
        }
    return summary

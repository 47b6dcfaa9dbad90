"""`facegate detect IMAGE`: print detected faces as JSON, optionally draw them to a PNG."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
from facegate.core.detect import BOX_FINDERS, LANDMARK_MODELS, DlibDetector
from facegate.core.draw import draw_faces
from facegate.core.errors import FacegateError
from facegate.core.image import decode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="JPEG, PNG, WebP or BMP file")
    parser.add_argument("--out", type=Path, help="write an annotated PNG here")
    parser.add_argument("--upsample", type=int, default=1, help="dlib upsampling passes (finds smaller faces, slower)")
    parser.add_argument(
        "--boxes",
        choices=BOX_FINDERS,
        default="hog",
        help="HOG, dlib's MMOD CNN (ONNX Runtime), or HOG at each upsampling step and the CNN "
        "where HOG finds nothing (the server's default)",
    )
    parser.add_argument(
        "--landmarks",
        choices=sorted(LANDMARK_MODELS),
        default="5",
        help="dlib shape predictor: 5-point (public domain) or 68-point (iBUG 300-W: non-commercial)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        image = decode(args.image.read_bytes())
    except FacegateError as e:
        print(json.dumps({"error": {"code": e.code, "message": e.message}}), file=sys.stderr)
        return 2
    detector = DlibDetector(upsample=args.upsample, boxes=args.boxes, landmarks=args.landmarks)
    start = time.perf_counter()
    faces = detector.detect(image)
    elapsed_ms = (time.perf_counter() - start) * 1000
    report = {
        "image": str(args.image),
        "width": image.shape[1],
        "height": image.shape[0],
        "detect_ms": round(elapsed_ms, 1),
        "faces": [f.to_dict() for f in faces],
    }
    print(json.dumps(report, indent=2))
    if args.out is not None:
        annotated = draw_faces(image, faces)
        if not cv2.imwrite(str(args.out), cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR)):
            print(f"cannot write {args.out}", file=sys.stderr)
            return 1
    return 0

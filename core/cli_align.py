"""`facegate align IMAGE OUT.png`: detect a face and write its aligned 112x112 crop."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
from facegate.core.align import align
from facegate.core.detect import DlibDetector, select_face
from facegate.core.errors import FacegateError
from facegate.core.image import decode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="JPEG, PNG, WebP or BMP file")
    parser.add_argument("out", type=Path, help="where to write the 112x112 PNG crop")
    parser.add_argument(
        "--policy",
        choices=("largest", "strict"),
        default="largest",
        help="largest face, or fail unless exactly one face is found",
    )
    parser.add_argument("--upsample", type=int, default=1, help="dlib upsampling passes")


def run(args: argparse.Namespace) -> int:
    try:
        image = decode(args.image.read_bytes())
        face = select_face(DlibDetector(upsample=args.upsample).detect(image), args.policy)
    except FacegateError as e:
        print(json.dumps({"error": {"code": e.code, "message": e.message}}), file=sys.stderr)
        return 2
    crop = align(image, face.landmarks)
    if not cv2.imwrite(str(args.out), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)):
        print(f"cannot write {args.out}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), "face": face.to_dict()}))
    return 0

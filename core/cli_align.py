"""`facegate align IMAGE OUT.png`: detect a face and write its crop in a model's geometry.

The crop is made by ``facegate.core.face.prepare_face``, as the server and
``facegate prepare`` make theirs. Geometry: ``--bundle B`` (B's manifest), or
``--geometry dlib_chip|arcface_template [--size N] [--padding P]``; default dlib chip
150x150, padding 0.25.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
from facegate.core.detect import DlibDetector
from facegate.core.errors import FacegateError
from facegate.core.face import (
    add_geometry_arguments,
    add_landmark_argument,
    geometry_from_args,
    landmarks_for,
    prepare_face,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="JPEG, PNG, WebP or BMP file")
    parser.add_argument("out", type=Path, help="where to write the PNG crop")
    parser.add_argument(
        "--policy",
        choices=("largest", "strict"),
        default="largest",
        help="largest face, or fail unless exactly one face is found",
    )
    parser.add_argument("--upsample", type=int, default=1, help="dlib upsampling passes")
    add_landmark_argument(parser)
    add_geometry_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        geometry = geometry_from_args(args)
    except (ValueError, FacegateError) as e:
        print(f"facegate align: {e}", file=sys.stderr)
        return 1
    try:
        landmarks = landmarks_for(geometry, args.landmarks)
        detector = DlibDetector(upsample=args.upsample, landmarks=landmarks)
        prepared = prepare_face(args.image.read_bytes(), detector, geometry, policy=args.policy)
    except FacegateError as e:
        print(json.dumps({"error": {"code": e.code, "message": e.message}}), file=sys.stderr)
        return 2
    if not cv2.imwrite(str(args.out), cv2.cvtColor(prepared.crop, cv2.COLOR_RGB2BGR)):
        print(f"cannot write {args.out}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), "geometry": geometry.to_dict(), "face": prepared.face.to_dict()}))
    return 0

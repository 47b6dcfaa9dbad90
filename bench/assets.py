"""What the benchmarks run on: real shared photos, aligned crops, and a model bundle.

The photos come from the shared CelebA subset (never copied into the repo). The bundle
is ``models/default`` (or ``FACEGATE_BENCH_BUNDLE``); if neither exists, a stand-in is
built: an *untrained* MobileFaceNet exported to ONNX, which costs the same compute as a
trained one, so speed figures hold, but quality-dependent figures do not.
"""

from __future__ import annotations

import csv
import functools
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "models" / "default"
DEFAULT_DATA = (REPO / ".." / "shared" / "data" / "celeba-subset").resolve()


def data_root() -> Path:
    root = Path(os.environ.get("FACEGATE_BENCH_DATA", DEFAULT_DATA))
    if not (root / "identities.csv").is_file():
        raise SystemExit(f"bench: photos not found at {root} (set FACEGATE_BENCH_DATA)")
    return root


@functools.cache
def photos_by_identity() -> dict[str, list[Path]]:
    """identity -> photo paths, in the CSV's order."""
    root = data_root()
    out: dict[str, list[Path]] = defaultdict(list)
    with open(root / "identities.csv", newline="") as f:
        for row in csv.DictReader(f):
            out[row["identity"]].append(root / row["path"])
    return dict(out)


def photo_pairs(n: int, seed: int = 0) -> list[tuple[Path, Path]]:
    """`n` same-identity photo pairs, one per identity, drawn reproducibly."""
    people = {k: v for k, v in photos_by_identity().items() if len(v) >= 2}
    names = sorted(people)
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    pairs = []
    for name in names[:n]:
        a, b = rng.choice(len(people[name]), size=2, replace=False)
        pairs.append((people[name][a], people[name][b]))
    return pairs


@functools.cache
def real_crops(
    n: int, per_identity: int = 1, geometry: Any = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Up to `n` crops of shared photos, made by the server's detect + align code in
    `geometry` (a bundle's; default the ArcFace 112 template)."""
    from facegate.export.parity import sample_crops

    crops, identities = sample_crops(
        data_root(), n, per_identity=per_identity, seed=0, geometry=geometry
    )
    return crops, tuple(identities)


def resolve_bundle(workdir: Path) -> tuple[Path, bool]:
    """(bundle folder, is_stand_in): FACEGATE_BENCH_BUNDLE, models/default, or a stand-in."""
    chosen = os.environ.get("FACEGATE_BENCH_BUNDLE")
    if chosen:
        return Path(chosen), False
    if (DEFAULT_BUNDLE / "manifest.json").is_file():
        return DEFAULT_BUNDLE, False
    return stand_in_bundle(workdir), True


def bundle_info(path: Path, stand_in: bool) -> dict:
    """What a result was measured with: the bundle's model id and whether it is a stand-in."""
    from facegate.core.bundle import load_bundle

    bundle = load_bundle(path)
    return {"model_id": bundle.model_id, "embedding_size": bundle.embedding_size,
            "stand_in": stand_in}


def stand_in_bundle(workdir: Path, backbone: str = "mobilefacenet") -> Path:
    """An untrained `backbone` exported to ONNX and wrapped as a bundle (speed figures only)."""
    import torch
    from facegate.core.bundle import write_bundle
    from facegate.export.onnx import export_onnx
    from facegate.train.backbones import get_backbone

    folder = workdir / f"stand-in-{backbone}"
    if (folder / "manifest.json").is_file():
        return folder
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = get_backbone(backbone, embedding_size=512).eval()
    onnx_file = export_onnx(model, workdir / f"{backbone}.onnx")
    write_bundle(
        folder,
        onnx_file=onnx_file,
        name=f"bench-stand-in-{backbone}",
        version="0",
        embedding_size=512,
        threshold=0.3,
        threshold_source="bench",
        threshold_provenance="untrained stand-in for speed benchmarks; not a face model",
        extra={},
    )
    return folder

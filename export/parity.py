"""Parity between two runtimes of one model, measured on real aligned face crops.

An export is only trusted when the exported model embeds the same faces the same
way as its source: every crop's cosine between the two embeddings must reach a
floor (0.9999 for PyTorch -> ONNX fp32, 0.999 for TensorRT fp16), and for reduced
precision the verification accuracy at the bundle's threshold may move by at
most 0.1 point on a held-out pair set (``metrics.verification_pairs``, the pairs
evaluation uses). The math here is pure NumPy; loading crops is the one I/O helper,
kept at the bottom.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from facegate.core import metrics
from facegate.core.align import Geometry
from facegate.core.errors import FacegateError
from facegate.core.preprocess import l2_normalise
from tqdm import tqdm

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "celeba-subset"


class ParityError(FacegateError):
    """An exported model does not reproduce its source closely enough to ship."""

    code = "parity_failed"
    status = 500


def _unit64(x: np.ndarray) -> np.ndarray:
    """Unit rows in float64, whatever precision the runtime returned."""
    return l2_normalise(np.asarray(x, dtype=np.float64))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between row i of ``a`` and row i of ``b``."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    return np.sum(_unit64(a) * _unit64(b), axis=1)


def parity_report(reference: np.ndarray, candidate: np.ndarray, *, min_cosine: float) -> dict:
    """Per-crop agreement of two embedding sets (rows = the same crops), JSON-ready."""
    cos = row_cosines(reference, candidate)
    return {
        "crops": int(len(cos)),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.max(np.abs(np.asarray(reference) - np.asarray(candidate)))),
        "required_min_cosine": float(min_cosine),
        "passed": bool(cos.min() >= min_cosine),
    }


def accuracy_at_threshold(
    embeddings: np.ndarray, i: np.ndarray, j: np.ndarray, labels: np.ndarray, threshold: float
) -> float:
    """Fraction of pairs whose accept/reject decision at ``threshold`` is correct."""
    scores = metrics.pair_cosines(_unit64(embeddings), i, j)
    return float(np.mean((scores >= threshold) == labels))  # NaN scores count as wrong


def accuracy_change(
    reference: np.ndarray,
    candidate: np.ndarray,
    identities: Sequence[str],
    threshold: float,
    *,
    max_drop_points: float = 0.1,
    seed: int = 0,
) -> dict:
    """Verification accuracy (in percent) at one threshold for both runtimes, and the change."""
    i, j, labels = metrics.verification_pairs(identities, seed=seed)
    ref = 100.0 * accuracy_at_threshold(reference, i, j, labels, threshold)
    cand = 100.0 * accuracy_at_threshold(candidate, i, j, labels, threshold)
    return {
        "pairs": int(len(labels)),
        "genuine_pairs": int(labels.sum()),
        "threshold": float(threshold),
        "reference_accuracy": ref,
        "candidate_accuracy": cand,
        "change_points": cand - ref,
        "allowed_change_points": float(max_drop_points),
        "passed": bool(abs(cand - ref) <= max_drop_points),
    }


def list_photos(data_dir: Path) -> list[tuple[Path, str]]:
    """(photo, identity) from ``identities.csv`` if present, else ``<identity>/<photo>`` folders."""
    data_dir = Path(data_dir)
    index = data_dir / "identities.csv"
    if index.is_file():
        with open(index, newline="") as f:
            return [(data_dir / row["path"], row["identity"]) for row in csv.DictReader(f)]
    photos = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    return [(p, p.parent.name) for p in photos]


def pick_spread(
    photos: Sequence[tuple[Path, str]], n: int, *, per_identity: int = 1, seed: int = 0
) -> list[tuple[Path, str]]:
    """Up to ``n`` photos, ``per_identity`` from each of as many identities as it takes."""
    by_id: dict[str, list[Path]] = {}
    for path, identity in photos:
        by_id.setdefault(identity, []).append(path)
    rng = np.random.default_rng(seed)
    names = sorted(by_id)
    rng.shuffle(names)
    picked: list[tuple[Path, str]] = []
    for identity in names:
        paths = by_id[identity]
        order = rng.permutation(len(paths))[:per_identity]
        picked.extend((paths[k], identity) for k in order)
        if len(picked) >= n:
            break
    return picked[:n]


def aligned_crops(
    photos: Sequence[tuple[Path, str]],
    *,
    geometry: Geometry | None = None,
    desc: str = "aligning",
) -> tuple[np.ndarray, list[str]]:
    """Detect the largest face of each photo and crop it by ``geometry``, as the server would
    (``core.face.prepare_face`` with the server's default detector for that geometry).

    ``geometry``: the model's (a bundle's ``geometry``); default the ArcFace 112 template,
    what a bundle without one means. Photos without a detectable face are skipped;
    returns crops ``(M, S, S, 3)`` uint8 and their identities.
    """
    from facegate.core.detect import create_detector
    from facegate.core.errors import NoFaceError
    from facegate.core.face import landmarks_for, prepare_face
    from facegate.core.manifest import DEFAULT_GEOMETRY

    geometry = geometry or DEFAULT_GEOMETRY
    detector = create_detector("dlib", landmarks=landmarks_for(geometry))
    crops: list[np.ndarray] = []
    identities: list[str] = []
    for path, identity in tqdm(photos, desc=desc, unit="photo", leave=False):
        try:
            prepared = prepare_face(Path(path).read_bytes(), detector, geometry, policy="largest")
        except NoFaceError:
            continue
        crops.append(prepared.crop)
        identities.append(identity)
    if not crops:
        raise ParityError("no face found in any of the parity photos")
    return np.stack(crops), identities


def sample_crops(
    data_dir: Path,
    n: int,
    *,
    per_identity: int = 1,
    seed: int = 0,
    geometry: Geometry | None = None,
) -> tuple[np.ndarray, list[str]]:
    """``n`` real crops (made by ``geometry``, default ArcFace 112) drawn across identities."""
    # Over-draw a little: a few photos may have no detectable face.
    picked = pick_spread(
        list_photos(data_dir), n + n // 4 + 2, per_identity=per_identity, seed=seed
    )
    crops, identities = aligned_crops(picked, geometry=geometry)
    return crops[:n], identities[:n]

"""``facegate calibrate BUNDLE DATA``: learn the USS threshold of a frozen model.

UniTSFace's USS loss (``train.losses.USSLoss``) learns one bias b, the unified
threshold ``t = b / s``. Here the network is frozen and b is learned alone, exactly:
on the L2-normalised embeddings of DATA (identity sub-folders of crops), the
*expected* USS loss is a convex function of b and its minimiser is found by a
safeguarded Newton / bisection search on t in [-1, 1.5] to 1e-6.

Memory semantics are those of training: for sample i the memory of a class c is
another sample of c (for its own class, a different sample of that class), so the
expected loss averages over those choices::

    L(b) = mean_i [ mean_{j in y_i, j != i} softplus(b - s*(cos_ij - m))
                    + lambda * agg_{c != y_i} mean_{j in c} softplus(s*cos_ij - b) ]

``agg`` is a sum over the C-1 other classes in the paper's form (``negatives="sum"``,
lambda = 1) or a mean over them in the verification form (``negatives="mean"``).
Its slope vanishes where a soft FRR at ``t + m`` equals lambda times the soft
per-class false-accept rate summed over C-1 classes (paper: t gets stricter with
every training class, often above 1 on a frozen network; see
``shared/notes/uss-threshold.md``) or lambda times a soft per-pair FAR (verification).
``--target-far`` picks lambda on DATA's own impostor pairs (training identities,
never a test set). Unlike training, the exponent arguments are not clamped to
[-s, s]: the clamp only touches pairs more than 1 away from t in cosine and would
make the loss non-convex.

No torch here: the server side can run it (numpy + ONNX Runtime through
``core.embed``, with the server's default horizontal-flip averaging).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.errors import FacegateError

__all__ = [
    "FORMS",
    "CalibrationError",
    "USSTerms",
    "embed_folder",
    "expected_uss",
    "learn_threshold",
    "negative_weight_for_far",
    "pair_rates",
    "write_calibrated_bundle",
]

FORMS = {"paper": "sum", "verification": "mean"}  # --form -> USSLoss negatives
THRESHOLD_SOURCE = "uss-calibrated"
T_LOW, T_HIGH = -1.0, 1.5  # search range of t = b / s
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_CHUNK = 512  # rows of the cosine matrix computed at once (512 x N float64)
# write_bundle's own arguments; every other manifest key is passed through `extra`.
_BUNDLE_ARGUMENTS = frozenset({"schema", "name", "version", "embedding_size", "threshold",
                               "threshold_source", "threshold_provenance", "files"})


class CalibrationError(FacegateError):
    """The threshold cannot be learned or written (bad data, root out of range)."""

    code = "calibration_failed"
    status = 400


@dataclass(frozen=True)
class USSTerms:
    """The expected USS loss at one t and its derivatives in b (per sample, averaged).

    ``positive`` is the soft FRR ``mean_i mean_j sigma(s*(t + m - cos_pos))`` and
    ``negative`` the weighted soft FAR ``lambda * mean_i agg_c mean_j sigma(s*(cos - t))``;
    ``dL/db = positive - negative``.
    """

    t: float
    loss: float
    positive: float
    negative: float
    curvature: float  # d2L/db2 > 0

    @property
    def gradient(self) -> float:
        """dL/db (multiply by s for dL/dt)."""
        return self.positive - self.negative


# ---------------------------------------------------------------- pure math


@dataclass(frozen=True)
class _Prepared:
    """Unit embeddings sorted by class, with the same-class pairs listed once."""

    z: np.ndarray  # (N, d) float64, unit rows, sorted by class
    codes: np.ndarray  # (N,) class index 0..C-1, non-decreasing
    counts: np.ndarray  # (C,) samples per class
    starts: np.ndarray  # (C + 1,) offsets of each class's rows
    positive_cos: np.ndarray  # (P,) cosines of the ordered pairs (i, j), same class, i != j
    positive_weight: np.ndarray  # (P,) 1 / (n_{y_i} - 1)

    @property
    def classes(self) -> int:
        return int(self.counts.size)

    @property
    def size(self) -> int:
        return int(self.z.shape[0])


def _prepare(embeddings: Any, labels: Any) -> _Prepared:
    z = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels).ravel()
    if z.ndim != 2 or z.shape[0] != y.size:
        raise CalibrationError(
            f"embeddings must be (N, d) with one label each, got {z.shape} and {y.size} labels"
        )
    if not np.all(np.isfinite(z)):
        raise CalibrationError("embeddings contain NaN or infinity")
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise CalibrationError("embeddings contain a zero vector")
    # An identity with one sample has no positive pair (its memory would be itself): left out.
    names, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, names[counts >= 2])
    z, y, norms = z[keep], y[keep], norms[keep]
    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    if counts.size < 2:
        raise CalibrationError(
            f"need at least 2 identities with 2 or more samples each, got {counts.size}"
        )
    order = np.argsort(codes, kind="stable")
    z = z[order] / norms[order]
    codes = codes[order].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    cosines, weights = [], []
    for c in range(counts.size):
        block = z[starts[c] : starts[c + 1]]
        gram = block @ block.T
        cosines.append(gram[~np.eye(counts[c], dtype=bool)])
        weights.append(np.full(counts[c] * (counts[c] - 1), 1.0 / (counts[c] - 1)))
    return _Prepared(z, codes, counts, starts, np.concatenate(cosines), np.concatenate(weights))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _other_class_cosines(
    prep: _Prepared, fill: float = -np.inf, upper_only: bool = False, chunk: int = _CHUNK
) -> Iterator[np.ndarray]:
    """Row chunks of the cosine matrix with same-class entries (and, with ``upper_only``,
    entries j <= i) replaced by ``fill``: what is left are the impostor pairs."""
    n = prep.size
    columns = np.arange(n)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        cos = prep.z[start:stop] @ prep.z.T
        for c in np.unique(prep.codes[start:stop]):
            r0, r1 = max(prep.starts[c], start), min(prep.starts[c + 1], stop)
            cos[r0 - start : r1 - start, prep.starts[c] : prep.starts[c + 1]] = fill
        if upper_only:
            cos[columns[None, :] <= np.arange(start, stop)[:, None]] = fill
        yield cos


def _check_options(s: float, m: float, negatives: str, negative_weight: float) -> None:
    if negatives not in ("sum", "mean"):
        raise ValueError(f"negatives must be 'sum' or 'mean', got {negatives!r}")
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"s must be a positive number, got {s!r}")
    if not math.isfinite(m):
        raise ValueError(f"m must be finite, got {m!r}")
    if not (math.isfinite(negative_weight) and negative_weight > 0):
        raise ValueError(f"negative_weight must be a positive number, got {negative_weight!r}")


def _terms(
    prep: _Prepared, t: float, s: float, m: float, negatives: str, negative_weight: float,
    with_loss: bool = True,
) -> USSTerms:
    # Positive side: each same-class ordered pair, weighted 1 / (n_{y_i} - 1).
    arg = s * (t + m - prep.positive_cos)
    sig = _sigmoid(arg)
    ws = prep.positive_weight * sig
    positive = float(ws.sum())
    curvature = float((ws * (1.0 - sig)).sum())
    loss = float((prep.positive_weight * np.logaddexp(0.0, arg)).sum()) if with_loss else 0.0
    # Negative side: column j weighted lambda / n_{y_j} (and / (C - 1) for "mean");
    # same-class entries are -inf, so they contribute exactly 0.
    column_weight = negative_weight / prep.counts[prep.codes].astype(np.float64)
    if negatives == "mean":
        column_weight = column_weight / (prep.classes - 1)
    negative = 0.0
    for cos in _other_class_cosines(prep):
        arg = s * (cos - t)
        sig = _sigmoid(arg)
        negative += float((sig @ column_weight).sum())
        curvature += float(((sig * (1.0 - sig)) @ column_weight).sum())
        if with_loss:
            loss += float((np.logaddexp(0.0, arg) @ column_weight).sum())
    n = prep.size
    return USSTerms(t=float(t), loss=loss / n, positive=positive / n, negative=negative / n,
                    curvature=curvature / n)


def expected_uss(
    embeddings: Any,
    labels: Any,
    t: float,
    *,
    s: float = 64.0,
    m: float = 0.1,
    negatives: str = "sum",
    negative_weight: float = 1.0,
) -> USSTerms:
    """The expected USS loss at ``t = b / s`` on frozen embeddings, with dL/db and d2L/db2.

    Embeddings are L2-normalised here (float64); identities with one sample are left out.
    """
    _check_options(s, m, negatives, negative_weight)
    return _terms(_prepare(embeddings, labels), t, s, m, negatives, negative_weight)


def _solve(prep: _Prepared, s: float, m: float, negatives: str, negative_weight: float,
           tol: float) -> float:
    def terms(t: float) -> USSTerms:
        return _terms(prep, t, s, m, negatives, negative_weight, with_loss=False)

    form = f"negatives={negatives}, lambda={negative_weight:g}, s={s:g}, m={m:g}"
    low, high = terms(T_LOW), terms(T_HIGH)
    if low.gradient > 0:
        raise CalibrationError(f"the USS root lies below t = {T_LOW} ({form}): "
                               "the loss would accept every pair")
    if high.gradient < 0:
        raise CalibrationError(
            f"the USS root lies above t = {T_HIGH} ({form}): soft FRR {high.positive:.3g} "
            f"< negative side {high.negative:.3g} even there; a threshold above 1 rejects "
            "every pair (the paper's sum over classes on a frozen network; try the "
            "verification form)")
    lo, hi = T_LOW, T_HIGH
    t = 0.5 * (lo + hi)
    for _ in range(200):
        current = terms(t)
        g = current.gradient
        if g == 0.0:
            return t
        if g > 0:
            hi = t
        else:
            lo = t
        step = g / (current.curvature * s) if current.curvature > 0 else math.inf
        candidate = t - step
        if not lo < candidate < hi:
            candidate = 0.5 * (lo + hi)
        if abs(candidate - t) < tol * 1e-3 or hi - lo < tol:
            return float(candidate)
        t = candidate
    raise CalibrationError(f"the threshold search did not converge ({form})")


def learn_threshold(
    embeddings: Any,
    labels: Any,
    *,
    s: float = 64.0,
    m: float = 0.1,
    negatives: str = "sum",
    negative_weight: float = 1.0,
    tol: float = 1e-6,
) -> float:
    """The exact minimiser ``t = b / s`` of the expected USS loss on frozen embeddings.

    ``negatives="sum", negative_weight=1`` is UniTSFace's form; ``"mean"`` the
    verification form (see the module docstring and ``USSLoss``). The root is searched
    in [-1, 1.5] to ``tol``; a ``CalibrationError`` says when it lies outside. A
    result above 1 (possible for the paper's form) is returned: it rejects every pair,
    so check ``-1 < t < 1`` before using it.
    """
    _check_options(s, m, negatives, negative_weight)
    return _solve(_prepare(embeddings, labels), s, m, negatives, negative_weight, tol)


def pair_rates(embeddings: Any, labels: Any, t: float) -> tuple[float, float]:
    """(FAR, FRR) at ``t`` over every pair i < j of the data (accept: cos >= t)."""
    prep = _prepare(embeddings, labels)
    frr = float(np.mean(prep.positive_cos < t))  # ordered pairs: each pair twice, same rate
    impostors = int((prep.counts * (prep.size - prep.counts)).sum())  # ordered pairs
    accepted = sum(int((cos >= t).sum()) for cos in _other_class_cosines(prep))
    return accepted / impostors, frr


def _far_threshold(prep: _Prepared, far: float) -> float:
    """A threshold in the middle of the gap where exactly floor(far * n) impostors pass."""
    impostors = int((prep.counts * (prep.size - prep.counts)).sum()) // 2
    allowed = math.floor(far * impostors + 1e-9)
    if allowed < 1:
        raise CalibrationError(f"{impostors} impostor pairs cannot measure FAR {far:g}")
    keep = allowed + 1
    top = np.empty(0)
    for cos in _other_class_cosines(prep, upper_only=True):
        values = cos[np.isfinite(cos)]
        if values.size > keep:
            values = np.partition(values, values.size - keep)[-keep:]
        top = np.concatenate([top, values])
        if top.size > 4 * keep:
            top = np.partition(top, top.size - keep)[-keep:]
    top = np.sort(top)[::-1][:keep]
    first_rejected = top[allowed]
    above = top[:allowed][top[:allowed] > first_rejected]
    upper = float(above.min()) if above.size else float(first_rejected) + 2e-6
    return 0.5 * (float(first_rejected) + upper)


def negative_weight_for_far(
    embeddings: Any,
    labels: Any,
    far: float,
    *,
    s: float = 64.0,
    m: float = 0.1,
    negatives: str = "mean",
    tol: float = 1e-6,
) -> float:
    """The lambda whose learned threshold accepts a fraction ``far`` of the data's
    impostor pairs (pairs of different identities; use training identities only).

    The target ``t*`` sits mid-gap between the impostor cosines just accepted and just
    rejected at that rate. The stationarity condition is linear in lambda, so instead
    of a search (a log-scale bisection on lambda lands on the same point) lambda is
    solved exactly: ``lambda = soft FRR(t* + m) / unweighted negative side(t*)``; the
    result is then checked by re-learning t with it.
    """
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")
    _check_options(s, m, negatives, 1.0)
    prep = _prepare(embeddings, labels)
    target = _far_threshold(prep, far)
    terms = _terms(prep, target, s, m, negatives, 1.0, with_loss=False)
    if not (terms.negative > 0 and terms.positive > 0):
        raise CalibrationError(f"FAR {far:g} needs t = {target:.4f}, where the soft rates "
                               "underflow; no finite lambda reaches it")
    weight = terms.positive / terms.negative
    learned = _solve(prep, s, m, negatives, weight, tol)
    if abs(learned - target) > 10 * tol:
        raise CalibrationError(f"lambda {weight:.4g} learns t = {learned:.6f}, not the target "
                               f"{target:.6f}")
    return float(weight)


# ---------------------------------------------------------------- data


def list_identity_images(root: str | Path) -> tuple[list[Path], list[str]]:
    """(image paths, identity names) of DATA's identity sub-folders, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise CalibrationError(f"{root}: no such folder of identity sub-folders")
    paths: list[Path] = []
    names: list[str] = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                paths.append(path)
                names.append(folder.name)
    if not paths:
        raise CalibrationError(f"{root}: no images in identity sub-folders")
    return paths, names


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise CalibrationError(f"{path}: not a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def embed_folder(
    bundle: Any, paths: Sequence[Path], *, flip: bool = True, runtime: str = "auto",
    batch: int = 256, progress: bool = False,
) -> np.ndarray:
    """(N, d) float32 L2-normalised embeddings of images with the bundle's embedder.

    Images of the bundle's input size are crops and are embedded as they are; other
    images are photos and go through the server's own path (``core.face.prepare_face``
    with the bundle's geometry and its default detector). A photo without a usable face
    gives a row of NaN, which the caller drops.
    """
    from facegate.core.embed import create_embedder
    from facegate.core.errors import FacegateError
    from facegate.core.face import make_detector, prepare_face
    from tqdm import tqdm

    height, width = bundle.input_spec["size"]
    embedder = create_embedder(bundle, runtime=runtime, flip=flip)
    detector = None
    out = np.full((len(paths), bundle.embedding_size), np.nan, dtype=np.float32)
    with ThreadPoolExecutor(4) as pool:
        for start in tqdm(range(0, len(paths), batch), desc="embed", disable=not progress):
            chunk = list(paths[start : start + batch])
            crops, rows = [], []
            for offset, (path, image) in enumerate(zip(chunk, pool.map(_read_rgb, chunk),
                                                       strict=True)):
                if image.shape[:2] != (height, width):
                    detector = detector or make_detector(bundle.geometry)
                    try:
                        image = prepare_face(Path(path).read_bytes(), detector,
                                             bundle.geometry).crop
                    except FacegateError:
                        continue
                crops.append(image)
                rows.append(start + offset)
            if crops:
                out[rows] = embedder.embed(np.stack(crops))
    return out



def write_calibrated_bundle(
    bundle: Any, out: str | Path | None, *, threshold: float, provenance: str,
    calibration: dict[str, Any] | None = None,
) -> Any:
    """Write ``bundle`` with a new threshold (source ``uss-calibrated``) into ``out``
    (a new folder; None: in place), keeping every other manifest field and file.

    Goes through ``write_bundle`` and ``add_file`` so every sha256 is recomputed and the
    result is checked by ``load_bundle``. ``calibration`` is stored as the manifest's
    ``calibration`` section.
    """
    from facegate.core.bundle import add_file, load_bundle, write_bundle

    if not -1.0 < threshold < 1.0:
        raise CalibrationError(f"threshold {threshold:.6f} is outside (-1, 1): not written")
    manifest = bundle.manifest
    target = bundle.path if out is None else Path(out).resolve()
    if target.is_file():
        raise CalibrationError(f"{target}: --out must be a folder")
    extra = {k: v for k, v in manifest.items() if k not in _BUNDLE_ARGUMENTS}
    if calibration is not None:
        extra["calibration"] = calibration
    others = [(name, entry) for name, entry in manifest["files"].items()
              if entry["role"] != "embedder"]
    write_bundle(
        target, onnx_file=bundle.onnx_path, name=manifest["name"], version=manifest["version"],
        embedding_size=manifest["embedding_size"], threshold=threshold,
        threshold_source=THRESHOLD_SOURCE, threshold_provenance=provenance, extra=extra,
    )
    for name, entry in others:
        meta = {k: v for k, v in entry.items() if k != "sha256"}
        add_file(target, bundle.path / name, **meta)
    return load_bundle(target)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Learn the USS bias b (threshold t = b/s) of a frozen ONNX bundle on DATA, a folder "
        "of identity sub-folders of crops (training identities, never the test set), and "
        "write it into the bundle's manifest.")
    parser.add_argument("bundle", type=Path, help="model bundle folder")
    parser.add_argument("data", type=Path, nargs="?",
                        help="identity sub-folders of crops of the bundle's input size")
    parser.add_argument("--embeddings", type=Path,
                        help=".npz with 'embeddings' (N, d) and 'labels' (N,) instead of DATA")
    parser.add_argument("--save-embeddings", type=Path,
                        help="also write DATA's embeddings and labels to this .npz")
    parser.add_argument("--form", choices=sorted(FORMS), default="verification",
                        help="paper: negatives summed over the other classes, lambda 1 "
                        "(UniTSFace); verification: averaged over them (default)")
    parser.add_argument("--negative-weight", type=float, default=None, metavar="LAMBDA",
                        help="lambda multiplying the negative side (verification form; default 1)")
    parser.add_argument("--target-far", type=float, default=None, metavar="ALPHA",
                        help="choose lambda so t accepts this fraction of DATA's impostor pairs "
                        "(verification form)")
    parser.add_argument("--s", type=float, default=64.0, help="USS scale (default 64)")
    parser.add_argument("--m", type=float, default=0.1, help="USS margin (default 0.1)")
    parser.add_argument("--out", type=Path, help="write a new bundle here (default: update BUNDLE)")
    parser.add_argument("--dry-run", action="store_true", help="print the result, write nothing")
    parser.add_argument("--no-flip", dest="flip", action="store_false",
                        help="embed crops without the mirror image (the server flips by default)")
    parser.add_argument("--runtime", default="auto", help="embedder runtime (see facegate serve)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _load_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as table:
            return np.asarray(table["embeddings"]), np.asarray(table["labels"])
    except (OSError, KeyError, ValueError) as err:
        raise CalibrationError(f"{path}: need an .npz with 'embeddings' and 'labels' ({err})") from err


def _calibrate(args: argparse.Namespace) -> int:
    from facegate.core.bundle import load_bundle

    if (args.data is None) == (args.embeddings is None):
        raise CalibrationError("give DATA or --embeddings (exactly one)")
    if args.form == "paper" and (args.negative_weight is not None or args.target_far is not None):
        raise CalibrationError("--negative-weight and --target-far apply to --form verification")
    if args.negative_weight is not None and args.target_far is not None:
        raise CalibrationError("give --negative-weight or --target-far, not both")
    bundle = load_bundle(args.bundle)
    if args.embeddings is not None:
        embeddings, labels = _load_embeddings(args.embeddings)
        source = args.embeddings.name
    else:
        paths, names = list_identity_images(args.data)
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        single = {name for name, count in counts.items() if count < 2}
        if single:
            print(f"skipping {len(single)} identities with a single image", file=sys.stderr)
            kept = [i for i, name in enumerate(names) if name not in single]
            paths, names = [paths[i] for i in kept], [names[i] for i in kept]
        embeddings = embed_folder(bundle, paths, flip=args.flip, runtime=args.runtime,
                                  progress=not args.quiet)
        labels = np.asarray(names)
        found = ~np.isnan(embeddings).any(axis=1)
        if not found.all():
            print(f"skipping {int((~found).sum())} photos without a usable face", file=sys.stderr)
            embeddings, labels = embeddings[found], labels[found]
        source = args.data.resolve().name
        if args.save_embeddings is not None:
            np.savez(args.save_embeddings, embeddings=embeddings, labels=labels)
    if embeddings.ndim != 2 or embeddings.shape[1] != bundle.embedding_size:
        raise CalibrationError(f"embeddings are {embeddings.shape}, the bundle's embedding size "
                               f"is {bundle.embedding_size}")
    negatives = FORMS[args.form]
    weight = 1.0 if args.negative_weight is None else args.negative_weight
    if args.target_far is not None:
        weight = negative_weight_for_far(embeddings, labels, args.target_far, s=args.s, m=args.m,
                                         negatives=negatives)
    t = learn_threshold(embeddings, labels, s=args.s, m=args.m, negatives=negatives,
                        negative_weight=weight)
    far, frr = pair_rates(embeddings, labels, t)
    identities, samples = len(np.unique(labels)), len(labels)
    print(f"{args.form} form (negatives {negatives}), s={args.s:g}, m={args.m:g}, "
          f"lambda={weight:.6g}" + (f", target FAR {args.target_far:g}" if args.target_far else ""))
    print(f"data: {source}, {identities} identities, {samples} samples")
    print(f"learned t = {t:.6f}  (previous: {bundle.threshold:.6f}, {bundle.threshold_source})")
    print(f"on DATA's pairs at t: FAR {far:.6f}, FRR {frr:.6f}")
    inside = -1.0 < t < 1.0
    if not inside:
        print(f"t = {t:.6f} lies outside (-1, 1): a threshold above 1 rejects every pair",
              file=sys.stderr)
    if args.dry_run:
        print("dry run: nothing written")
        return 0 if inside else 2
    if not inside:
        raise CalibrationError(f"t = {t:.6f} is outside (-1, 1); bundle not written")
    today = datetime.date.today().isoformat()
    lam = f"lambda={weight:.4g}" + (f" (for FAR {args.target_far:g} on the calibration "
                                    "data's impostor pairs)" if args.target_far else "")
    provenance = (f"USS bias learned on the frozen network by facegate calibrate: {args.form} "
                  f"form (negatives {negatives} over the other classes), s={args.s:g}, "
                  f"m={args.m:g}, {lam}, on {source} ({identities} identities, {samples} "
                  f"samples), {today}")
    calibration = {
        "form": args.form, "negatives": negatives, "s": args.s, "m": args.m,
        "negative_weight": weight, "target_far": args.target_far, "data": source,
        "identities": identities, "samples": samples, "flip": args.flip,
        "far": far, "frr": frr, "date": today,
        "previous_threshold": bundle.threshold,
        "previous_threshold_source": bundle.threshold_source,
    }
    written = write_calibrated_bundle(bundle, args.out, threshold=t, provenance=provenance,
                                      calibration=calibration)
    print(f"wrote threshold {written.threshold:.6f} ({written.threshold_source}) to {written.path}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _calibrate(args)
    except FacegateError as err:
        print(f"calibrate: {err.message}", file=sys.stderr)
        return 2

"""``facegate calibrate BUNDLE DATA``: learn the USS threshold of a frozen model and its
error model (``core.error_model``: what a score means for a pair, an identity of n
templates and a gallery of G identities), and write both into the bundle.

DATA (identity sub-folders of crops or photos) is embedded with the bundle's own embedder
(``core.embed``, the server's default horizontal-flip averaging); the threshold itself
is ``train.uss_threshold``'s exact minimiser of the expected USS loss (the formula and the
two forms are there). ``--target-far`` picks lambda on DATA's own impostor pairs
(training identities, never a test set).

No torch here: the server side can run it (numpy + ONNX Runtime).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.errors import FacegateError
from facegate.train.uss_threshold import (
    CalibrationError,
    learn_threshold,
    negative_weight_for_far,
    pair_rates,
)

FORMS = {"paper": "sum", "verification": "mean"}  # --form -> USSLoss negatives
THRESHOLD_SOURCE = "uss-calibrated"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# write_bundle's own arguments; every other manifest key is passed through `extra`.
_BUNDLE_ARGUMENTS = frozenset({"schema", "name", "version", "embedding_size", "threshold",
                               "threshold_source", "threshold_provenance", "files"})


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
    calibration: dict[str, Any] | None = None, error_model: dict[str, Any] | None = None,
    threshold_source: str = THRESHOLD_SOURCE, quality_model: dict[str, Any] | None = None,
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
    if error_model is not None:
        extra["error_model"] = error_model
    if quality_model is not None:
        extra["quality_model"] = quality_model
    others = [(name, entry) for name, entry in manifest["files"].items()
              if entry["role"] != "embedder"]
    write_bundle(
        target, onnx_file=bundle.onnx_path, name=manifest["name"], version=manifest["version"],
        embedding_size=manifest["embedding_size"], threshold=threshold,
        threshold_source=threshold_source, threshold_provenance=provenance, extra=extra,
    )
    for name, entry in others:
        meta = {k: v for k, v in entry.items() if k != "sha256"}
        add_file(target, bundle.path / name, **meta)
    return load_bundle(target)


def write_sections(bundle: Any, out: str | Path | None, **sections: dict[str, Any]) -> Any:
    """``bundle`` with new manifest sections (``error_model=``, ``quality_model=``), its
    threshold, provenance and every other field kept (``--error-model-only``,
    ``--quality-only``)."""
    return write_calibrated_bundle(bundle, out, threshold=bundle.threshold,
                                   provenance=bundle.threshold_provenance,
                                   threshold_source=bundle.threshold_source, **sections)


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
    parser.add_argument("--error-model-only", action="store_true",
                        help="fit and write only the error model; keep the bundle's threshold")
    parser.add_argument("--quality-only", action="store_true",
                        help="fit and write only the face-quality model (core.quality) on DATA's "
                        "photos; keep the threshold and the error model")


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
    if args.quality_only:
        from facegate.train.quality_fit import calibrate_quality

        return calibrate_quality(bundle, args)
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
    error_model = error_model_section(embeddings, labels, source)
    if args.error_model_only:
        return _write_error_model_only(bundle, args, error_model)
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
                                      calibration=calibration, error_model=error_model)
    print(f"wrote threshold {written.threshold:.6f} ({written.threshold_source}) to {written.path}")
    return 0


def error_model_section(embeddings: np.ndarray, labels: np.ndarray, source: str) -> dict[str, Any]:
    """The manifest's error_model section, fitted on DATA (training identities)."""
    from facegate.core.error_model import fit_error_model

    model, figures = fit_error_model(embeddings, labels)
    section = model.to_manifest({
        "data": source, **figures, "date": datetime.date.today().isoformat(),
        "provenance": "facegate calibrate: per-probe Gaussian tails of atanh(impostor cosine) "
        "matched to each training probe's 90% and 99% impostor quantiles, rho by one-way "
        "ANOVA over (probe, impostor identity); docs/results.md measures it on held-out "
        "identities",
    })
    print(f"error model: rho {model.rho:.3f}, {figures['representatives']} representative "
          f"probes of {figures['samples']}; FAR at 1 / 3 / 5 templates for t = 0.95: "
          + " / ".join(f"{model.far(0.95, n):.2e}" for n in (1, 3, 5)))
    return section


def _write_error_model_only(bundle: Any, args: argparse.Namespace,
                            error_model: dict[str, Any]) -> int:
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    written = write_sections(bundle, args.out, error_model=error_model)
    print(f"wrote the error model to {written.path} (threshold {written.threshold:.6f} kept)")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _calibrate(args)
    except FacegateError as err:
        print(f"calibrate: {err.message}", file=sys.stderr)
        return 2

"""``facegate evaluate MODEL DATA``: verification figures of a model on held-out pairs.

MODEL is an exported bundle folder (embedded through ``facegate.core.embed``, the
same runtime the server uses), a training checkpoint ``.pt`` (embedded with
torch), or a ``.npz`` of precomputed embeddings keyed by crop path relative to
DATA (e.g. ``teacher_dlib.npz`` from ``facegate prepare --teacher dlib``: the
reference figures of dlib's pretrained ResNet on exactly the same pairs). DATA is a prepared crops folder (pairs: every genuine pair plus as many
seeded random impostor pairs) or an insightface ``.bin`` set. The model's own
threshold t is applied as is: nothing is tuned on the test pairs except the
10-fold accuracy's per-fold threshold, which is the protocol.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core import metrics
from facegate.core.errors import BundleError, FacegateError
from facegate.core.preprocess import l2_normalise
from facegate.train.verification import identity_metrics, verification_metrics

# Embeds the evaluation images; gets (uint8 crops, their keys: crop paths relative to DATA or None).
Embed = Callable[[np.ndarray, "list[str] | None"], np.ndarray]


class EvaluationError(FacegateError):
    """The model or the evaluation data cannot be used as given."""

    code = "evaluation_invalid"
    status = 400


def load_model(path: str | Path, *, flip: bool = True) -> tuple[Embed, float | None, str, dict]:
    """(embed function, threshold, threshold_source, description) of a bundle or checkpoint."""
    path = Path(path)
    if path.is_dir():
        from facegate.core.bundle import load_bundle
        from facegate.core.embed import create_embedder

        bundle = load_bundle(path)
        embedder = create_embedder(bundle, flip=flip)
        info = {"kind": "bundle", "path": str(path), "model_id": bundle.model_id,
                "runtime": embedder.runtime}
        return (lambda images, keys: embedder.embed(images)), bundle.threshold, \
            bundle.threshold_source, info
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as table:
            info = {"kind": "precomputed", "path": str(path), "vectors": len(table.files)}
        return (lambda images, keys: lookup_embeddings(path, keys)), None, "none", info
    if path.suffix == ".pt" and path.is_file():
        from facegate.train.checkpoint import build_backbone, load_checkpoint
        from facegate.train.embed import embed_torch

        try:
            ckpt = load_checkpoint(path)
        except BundleError as err:
            raise EvaluationError(str(err)) from err
        backbone = build_backbone(ckpt)
        info = {"kind": "checkpoint", "path": str(path), "epoch": ckpt.get("epoch"),
                "step": ckpt.get("step"), "runtime": "torch-cpu"}
        return (
            lambda images, keys: embed_torch(backbone, images, flip=flip, progress=True),
            ckpt.get("threshold"),
            ckpt.get("threshold_source", "none"),
            info,
        )
    raise EvaluationError(f"{path}: neither a bundle folder, a checkpoint .pt nor a .npz file")


def lookup_embeddings(path: Path, keys: list[str] | None) -> np.ndarray:
    """L2-normalised precomputed embeddings of the evaluation crops, in order."""
    from facegate.train.teacher import MissingVectors, load_vectors

    if keys is None:
        raise EvaluationError(f"{path}: precomputed embeddings need a crops folder as DATA")
    try:
        table = load_vectors(path, keys)
    except MissingVectors as err:
        raise EvaluationError(f"{path}: no embedding for {len(err.missing)} crops, "
                              f"e.g. {err.missing[0]}") from None
    return l2_normalise(table)


# ---------------------------------------------------------------- data


def load_pairs(
    data: str | Path, identities: Sequence[str] | None = None, seed: int = 0
) -> tuple[np.ndarray, list[str] | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(images, keys, first, second, same, pair identities (P, 2)) of a crops folder or .bin.

    ``keys`` (crop paths relative to DATA) and pair identities are None for a .bin set.
    """
    data = Path(data)
    if data.suffix == ".bin":
        from facegate.train.binset import load_bin

        images, issame = load_bin(data, progress=True)
        first = np.arange(0, len(images), 2)
        return images, None, first, first + 1, issame, None
    from facegate.train.data import CropFolder

    try:
        folder = CropFolder(data, identities)
    except (FileNotFoundError, KeyError) as err:
        raise EvaluationError(f"{data}: {err}") from err
    first, second, same = metrics.verification_pairs(folder.labels, seed=seed)
    names = np.asarray(folder.identities)[folder.labels]
    images = folder.load(progress=True)
    pair_ids = np.stack([names[first], names[second]], axis=1)
    return images, folder.relative_paths, first, second, same, pair_ids


def evaluate(
    model: str | Path,
    data: str | Path,
    *,
    identities: Sequence[str] | None = None,
    out: str | Path | None = None,
    threshold: float | None = None,
    flip: bool = True,
) -> dict[str, Any]:
    """Compute every figure, write metrics.json, roc.png and thresholds.png into ``out``."""
    from facegate.train.plots import plot_roc, plot_threshold_histogram

    embed, model_t, source, info = load_model(model, flip=flip)
    if threshold is not None:
        model_t, source = threshold, "command-line"
    images, keys, first, second, same, pair_ids = load_pairs(data, identities)
    if same.all() or not same.any():
        raise EvaluationError(f"{data}: needs both genuine and impostor pairs")
    scores = metrics.pair_cosines(embed(images, keys), first, second)
    result: dict[str, Any] = {"model": info, "data": str(data), "images": int(len(images)),
                              "threshold_source": source, "flip": flip}
    result.update(verification_metrics(scores, same, model_t))
    if pair_ids is not None:
        result["identity_level"] = identity_metrics(scores, same, pair_ids[:, 0], pair_ids[:, 1], model_t)
    out_dir = Path(out) if out is not None else Path("eval") / Path(model).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    far, tar, _ = metrics.roc_curve(scores, same)
    plot_roc(far, tar, out_dir / "roc.png", title=f"ROC on {Path(data).name}")
    if pair_ids is not None:
        best = [r["best_threshold"] for r in result["identity_level"]["per_identity"].values()
                if "best_threshold" in r]
        plot_threshold_histogram(best, model_t, out_dir / "thresholds.png")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    np.savez_compressed(out_dir / "scores.npz", scores=scores, same=same)  # for overlaid ROCs
    result["out"] = str(out_dir)
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [("pairs", f"{result['pairs']} ({result['genuine_pairs']} genuine)"),
            ("10-fold accuracy", f"{result['accuracy']:.4f} ± {result['accuracy_std']:.4f}")]
    rows += [(k, f"{v:.4f}") for k, v in result.items() if k.startswith("tar@")]
    t = result.get("threshold")
    if t is not None:
        rows.append((f"accuracy@t (t={t:.4f}, {result['threshold_source']})",
                     f"{result['accuracy@t']:.4f}"))
    level = result.get("identity_level")
    if level and level.get("opis") is not None:
        low, high = level["range"]
        rows.append((f"OPIS over {level['identities']} identities, t in [{low:.3f}, {high:.3f}]",
                     f"{level['opis']:.3e}"))
        rows.append(("10%-OPIS", f"{level['opis_10']:.3e}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path,
                        help="bundle folder, checkpoint .pt, or .npz of embeddings keyed by crop path")
    parser.add_argument("data", type=Path, help="prepared crops folder or a .bin verification set")
    parser.add_argument("--identities", type=Path,
                        help="split.json of a run (its 'test' list) or a text file, one identity a line")
    parser.add_argument("--out", type=Path, help="output folder (default eval/<model name>)")
    parser.add_argument("--threshold", type=float, help="override the model's threshold t")
    parser.add_argument("--no-flip", dest="flip", action="store_false",
                        help="embed without the mirrored-image sum")


def read_identities(path: Path) -> list[str]:
    """Identities from a run's split.json ('test' list) or a plain text file."""
    if path.suffix == ".json":
        split = json.loads(path.read_text())
        if "test" not in split:
            raise EvaluationError(f"{path}: no 'test' list")
        return [str(i) for i in split["test"]]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    identities = read_identities(args.identities) if args.identities else None
    result = evaluate(args.model, args.data, identities=identities, out=args.out,
                      threshold=args.threshold, flip=args.flip)
    print(format_table(result))
    print(f"written: {Path(result['out']) / 'metrics.json'}")
    return 0 if all(math.isfinite(result[k]) for k in ("accuracy", "accuracy_std")) else 1

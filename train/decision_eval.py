"""Held-out evaluation of the decisions the server makes (docs/results.md, "Decisions at
every scale"), in NIST FRTE / ISO/IEC 19795-1 terms: 1:1 FNMR at FMR, verify-against-
identity FAR/FRR by template count, open-set FNIR/FPIR by gallery size, and how close
the error model's estimates come to the measured rates.

Protocol: identities are split into K folds; for each fold the error model (and the USS
pair threshold, as `facegate calibrate` learns them) is fitted on the other folds only,
and the fold's people are the strangers and the held-out identities. Open-set galleries
are drawn from the other folds (3 photos each, the rest of their photos are the mated
probes): the model saw those people only as impostors of each other, never the
strangers searched against them. CelebA lists some people twice; identities whose mean
embeddings have cosine >= DUPLICATE_COSINE are merged first (one pair on the shared set,
7392 and 7393, checked by eye: the same actress).

    python -m facegate.train.decision_eval EMBEDDINGS.npz --out eval/decisions

EMBEDDINGS.npz: 'embeddings' and 'labels' of the shared photos as the server embeds them
(`facegate calibrate models/default ../shared/data/celeba-subset/images --dry-run
--save-embeddings EMBEDDINGS.npz`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.error_model import ErrorCurves, ErrorModel, fit_error_model

DUPLICATE_COSINE = 0.99
FOLDS = 8
GALLERY_SIZES = (20, 50, 100, 200)
ENROL_PHOTOS = 3
TEMPLATE_COUNTS = (1, 3, 5)
TARGET = 0.01
REPEATS = 6


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def merge_duplicates(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list]:
    """Labels with identities whose mean embeddings are near-identical merged, and the pairs."""
    names = np.unique(labels)
    means = unit(np.stack([embeddings[labels == n].mean(axis=0) for n in names]))
    cos = means @ means.T
    np.fill_diagonal(cos, -1)
    merged = labels.copy()
    pairs = []
    for i, j in zip(*np.nonzero(np.triu(cos >= DUPLICATE_COSINE)), strict=True):
        merged[merged == names[j]] = names[i]
        pairs.append((str(names[i]), str(names[j]), float(cos[i, j])))
    return merged, pairs


@dataclass
class Fold:
    model: ErrorModel
    curves: ErrorCurves
    pair_threshold: float
    train: np.ndarray  # row mask
    test: np.ndarray


def fit_fold(z: np.ndarray, labels: np.ndarray, held: np.ndarray) -> Fold:
    """The error model and USS pair threshold of the identities outside ``held``."""
    from facegate.train.uss_threshold import learn_threshold, negative_weight_for_far

    test = np.isin(labels, held)
    train = ~test
    model, _ = fit_error_model(z[train], labels[train])
    weight = negative_weight_for_far(z[train], labels[train], TARGET, s=64.0, m=0.1,
                                     negatives="mean")
    t = learn_threshold(z[train], labels[train], s=64.0, m=0.1, negatives="mean",
                        negative_weight=weight)
    return Fold(model, ErrorCurves(model), float(t), train, test)


def pair_scores(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) cosines of every pair i < j."""
    cos = z @ z.T
    upper = np.triu(np.ones_like(cos, dtype=bool), 1)
    same = labels[:, None] == labels[None, :]
    return cos[upper & same], cos[upper & ~same]


def identity_trials(z: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator):
    """(genuine, impostor) max-over-n-templates scores: each identity with > n photos
    enrols n random ones; its other photos are genuine probes, everyone else's impostors."""
    genuine, impostor = [], []
    for name in np.unique(labels):
        rows = np.nonzero(labels == name)[0]
        if len(rows) <= n:
            continue
        enrolled = rng.choice(rows, n, replace=False)
        probes = np.setdiff1d(rows, enrolled)
        genuine.append((z[probes] @ z[enrolled].T).max(axis=1))
        impostor.append((z[labels != name] @ z[enrolled].T).max(axis=1))
    return np.concatenate(genuine), np.concatenate(impostor)


def open_set_trial(z: np.ndarray, labels: np.ndarray, fold: Fold, size: int,
                   rng: np.random.Generator) -> dict[str, Any]:
    """One gallery of ``size`` identities from the fold's training side: the strangers'
    best scores, and the mated probes' best score and whether rank 1 is right."""
    pool = np.unique(labels[fold.train])
    chosen = rng.choice(pool, min(size, len(pool)), replace=False)
    rows, owners, probes, probe_owner = [], [], [], []
    for name in chosen:
        photos = rng.permutation(np.nonzero(labels == name)[0])
        rows.extend(photos[:ENROL_PHOTOS])
        owners.extend([name] * len(photos[:ENROL_PHOTOS]))
        probes.extend(photos[ENROL_PHOTOS:])
        probe_owner.extend([name] * len(photos[ENROL_PHOTOS:]))
    gallery = z[rows]
    owners_a = np.asarray(owners)
    strangers = (z[fold.test] @ gallery.T).max(axis=1)
    mated = z[probes] @ gallery.T
    composition = dict(zip(*np.unique(np.unique(owners_a, return_counts=True)[1],
                                      return_counts=True), strict=True))
    composition = {int(k): int(v) for k, v in composition.items()}
    return {
        "size": len(chosen), "composition": composition, "strangers": strangers,
        "stranger_owner": labels[fold.test],
        "mated_best": mated.max(axis=1),
        "mated_right": owners_a[mated.argmax(axis=1)] == np.asarray(probe_owner),
    }


def evaluate(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Every figure of the report, pooled over the folds."""
    z = unit(np.asarray(embeddings, dtype=np.float64))
    labels, duplicates = merge_duplicates(z, np.asarray(labels))
    rng = np.random.default_rng(seed)
    folds = np.array_split(rng.permutation(np.unique(labels)), FOLDS)
    out: dict[str, Any] = {"duplicates_merged": duplicates, "folds": FOLDS,
                           "identities": int(len(np.unique(labels))), "samples": int(len(z)),
                           "pair": [], "identity": [], "open_set": []}
    for f, held in enumerate(folds):
        fold = fit_fold(z, labels, held)
        zt, lt = z[fold.test], labels[fold.test]
        genuine, impostor = pair_scores(zt, lt)
        out["pair"].append({"fold": f, "threshold": fold.pair_threshold,
                            "genuine": genuine, "impostor": impostor, "model": fold})
        for n in TEMPLATE_COUNTS:
            g, i = identity_trials(zt, lt, n, rng)
            out["identity"].append({"fold": f, "templates": n, "genuine": g, "impostor": i,
                                    "model": fold})
        for size in (*GALLERY_SIZES, None):  # None: every training identity
            whole = size is None or size >= len(np.unique(labels[fold.train]))
            for _ in range(1 if whole else REPEATS):
                trial = open_set_trial(z, labels, fold, size or len(z), rng)
                trial.update(fold=f, model=fold, identities=trial["size"],
                             size="all" if whole else size)
                out["open_set"].append(trial)
        if progress:
            print(f"fold {f + 1}/{FOLDS}: {len(np.unique(lt))} held-out identities, "
                  f"pair t {fold.pair_threshold:.4f}", file=sys.stderr, flush=True)
    return out


def rate_and_interval(hits: np.ndarray, groups: np.ndarray, rng: np.random.Generator,
                      draws: int = 400) -> tuple[float, float, float]:
    """The rate and its 95% bootstrap interval, resampling whole identities (errors of one
    person's photos come together)."""
    names, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=hits.astype(float), minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names)).astype(float)
    boot = []
    for _ in range(draws):
        pick = rng.integers(len(names), size=len(names))
        boot.append(sums[pick].sum() / max(counts[pick].sum(), 1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(hits.mean()), float(lo), float(hi)


def summarise(result: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Tables: pair, identity by template count, open set by gallery size (pooled folds)."""
    rng = np.random.default_rng(seed)
    pair = result["pair"]
    genuine = np.concatenate([p["genuine"] for p in pair])
    served_g = np.concatenate([p["genuine"] >= p["threshold"] for p in pair])
    served_i = np.concatenate([p["impostor"] >= p["threshold"] for p in pair])
    estimated = np.mean([p["model"].curves.rate(p["model"].curves.curve({1: 1}), p["threshold"])
                         for p in pair])
    tables: dict[str, Any] = {
        "pair": {"far": float(served_i.mean()), "frr": float(1 - served_g.mean()),
                 "estimated_far": float(estimated), "genuine_pairs": int(len(genuine)),
                 "impostor_pairs": int(len(served_i)),
                 "thresholds": [p["threshold"] for p in pair]},
        "identity": [], "open_set": [], "calibration": [],
    }
    for n in TEMPLATE_COUNTS:
        rows = [r for r in result["identity"] if r["templates"] == n]
        served = [r["model"].curves.threshold(r["model"].curves.curve({n: 1}), TARGET)
                  for r in rows]
        far = np.concatenate([r["impostor"] >= t for r, t in zip(rows, served, strict=True)])
        frr = np.concatenate([r["genuine"] < t for r, t in zip(rows, served, strict=True)])
        old_far = np.concatenate([r["impostor"] >= r["model"].pair_threshold for r in rows])
        old_frr = np.concatenate([r["genuine"] < r["model"].pair_threshold for r in rows])
        tables["identity"].append({
            "templates": n, "target_far": TARGET, "far": float(far.mean()),
            "frr": float(frr.mean()), "threshold": float(np.mean(served)),
            "pair_threshold_far": float(old_far.mean()), "pair_threshold_frr": float(old_frr.mean()),
            "impostor_trials": int(len(far)), "genuine_trials": int(len(frr)),
        })
    for size in gallery_keys(result):
        rows = [t for t in result["open_set"] if t["size"] == size]
        served = [t["model"].curves.threshold(t["model"].curves.curve(t["composition"]), TARGET)
                  for t in rows]
        false_pos = np.concatenate([t["strangers"] >= s for t, s in zip(rows, served, strict=True)])
        owners = np.concatenate([t["stranger_owner"] for t in rows])
        fpir, lo, hi = rate_and_interval(false_pos, owners, rng)
        hit = np.concatenate([(t["mated_best"] >= s) & t["mated_right"]
                              for t, s in zip(rows, served, strict=True)])
        old = np.concatenate([t["strangers"] >= t["model"].pair_threshold for t in rows])
        # TPIR of the threshold that gives exactly the measured FPIR (the best a single
        # threshold can do at that FPIR): the stranger-score quantile, pooled.
        strangers = np.concatenate([t["strangers"] for t in rows])
        best_t = float(np.quantile(strangers, 1 - fpir)) if fpir > 0 else float(strangers.max())
        best_hit = np.concatenate([(t["mated_best"] >= best_t) & t["mated_right"] for t in rows])
        rank1 = np.concatenate([t["mated_right"] for t in rows])
        tables["open_set"].append({
            "gallery": size, "identities": float(np.mean([t["identities"] for t in rows])),
            "target_fpir": TARGET, "fpir": fpir, "fpir_95": [lo, hi],
            "fnir": float(1 - hit.mean()), "tpir": float(hit.mean()),
            "tpir_best_same_fpir": float(best_hit.mean()), "rank1": float(rank1.mean()),
            "threshold": float(np.mean(served)), "pair_threshold_fpir": float(old.mean()),
            "stranger_searches": int(len(false_pos)), "mated_searches": int(len(hit)),
        })
    tables["calibration"] = calibration_points(result)
    return tables


def gallery_keys(result: dict[str, Any]) -> list:
    """Gallery sizes measured, smallest first, "all" last."""
    sizes = {t["size"] for t in result["open_set"]}
    return sorted(s for s in sizes if s != "all") + (["all"] if "all" in sizes else [])


def calibration_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Estimated against measured rates at a ladder of thresholds: pairs, identities of
    n templates, galleries of each size (pooled over folds; only rates with >= 20 events)."""
    points = []
    grid = np.linspace(0.90, 0.99, 37)

    def ladder(kind: str, key: Any, rows: list, scores, composition) -> None:
        for t in grid:
            hits = np.concatenate([scores(r) >= t for r in rows])
            if hits.sum() < 20:
                continue
            est = np.mean([r["model"].curves.rate(r["model"].curves.curve(composition(r)), t)
                           for r in rows])
            points.append({"kind": kind, "key": key, "threshold": float(t),
                           "measured": float(hits.mean()), "estimated": float(est)})

    ladder("pair", 1, result["pair"], lambda r: r["impostor"], lambda r: {1: 1})
    for n in TEMPLATE_COUNTS:
        rows = [r for r in result["identity"] if r["templates"] == n]
        ladder("identity", n, rows, lambda r: r["impostor"], lambda r, n=n: {n: 1})
    for size in gallery_keys(result):
        rows = [t for t in result["open_set"] if t["size"] == size]
        ladder("open_set", size, rows, lambda r: r["strangers"], lambda r: r["composition"])
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("embeddings", type=Path)
    parser.add_argument("--out", type=Path, default=Path("eval/decisions"))
    args = parser.parse_args(argv)
    with np.load(args.embeddings, allow_pickle=False) as table:
        embeddings, labels = table["embeddings"], table["labels"]
    result = evaluate(embeddings, labels)
    tables = summarise(result)
    tables.update(duplicates_merged=result["duplicates_merged"], folds=result["folds"],
                  identities=result["identities"], samples=result["samples"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decisions.json").write_text(json.dumps(tables, indent=1))
    from facegate.train.decision_plots import plot_all

    plot_all(result, tables, args.out)
    print(json.dumps({k: tables[k] for k in ("pair", "identity", "open_set")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

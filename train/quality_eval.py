"""Held-out evaluation of the face-quality score (docs/results.md, "Face quality"), in
ISO/IEC 29794-1 terms: error-versus-discard curves (EDC; FNMR after discarding the
lowest-scored fraction of photos, at fixed thresholds) for the score, each component and
random discard, and the effect of enrolment review on verify-against-identity FNMR.

Protocol: identities (duplicates merged, ``decision_eval.merge_duplicates``) are split
into FOLDS folds by ``numpy.random.default_rng(seed).permutation``, for SEEDS seeds; for
each held-out fold the quality model is fitted on the other folds only (``quality_fit.fit``)
and every figure is measured on the fold's photos. Thresholds are fixed before discarding:
the bundle's served one, and the one with FMR 1e-3 on the fold's impostor pairs.

    python -m facegate.train.quality_eval SIGNALS.npz --threshold T --out eval/quality

SIGNALS.npz: 'embeddings', 'labels', 'quality_features' of the shared photos as the server
makes them (`facegate calibrate models/default ../shared/data/celeba-subset/images
--quality-only --dry-run --save-embeddings SIGNALS.npz`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core.error_model import ErrorCurves, fit_error_model
from facegate.core.quality import FEATURES, REVIEW_RULES, QualityModel
from facegate.train.decision_eval import merge_duplicates
from facegate.train.quality_fit import fit
from facegate.train.uss_threshold import CalibrationError

FOLDS = 4
SEEDS = 5
FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
FMR_TARGET = 1e-3
ENROL_COUNTS = (1, 3)


def _column(features: np.ndarray, name: str) -> np.ndarray:
    return features[:, FEATURES.index(name)]


def rankings(model: QualityModel, features: np.ndarray, rng: np.random.Generator
             ) -> dict[str, np.ndarray]:
    """Each method's score per photo (higher = better): the model, each component, random."""
    out = {"score": model.scores(features)}
    for name, comp in model.components.items():
        cols = [FEATURES.index(f) for f in comp.features]
        out[name] = 1.0 - comp.p(features[:, cols])
    out["random"] = rng.random(len(features))
    return out


def edc(z: np.ndarray, labels: np.ndarray, quality: np.ndarray, thresholds: dict[str, float]
        ) -> dict[str, list[float]]:
    """FNMR (per threshold) and FMR at the first threshold after discarding each fraction
    of the lowest-quality photos (ties broken by order)."""
    order = np.argsort(quality, kind="stable")
    cos = z @ z.T
    upper = np.triu(np.ones_like(cos, dtype=bool), 1)
    same = labels[:, None] == labels[None, :]
    out: dict[str, list[float]] = {f"fnmr@{k}": [] for k in thresholds}
    out["fmr@served"] = []
    for fraction in FRACTIONS:
        keep = np.ones(len(z), bool)
        keep[order[: int(round(fraction * len(z)))]] = False
        both = upper & keep[:, None] & keep[None, :]
        genuine, impostor = cos[both & same], cos[both & ~same]
        for key, t in thresholds.items():
            out[f"fnmr@{key}"].append(float((genuine < t).mean()))
        out["fmr@served"].append(float((impostor >= thresholds["served"]).mean()))
    return out


def review_effect(z: np.ndarray, labels: np.ndarray, features: np.ndarray, model: QualityModel,
                  threshold: float, rng: np.random.Generator, enrol: int) -> dict[str, list[int]]:
    """Verify-against-identity (misses, probes) with ``enrol`` templates, without review and
    with each mode's size/pose/quality rules (refused photos replaced by the next ones
    drawn; identity conflicts need a gallery and are not simulated)."""
    ok = {"off": np.ones(len(z), bool)}
    for mode, rules in REVIEW_RULES.items():
        ok[mode] = ((np.exp(_column(features, "log_size")) >= rules.min_eye_distance)
                    & (_column(features, "yaw") <= rules.max_yaw)
                    & (_column(features, "roll") <= rules.max_roll)
                    & (model.scores(features) >= model.cut(rules.quality_fraction)))
    misses = {mode: [0, 0] for mode in ok}
    for name in np.unique(labels):
        rows = rng.permutation(np.nonzero(labels == name)[0])
        enrolled = {mode: [r for r in rows if good[r]][:enrol] for mode, good in ok.items()}
        if any(len(e) < enrol for e in enrolled.values()):
            continue
        probes = [r for r in rows if not any(r in e for e in enrolled.values())]
        for mode, rows_enrolled in enrolled.items():
            best = (z[probes] @ z[rows_enrolled].T).max(axis=1)
            misses[mode][0] += int((best < threshold).sum())
            misses[mode][1] += len(probes)
    return misses


def conflict_rates(z: np.ndarray, labels: np.ndarray, curves: ErrorCurves,
                   rng: np.random.Generator) -> dict[str, int]:
    """Strict review's identity-conflict rule (``server.review.conflict``) on a gallery of
    these people, ENROL_COUNTS[-1] random templates each: how many of their other photos
    it refuses when added to their own identity, and how many it catches when added to
    another (random) one. The search threshold is the gallery's (FPIR 1%)."""
    n = ENROL_COUNTS[-1]
    enrolled, probes = {}, []
    for name in np.unique(labels):
        rows = rng.permutation(np.nonzero(labels == name)[0])
        if len(rows) > n:
            enrolled[name] = rows[:n]
            probes += [(len(enrolled) - 1, r) for r in rows[n:]]
    templates = np.stack([z[rows] for rows in enrolled.values()])  # (I, n, D)
    found_at = curves.threshold(curves.curve({n: len(enrolled)}), 0.01)

    def refused(best: np.ndarray, own: int) -> bool:
        others = np.delete(best, own)
        return bool((others > best[own]).any() or (others >= found_at).any())

    out = {"genuine_refused": 0, "intruders_caught": 0, "photos": len(probes)}
    for own, row in probes:
        best = (templates @ z[row]).max(axis=1)
        out["genuine_refused"] += refused(best, own)
        other = int(rng.choice([k for k in range(len(enrolled)) if k != own]))
        out["intruders_caught"] += refused(best, other)
    return out


def evaluate(z: np.ndarray, labels: np.ndarray, features: np.ndarray, served: float,
             seeds: int = SEEDS) -> dict[str, Any]:
    labels, merged = merge_duplicates(z, labels)
    names = np.unique(labels)
    splits = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        perm = rng.permutation(names)
        for fold in range(FOLDS):
            held = np.isin(labels, perm[fold::FOLDS])
            model = fit(z[~held], features[~held], labels[~held], served)
            zt, lt, ft = z[held], labels[held], features[held]
            cos = zt @ zt.T
            impostor = cos[np.triu(np.ones_like(cos, dtype=bool), 1) & (lt[:, None] != lt[None, :])]
            thresholds = {"served": served, "fmr1e-3": float(np.quantile(impostor, 1 - FMR_TARGET))}
            curves = {k: edc(zt, lt, q, thresholds)
                      for k, q in rankings(model, ft, rng).items()}
            error, _ = fit_error_model(z[~held], labels[~held])
            ec = ErrorCurves(error)
            review = {}
            for n in ENROL_COUNTS:  # at the identity threshold the server uses (FAR 1%)
                t_n = ec.threshold(ec.curve({n: 1}), 0.01)
                review[str(n)] = review_effect(zt, lt, ft, model, t_n, rng, n)
            splits.append({"seed": seed, "fold": fold, "thresholds": thresholds,
                           "curves": curves, "review": review,
                           "conflicts": conflict_rates(zt, lt, ec, rng)})
    return {"fractions": list(FRACTIONS), "merged": merged, "splits": splits}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Mean, sd and 2.5/97.5 percentiles over splits of each curve and of the relative
    change at each fraction; review FNMR pooled and per split."""
    fractions = result["fractions"]
    splits = result["splits"]
    out: dict[str, Any] = {"splits": len(splits), "fractions": fractions, "methods": {}}
    for method in splits[0]["curves"]:
        entry = {}
        for key in splits[0]["curves"][method]:
            values = np.array([s["curves"][method][key] for s in splits])
            change = values / np.maximum(values[:, :1], 1e-12) - 1.0
            entry[key] = {"mean": values.mean(axis=0).tolist(),
                          "change_mean": change.mean(axis=0).tolist(),
                          "change_sd": change.std(axis=0, ddof=1).tolist(),
                          "change_p2.5": np.percentile(change, 2.5, axis=0).tolist(),
                          "change_p97.5": np.percentile(change, 97.5, axis=0).tolist()}
        out["methods"][method] = entry
    review: dict[str, dict[str, Any]] = {}
    for n, modes in splits[0]["review"].items():
        review[n] = {}
        for mode in modes:
            rates = np.array([s["review"][n][mode][0] / max(s["review"][n][mode][1], 1)
                              for s in splits])
            change = rates / np.maximum(np.array([s["review"][n]["off"][0] / max(
                s["review"][n]["off"][1], 1) for s in splits]), 1e-12) - 1.0
            review[n][mode] = {"fnmr_mean": float(rates.mean()), "fnmr_sd": float(rates.std(ddof=1)),
                               "change_mean": float(change.mean()), "change_sd": float(change.std(ddof=1))}
    out["review"] = review
    out["conflicts"] = {key: float(np.mean([s["conflicts"][key] / s["conflicts"]["photos"]
                                            for s in splits]))
                        for key in ("genuine_refused", "intruders_caught")}
    return out


def plot(summary: dict[str, Any], path: Path) -> Path:
    """The EDC figure: FNMR at the served threshold and at FMR 1e-3 against the fraction of
    photos discarded, mean over splits, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = 100 * np.array(summary["fractions"])
    for ax, key, title in ((axes[0], "fnmr@served", "at the served threshold"),
                           (axes[1], "fnmr@fmr1e-3", "at FMR 1e-3")):
        for method, entry in summary["methods"].items():
            style = {"score": "-k", "random": ":", "stability": "--"}.get(method, "-")
            ax.plot(x, 100 * np.array(entry[key]["mean"]), style, label=method,
                    linewidth=2.2 if method == "score" else 1.2)
        ax.set(xlabel="photos discarded (lowest quality first), %", ylabel="FNMR, %",
               title=f"FNMR {title} ({summary['splits']} held-out identity splits)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("signals", type=Path)
    parser.add_argument("--threshold", type=float, required=True, help="the served threshold")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figure", type=Path, help="also draw the EDC figure here (.png)")
    args = parser.parse_args(argv)
    with np.load(args.signals, allow_pickle=False) as table:
        if "quality_features" not in table:
            raise CalibrationError(f"{args.signals}: no 'quality_features'")
        z, labels, features = table["embeddings"], table["labels"], table["quality_features"]
    found = ~np.isnan(features).any(axis=1)
    result = evaluate(z[found].astype(np.float64), labels[found], features[found],
                      args.threshold, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarise(result)
    (args.out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.figure is not None:
        plot(summary, args.figure)
    five = FRACTIONS.index(0.05)
    for method, entry in summary["methods"].items():
        print(f"{method:>10}: 5% discarded: FNMR@served {entry['fnmr@served']['change_mean'][five]:+.1%}"
              f" (sd {entry['fnmr@served']['change_sd'][five]:.1%}), FNMR@FMR1e-3 "
              f"{entry['fnmr@fmr1e-3']['change_mean'][five]:+.1%} "
              f"(sd {entry['fnmr@fmr1e-3']['change_sd'][five]:.1%}), FMR "
              f"{entry['fmr@served']['change_mean'][five]:+.1%}")
    for n, modes in summary["review"].items():
        for mode, entry in modes.items():
            print(f"review {mode}: verify-identity FNMR with {n} photo(s) {entry['fnmr_mean']:.2%}"
                  f" (sd {entry['fnmr_sd']:.2%}; {entry['change_mean']:+.1%} against off, sd "
                  f"{entry['change_sd']:.1%})")
    conflicts = summary["conflicts"]
    print(f"strict identity conflicts (a held-out fold's gallery): genuine photos refused "
          f"{conflicts['genuine_refused']:.2%}, another person's photos caught "
          f"{conflicts['intruders_caught']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

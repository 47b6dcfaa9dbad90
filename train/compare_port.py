"""The dlib-port comparison of docs/results.md: frozen port with each threshold rule, and
fine-tuned checkpoints, on the held-out identities of the trainer's split.

Every threshold comes from the TRAINING identities only: the accuracy-maximising one on
their pairs, USS's paper form (negatives summed over classes), its verification form
(negatives averaged, weighted by lambda; lambda=1, or chosen so t gives a target FAR on
the training identities' own impostor pairs), or the t a fine-tuning run learned.
Usage: python -m facegate.train.compare_port CROPS --model runs/port/bundle
       [--model runs/ft/checkpoint_last.pt ...] --out runs/port/compare
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from facegate.core import metrics
from facegate.train.data import CropFolder, split_identities
from facegate.train.evaluate import load_model
from facegate.train.uss_threshold import learn_threshold, negative_weight_for_far
from facegate.train.verification import identity_metrics, verification_metrics

TARGET_FARS = (1e-3, 3e-3, 1e-2)


def threshold_rules(train_emb: np.ndarray, train_labels: np.ndarray) -> dict[str, float]:
    """Each rule's threshold, learned on training identities' embeddings alone."""
    first, second, same = metrics.verification_pairs(train_labels, seed=0)
    train_scores = metrics.pair_cosines(train_emb, first, second)
    rules = {"best accuracy on training pairs": metrics.best_accuracy_threshold(train_scores, same)}
    rules["USS paper form (sum)"] = learn_threshold(train_emb, train_labels, negatives="sum")
    rules["USS verification, lambda=1"] = learn_threshold(train_emb, train_labels, negatives="mean")
    for far in TARGET_FARS:
        weight = negative_weight_for_far(train_emb, train_labels, far)
        rules[f"USS verification, lambda={weight:.1f} (FAR {far:g} on training ids)"] = \
            learn_threshold(train_emb, train_labels, negatives="mean", negative_weight=weight)
    return rules


def test_row(scores: np.ndarray, same: np.ndarray, names: np.ndarray, first: np.ndarray,
             second: np.ndarray, t: float) -> dict[str, Any]:
    """The table's columns for one threshold on the held-out pairs."""
    m = verification_metrics(scores, same, t)
    level = identity_metrics(scores, same, names[first], names[second], t)
    accept = scores >= t
    return {"t": t, "accuracy": m["accuracy"], "accuracy_std": m["accuracy_std"],
            **{k: v for k, v in m.items() if k.startswith("tar@")},
            "accuracy@t": m["accuracy@t"], "far@t": float((accept & ~same).sum() / (~same).sum()),
            "frr@t": float((~accept & same).sum() / same.sum()),
            "opis": level.get("opis"), "opis_10": level.get("opis_10")}


def compare(crops: Path, model: Path, *, flip: bool, holdout: int = 48) -> dict[str, Any]:
    everything = CropFolder(crops)
    train_ids, test_ids = split_identities(everything.identities, holdout, 0)
    embed, model_t, source, _ = load_model(model, flip=flip)
    train, test = CropFolder(crops, train_ids), CropFolder(crops, test_ids)
    started = time.perf_counter()
    train_emb = embed(train.load(), train.relative_paths)
    test_emb = embed(test.load(), test.relative_paths)
    seconds = time.perf_counter() - started
    rules = threshold_rules(train_emb, train.labels)
    if model_t is not None and source not in ("operator", "none"):
        rules[f"learned in training ({source})"] = float(model_t)
    first, second, same = metrics.verification_pairs(test.labels, seed=0)
    scores = metrics.pair_cosines(test_emb, first, second)
    names = np.asarray(test.identities)[test.labels]
    return {"model": str(model), "flip": flip, "embed_seconds": round(seconds, 1),
            "train_identities": len(train_ids), "test_identities": len(test_ids),
            "pairs": int(same.size), "genuine_pairs": int(same.sum()),
            "rules": {name: test_row(scores, same, names, first, second, t)
                      for name, t in rules.items()}}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | flip | threshold rule | t | 10-fold acc. | TAR@FAR1e-2 | TAR@FAR1e-3 "
             "| acc. at t | FAR at t | FRR at t | OPIS | 10%-OPIS |", "|" + "---|" * 12]
    for result in results:
        for rule, r in result["rules"].items():
            lines.append(
                f"| {Path(result['model']).parent.name}/{Path(result['model']).name} "
                f"| {'yes' if result['flip'] else 'no'} | {rule} | {r['t']:.4f} "
                f"| {100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}% "
                f"| {100 * r['tar@far=1e-2']:.2f}% | {100 * r['tar@far=1e-3']:.2f}% "
                f"| {100 * r['accuracy@t']:.2f}% | {100 * r['far@t']:.2f}% | {100 * r['frr@t']:.2f}% "
                f"| {r['opis']:.2e} | {r['opis_10']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crops", type=Path, help="dlib-chip crops folder (facegate prepare)")
    parser.add_argument("--model", type=Path, action="append", required=True,
                        help="bundle folder or checkpoint .pt (repeat)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [compare(args.crops, model, flip=flip)
               for model in args.model for flip in (False, True)]
    (args.out / "compare.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

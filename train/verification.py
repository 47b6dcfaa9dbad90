"""Verification figures of scored pairs: 10-fold accuracy, TAR@FAR, accuracy at t, OPIS.

What ``facegate evaluate`` reports and the trainer logs as validation, from pair scores
(``metrics.pair_cosines``) alone, so both compute the same numbers. Pure NumPy over
``facegate.core.metrics``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from facegate.core import metrics

FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
MIN_FALSE_ACCEPTS = 5


def reachable_fars(impostors: int, fars: Sequence[float] = FARS) -> list[float]:
    """FAR targets the impostor count can measure: at least 5 / FAR impostor pairs, so the
    operating point rests on >= 5 false accepts (e.g. FAR 1e-3 on the ~9k impostor pairs
    of 48 CelebA identities rests on ~9: a rough figure, reported as such)."""
    return [f for f in fars if impostors >= MIN_FALSE_ACCEPTS / f - 1e-9]


def far_key(far: float) -> str:
    return f"tar@far={far:.0e}".replace("e-0", "e-")


def verification_metrics(
    scores: np.ndarray, labels: np.ndarray, threshold: float | None, fars: Sequence[float] = FARS
) -> dict[str, Any]:
    """10-fold accuracy, TAR@FAR where measurable, and accuracy at the model's threshold."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    mean, std = metrics.kfold_accuracy(scores, labels, folds=10, seed=0)
    out: dict[str, Any] = {
        "pairs": int(labels.size),
        "genuine_pairs": int(labels.sum()),
        "impostor_pairs": int((~labels).sum()),
        "accuracy": float(mean),
        "accuracy_std": float(std),
    }
    for far in reachable_fars(int((~labels).sum()), fars):
        tar, thr = metrics.tar_at_far(scores, labels, far)
        out[far_key(far)] = float(tar)
        out[far_key(far).replace("tar@", "threshold@")] = float(thr)
    out["threshold"] = threshold
    out["accuracy@t"] = (
        None if threshold is None else float(metrics.accuracy_at(scores, labels, threshold))
    )
    return out


def identity_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    id_first: np.ndarray,
    id_second: np.ndarray,
    threshold: float | None,
    points: int = metrics.OPIS_POINTS,
) -> dict[str, Any]:
    """OPIS / 10%-OPIS over identities and each identity's best threshold, FRR and FAR at t.

    Utility: F1 of accept/reject over the identity's genuine and impostor pairs. The
    calibration range (``range``, with the FARs that place it in ``range_fars``) runs from
    the global threshold at FAR 1e-1 to the one at the lowest FAR the impostor count
    measures: the span an operator chooses from. Without two measurable FARs it is the
    span of the scores (``range_fars`` None).
    """
    labels = np.asarray(labels, dtype=bool)
    genuine: dict[Any, list[float]] = defaultdict(list)
    impostor: dict[Any, list[float]] = defaultdict(list)
    for s, same, a, b in zip(scores, labels, id_first, id_second, strict=True):
        bucket = genuine if same else impostor
        bucket[a].append(float(s))
        if b != a:
            bucket[b].append(float(s))
    fars = reachable_fars(int((~labels).sum()))
    if len(fars) >= 2:
        d_min = metrics.threshold_at_far(scores[~labels], fars[0])
        d_max = metrics.threshold_at_far(scores[~labels], fars[-1])
    else:
        d_min, d_max = float(scores.min()), float(scores.max())
    opis = metrics.opis_summary(genuine, impostor, (d_min, d_max), points=points, epsilon=0.1)
    out: dict[str, Any] = {
        "utility": opis.utility,
        "points": opis.points,
        "range": list(opis.threshold_range),
        "range_fars": [fars[0], fars[-1]] if len(fars) >= 2 else None,
        "identities": opis.identities,
        "opis": opis.opis,
        "opis_10": opis.epsilon_opis,
    }
    per_identity = {}
    for name in sorted(genuine, key=str):
        g, i = np.asarray(genuine[name]), np.asarray(impostor.get(name, []))
        row: dict[str, Any] = {"genuine": int(g.size), "impostor": int(i.size)}
        if i.size:
            both = np.concatenate([g, i])
            same = np.concatenate([np.ones(g.size, bool), np.zeros(i.size, bool)])
            row["best_threshold"] = metrics.best_accuracy_threshold(both, same)
        if threshold is not None:
            row["frr@t"] = float(np.mean(g < threshold))
            row["far@t"] = float(np.mean(i >= threshold)) if i.size else None
        per_identity[str(name)] = row
    out["per_identity"] = per_identity
    return out

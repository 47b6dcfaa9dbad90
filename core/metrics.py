"""Verification metrics: pairs and their scores, ROC, TAR@FAR, 10-fold accuracy, thresholds, OPIS.

Pure NumPy, no I/O, so training, evaluation, export, the gallery's consistency monitor
and the benchmarks all compute the same numbers. Convention everywhere: a pair is
*accepted* when ``score >= threshold``; ``labels`` are truthy for genuine
(same-identity) pairs. Formulas follow ``shared/notes/losses-and-metrics.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "OPIS_EPSILON",
    "OPIS_POINTS",
    "OPIS_UTILITY",
    "OpisSummary",
    "accuracy_at",
    "best_accuracy_threshold",
    "epsilon_opis",
    "f1_utility",
    "kfold_accuracy",
    "opis",
    "opis_summary",
    "pair_cosines",
    "per_identity_utilities",
    "roc_curve",
    "split_identities",
    "tar_at_far",
    "threshold_at_far",
    "verification_pairs",
]

# OPIS as reported everywhere: F1 utility, the calibration range sampled at 101 points,
# epsilon-OPIS over the best and worst 10% of identities.
OPIS_POINTS = 101
OPIS_EPSILON = 0.1
OPIS_UTILITY = "f1"


def split_identities(
    identities: Iterable[str], test_count: int, seed: int
) -> tuple[list[str], list[str]]:
    """Disjoint (train, test) identity lists, each sorted; the same for the same seed (the
    trainer's split; here, without torch, so int8 calibration can keep to training ids)."""
    names = sorted(set(identities))
    if not 0 <= test_count <= len(names):
        raise ValueError(f"test_count {test_count} not in [0, {len(names)}]")
    order = np.random.default_rng(seed).permutation(len(names))
    test = {names[i] for i in order[:test_count]}
    return [n for n in names if n not in test], sorted(test)


def verification_pairs(
    labels: Any, seed: int, negatives_per_positive: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluation pairs: every same-identity pair plus seeded distinct different-identity pairs.

    ``labels``: one identity (int or str) per sample. Returns index arrays ``i < j`` and
    ``is_same`` (positives first). The number of negatives is ``negatives_per_positive``
    times the number of positives, capped by how many different-identity pairs exist.
    """
    labels = np.asarray(labels)
    n = len(labels)
    pos_i, pos_j = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        a, b = np.triu_indices(len(members), k=1)
        pos_i.append(members[a])
        pos_j.append(members[b])
    pi = np.concatenate(pos_i) if pos_i else np.empty(0, np.int64)
    pj = np.concatenate(pos_j) if pos_j else np.empty(0, np.int64)
    _, counts = np.unique(labels, return_counts=True)
    available = (n * (n - 1) - int((counts * (counts - 1)).sum())) // 2
    wanted = min(negatives_per_positive * len(pi), available)

    rng = np.random.default_rng(seed)
    chosen: dict[int, None] = {}  # pair code i * n + j, in draw order
    while len(chosen) < wanted:
        draw = max(1024, 2 * (wanted - len(chosen)))
        i = rng.integers(0, n, draw)
        j = rng.integers(0, n, draw)
        i, j = np.minimum(i, j), np.maximum(i, j)
        keep = labels[i] != labels[j]
        for code in (i[keep] * n + j[keep]).tolist():
            chosen.setdefault(code, None)
            if len(chosen) == wanted:
                break
    codes = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
    ni, nj = codes // n, codes % n
    is_same = np.concatenate([np.ones(len(pi), bool), np.zeros(len(ni), bool)])
    return (
        np.concatenate([pi, ni]).astype(np.int64),
        np.concatenate([pj, nj]).astype(np.int64),
        is_same,
    )


def pair_cosines(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Score of each pair (``first[k]``, ``second[k]``): the cosine of L2-normalised rows."""
    return np.einsum("nd,nd->n", embeddings[first], embeddings[second]).astype(np.float64)


def _scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    return s, y


def _require_both_classes(y: np.ndarray) -> None:
    if not y.any() or y.all():
        raise ValueError("need at least one genuine and one impostor pair")


def _check_rate(far: float) -> None:
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds) with thresholds descending, one point per distinct score.

    Exact on ties: every distinct score is one operating point (tied scores are
    accepted together). The first point is threshold ``+inf`` (accept nothing,
    FAR = TAR = 0), so the curve starts at the origin and ends at (1, 1).
    """
    s, y = _scores_labels(scores, labels)
    _require_both_classes(y)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Index of the last element of each run of equal scores (descending order).
    last_of_run = np.flatnonzero(np.diff(s_sorted) != 0)
    last_of_run = np.append(last_of_run, s_sorted.size - 1)
    genuine_accepted = np.cumsum(y_sorted)[last_of_run]
    impostor_accepted = (last_of_run + 1) - genuine_accepted
    n_genuine = int(y.sum())
    n_impostor = y.size - n_genuine
    far = np.concatenate([[0.0], impostor_accepted / n_impostor])
    tar = np.concatenate([[0.0], genuine_accepted / n_genuine])
    thresholds = np.concatenate([[np.inf], s_sorted[last_of_run]])
    return far, tar, thresholds


def tar_at_far(scores: Any, labels: Any, far: float) -> tuple[float, float]:
    """Largest TAR whose FAR <= ``far``, and the (largest) threshold that reaches it.

    Returns ``(nan, nan)`` when there are fewer than ``1/far`` impostor pairs:
    a FAR of 1e-4 cannot be measured on 1,000 impostors, and reporting the TAR at
    FAR = 0 under that name would be misleading.
    """
    _check_rate(far)
    s, y = _scores_labels(scores, labels)
    _require_both_classes(y)
    if (y.size - y.sum()) * far < 1.0:
        return math.nan, math.nan
    fars, tars, thresholds = roc_curve(s, y)
    allowed = fars <= far
    best = float(tars[allowed].max())
    # First (largest-threshold) point reaching the best TAR: least FAR spent.
    index = int(np.flatnonzero(allowed & (tars == best))[0])
    return best, float(thresholds[index])


def threshold_at_far(impostor_scores: Any, far: float) -> float:
    """Smallest threshold at which at most ``far`` of the impostor scores are accepted.

    With impostors sorted descending ``v_0 >= v_1 >= ...`` and ``k = floor(far * n)``
    allowed accepts, that is the float just above ``v_k`` (ties at ``v_k`` are all
    rejected, so FAR <= far holds exactly). Returns nan when ``n * far < 1``
    (too few impostors to measure that rate; see ``tar_at_far``).
    """
    _check_rate(far)
    v = np.sort(np.asarray(impostor_scores, dtype=np.float64).ravel())[::-1]
    if v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError("impostor_scores must be a non-empty finite array")
    if v.size * far < 1.0:
        return math.nan
    allowed_accepts = math.floor(v.size * far + 1e-9)
    return float(np.nextafter(v[allowed_accepts], np.inf))


def accuracy_at(scores: Any, labels: Any, threshold: float) -> float:
    """Fraction of pairs decided correctly when accepting ``score >= threshold``."""
    s, y = _scores_labels(scores, labels)
    if s.size == 0:
        raise ValueError("no pairs")
    return float(np.mean((s >= threshold) == y))


def best_accuracy_threshold(s: np.ndarray, y: np.ndarray) -> float:
    """Threshold maximising accuracy on (s, y): a midpoint between adjacent scores.

    Candidate k accepts the distinct scores ``u[k:]``; its threshold is the midpoint
    between ``u[k-1]`` and ``u[k]`` (below the minimum / above the maximum at the ends).
    Ties in accuracy go to the largest threshold.
    """
    u = np.unique(s)
    genuine = np.sort(s[y])
    impostor = np.sort(s[~y])
    # For each candidate lower edge u[k]: genuine accepted (>= u[k]), impostors rejected (< u[k]).
    edges = np.append(u, np.inf)
    true_accepts = genuine.size - np.searchsorted(genuine, edges, side="left")
    true_rejects = np.searchsorted(impostor, edges, side="left")
    correct = true_accepts + true_rejects
    k = int(np.flatnonzero(correct == correct.max())[-1])
    if k == 0:
        return float(u[0] - 1.0)
    if k == u.size:
        return float(u[-1] + 1.0)
    return float((u[k - 1] + u[k]) / 2.0)


def kfold_accuracy(
    scores: Any, labels: Any, folds: int = 10, seed: int = 0
) -> tuple[float, float]:
    """LFW protocol: pick the best-accuracy threshold on folds-1 folds, score the held-out one.

    Pairs are shuffled with ``seed`` and split into ``folds`` near-equal folds.
    Returns the mean and (population) standard deviation of the held-out accuracies.
    """
    s, y = _scores_labels(scores, labels)
    if folds < 2 or s.size < folds:
        raise ValueError(f"need folds >= 2 and at least {folds} pairs, got {s.size}")
    order = np.random.default_rng(seed).permutation(s.size)
    accuracies = []
    for held_out in np.array_split(order, folds):
        train = np.ones(s.size, dtype=bool)
        train[held_out] = False
        threshold = best_accuracy_threshold(s[train], y[train])
        accuracies.append(accuracy_at(s[held_out], y[held_out], threshold))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def f1_utility(genuine: Any, impostor: Any, thresholds: Any) -> np.ndarray:
    """F1 of accept/reject at each threshold, genuine pairs as positives, shape (K,).

    ``F1 = 2 TP / (2 TP + FP + FN)``; defined as 0 where the denominator is 0
    (no genuine pairs and no accepted impostor).
    """
    g = np.sort(np.asarray(genuine, dtype=np.float64).ravel())
    i = np.sort(np.asarray(impostor, dtype=np.float64).ravel())
    d = np.asarray(thresholds, dtype=np.float64).ravel()
    tp = g.size - np.searchsorted(g, d, side="left")
    fn = g.size - tp
    fp = i.size - np.searchsorted(i, d, side="left")
    denominator = 2 * tp + fp + fn
    f1 = np.zeros(d.shape, dtype=np.float64)
    defined = denominator > 0
    f1[defined] = 2 * tp[defined] / denominator[defined]
    return f1


def _utilities_grid(utilities: Any, thresholds: Any) -> tuple[np.ndarray, np.ndarray, float]:
    u = np.asarray(utilities, dtype=np.float64)
    d = np.asarray(thresholds, dtype=np.float64).ravel()
    if u.ndim != 2 or u.shape[1] != d.size:
        raise ValueError(f"utilities must be (T, K) with K = {d.size}, got {u.shape}")
    if d.size < 2 or u.shape[0] < 1:
        raise ValueError("need at least one identity and two thresholds")
    order = np.argsort(d, kind="stable")
    d, u = d[order], u[:, order]
    span = float(d[-1] - d[0])
    if span <= 0:
        raise ValueError("thresholds must span a non-empty range")
    return u, d, span


@dataclass(frozen=True)
class OpisSummary:
    """OPIS and epsilon-OPIS of the identities' utility curves, with what they depend on.

    The numbers only compare between reports over the same ``threshold_range`` (the
    calibration range [d_min, d_max] integrated over), ``points`` and ``utility``.
    ``opis``/``epsilon_opis`` are None when no identity qualifies or the range is empty.
    """

    opis: float | None
    epsilon_opis: float | None
    identities: int
    threshold_range: tuple[float, float]
    points: int
    epsilon: float
    utility: str = OPIS_UTILITY


def opis_summary(
    genuine_by_id: Mapping[Any, Any],
    impostor_by_id: Mapping[Any, Any],
    threshold_range: tuple[float, float],
    *,
    points: int = OPIS_POINTS,
    epsilon: float = OPIS_EPSILON,
) -> OpisSummary:
    """OPIS of per-identity F1 utilities over ``threshold_range`` sampled at ``points``.

    The one OPIS of evaluation and of the gallery's consistency report: the caller picks
    the range (evaluation: between the global thresholds at FAR 1e-1 and the lowest
    measurable FAR; the consistency report: a fixed cosine range) and the identities
    (see ``per_identity_utilities``: those in ``genuine_by_id``).
    """
    low, high = float(threshold_range[0]), float(threshold_range[1])
    if not (high > low and genuine_by_id):
        return OpisSummary(None, None, len(genuine_by_id), (low, high), points, epsilon)
    grid = np.linspace(low, high, points)
    _, utilities = per_identity_utilities(genuine_by_id, impostor_by_id, grid)
    return OpisSummary(
        opis=opis(utilities, grid),
        epsilon_opis=epsilon_opis(utilities, grid, epsilon=epsilon),
        identities=int(utilities.shape[0]),
        threshold_range=(low, high),
        points=points,
        epsilon=epsilon,
    )


def opis(utilities: Any, thresholds: Any) -> float:
    """Operating-point inconsistency score (lower is more consistent).

    ``1/T sum_i 1/(d_max - d_min) int (U_i(d) - mean_j U_j(d))^2 dd``, the integral by
    the trapezoid rule over the given thresholds (any order; sorted here).
    """
    u, d, span = _utilities_grid(utilities, thresholds)
    squared_gap = (u - u.mean(axis=0, keepdims=True)) ** 2
    return float(np.mean(np.trapezoid(squared_gap, d, axis=1)) / span)


def epsilon_opis(utilities: Any, thresholds: Any, epsilon: float = 0.1) -> float:
    """epsilon-OPIS: the normalised integral of (mean of best n - mean of worst n)^2.

    ``n = ceil(epsilon * T)`` identities, chosen separately at each threshold.
    """
    if not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon}")
    u, d, span = _utilities_grid(utilities, thresholds)
    n = max(1, math.ceil(epsilon * u.shape[0] - 1e-9))
    ranked = np.sort(u, axis=0)
    gap = ranked[-n:].mean(axis=0) - ranked[:n].mean(axis=0)
    return float(np.trapezoid(gap**2, d) / span)


def per_identity_utilities(
    genuine_by_id: Mapping[Any, Any],
    impostor_by_id: Mapping[Any, Any],
    thresholds: Any,
) -> tuple[list[Any], np.ndarray]:
    """F1 utilities per identity, ``(identities, utilities (T, K))`` ready for ``opis``.

    Rows follow ``genuine_by_id``'s order; an identity needs genuine scores to have a
    meaningful F1, so identities only in ``impostor_by_id`` are left out, and an
    identity without impostor scores counts as having none accepted.
    """
    identities: Sequence[Any] = list(genuine_by_id)
    d = np.asarray(thresholds, dtype=np.float64).ravel()
    rows = [f1_utility(genuine_by_id[i], impostor_by_id.get(i, ()), d) for i in identities]
    utilities = np.vstack(rows) if rows else np.zeros((0, d.size))
    return list(identities), utilities

"""Consistency monitor: does one threshold serve every enrolled identity equally well?

From the enrolled templates alone (no labelled test set), each identity gets genuine
scores (its own template pairs) and impostor scores (its templates against other
identities' templates, sampled and bounded), and from them its FRR and FAR at the
unified threshold and the threshold at which its own FAR would hit the target. Across
identities, OPIS and epsilon-OPIS (`facegate.core.metrics.opis_summary`, the same as
`facegate evaluate` reports) summarise how far the per-identity F1 utility curves spread
over the threshold range `OPIS_RANGE` (`metrics.OPIS_POINTS` thresholds); the report
carries that range (`opis_range`): OPIS only compares between reports over the same
range. `OPIS_RANGE` is fixed, so reports on one gallery compare over time; `facegate
evaluate` integrates over a range placed by FAR targets on its labelled pairs, so its
OPIS and this one are not comparable with each other. Observed decisions recorded by
the server are added per identity so operators can compare the enrolment view with
live traffic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from facegate.core import metrics
from facegate.gallery.protocol import GalleryStore
from tqdm import tqdm

OPIS_RANGE = (0.0, 1.0)


def scores_by_identity(
    vectors: np.ndarray,
    labels: Sequence[str],
    *,
    max_impostors_per_identity: int = 2000,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per identity, (genuine, impostor) cosine scores of L2-normalised template `vectors`.

    Genuine: every pair of the identity's templates. Impostor: all of its templates
    against all other identities' templates when that is at most
    `max_impostors_per_identity` pairs, otherwise that many pairs drawn uniformly.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for identity in tqdm(list(dict.fromkeys(labels)), desc="consistency", unit="identity"):
        own = np.flatnonzero(labels_arr == identity)
        others = np.flatnonzero(labels_arr != identity)
        within = vectors[own] @ vectors[own].T
        genuine = within[np.triu_indices(len(own), k=1)]
        if len(own) * len(others) <= max_impostors_per_identity:
            impostor = (vectors[own] @ vectors[others].T).ravel()
        else:
            a = rng.choice(own, size=max_impostors_per_identity)
            b = rng.choice(others, size=max_impostors_per_identity)
            impostor = np.einsum("ij,ij->i", vectors[a], vectors[b])
        out[str(identity)] = (genuine.astype(np.float64), impostor.astype(np.float64))
    return out


def identity_summary(
    genuine: np.ndarray, impostor: np.ndarray, threshold: float, target_far: float
) -> dict:
    """Score statistics, FRR/FAR at `threshold` (accept when score >= it), own threshold."""
    own = metrics.threshold_at_far(impostor, target_far) if impostor.size else math.nan
    return {
        "genuine_pairs": int(genuine.size),
        "impostor_pairs": int(impostor.size),
        "genuine_mean": _mean(genuine),
        "genuine_std": _std(genuine),
        "impostor_mean": _mean(impostor),
        "impostor_std": _std(impostor),
        "frr": _mean(genuine < threshold),
        "far": _mean(impostor >= threshold),
        "own_threshold": _finite(own),
        "threshold_gap": _finite(own - threshold),
    }


def observed_summary(decisions: Sequence[tuple[float, bool]]) -> dict:
    """Count, accept rate and mean similarity of the recorded live decisions."""
    sims = np.array([s for s, _ in decisions], dtype=np.float64)
    accepted = np.array([a for _, a in decisions], dtype=bool)
    return {
        "count": len(decisions),
        "accept_rate": _mean(accepted),
        "mean_similarity": _mean(sims),
    }


def consistency_summary(
    scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    threshold: float,
    *,
    target_far: float = 1e-3,
    worst: int = 10,
    observed: Mapping[str, Sequence[tuple[float, bool]]] | None = None,
) -> dict:
    """The report from per-identity (genuine, impostor) scores; pure, see `consistency_report`."""
    observed = observed or {}
    per_identity = {
        identity: {
            **identity_summary(genuine, impostor, threshold, target_far),
            "observed": observed_summary(observed.get(identity, ())),
        }
        for identity, (genuine, impostor) in scores.items()
    }
    usable = {i: s for i, s in scores.items() if s[0].size and s[1].size}
    opis = metrics.opis_summary(
        {i: g for i, (g, _) in usable.items()},
        {i: m for i, (_, m) in usable.items()},
        OPIS_RANGE,
    )
    gaps = [
        (abs(v["threshold_gap"]), i)
        for i, v in per_identity.items()
        if v["threshold_gap"] is not None
    ]
    ranked = [i for _, i in sorted(gaps, key=lambda g: (-g[0], g[1]))][:worst]
    return {
        "threshold": float(threshold),
        "target_far": float(target_far),
        "identities": len(per_identity),
        "opis_identities": opis.identities,
        "opis": opis.opis,
        "epsilon_opis": opis.epsilon_opis,
        "opis_epsilon": opis.epsilon,
        "opis_range": list(opis.threshold_range),
        "opis_points": opis.points,
        "utility": opis.utility,
        "per_identity": per_identity,
        "worst": [{"identity_id": i, **per_identity[i]} for i in ranked],
    }


def consistency_report(
    gallery: GalleryStore,
    threshold: float,
    *,
    target_far: float = 1e-3,
    worst: int = 10,
    max_impostors_per_identity: int = 2000,
    seed: int = 0,
) -> dict:
    """Per-identity and across-identity consistency of `threshold` over `gallery` (JSON-ready).

    Keys: threshold, target_far, identities, opis_identities (those with both genuine
    and impostor scores, the ones OPIS covers), opis, epsilon_opis (None when no
    identity qualifies), opis_epsilon, opis_range (the threshold range OPIS integrates
    over, `OPIS_RANGE`), opis_points, utility, per_identity
    (id -> statistics, see `identity_summary`, plus "observed"), and worst (the `worst`
    identities by |own_threshold - threshold|, largest first), and quarantined (the
    stored templates left out because their vector failed the checks, gallery/integrity.py).
    """
    vectors, labels = gallery.embeddings()
    scores = scores_by_identity(
        vectors, labels, max_impostors_per_identity=max_impostors_per_identity, seed=seed
    )
    report = consistency_summary(
        scores, threshold, target_far=target_far, worst=worst, observed=gallery.decisions()
    )
    return {**report, "quarantined": [q.to_dict() for q in gallery.quarantined()]}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if np.size(values) else None


def _std(values: np.ndarray) -> float | None:
    return float(np.std(values)) if np.size(values) else None

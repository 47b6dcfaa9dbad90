"""The USS threshold of a frozen model, exactly: pure numpy math, no I/O, no torch.

UniTSFace's USS loss (``train.losses.USSLoss``) learns one bias b, the unified
threshold ``t = b / s``. With the network frozen, b is learned alone: on L2-normalised
embeddings the *expected* USS loss is a convex function of b and its minimiser is found
by a safeguarded Newton / bisection search on t in [-1, 1.5] to 1e-6.

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
``negative_weight_for_far`` picks lambda on the data's own impostor pairs (training
identities, never a test set). Unlike training, the exponent arguments are not clamped
to [-s, s]: the clamp only touches pairs more than 1 away from t in cosine and would
make the loss non-convex.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from facegate.core.errors import FacegateError

T_LOW, T_HIGH = -1.0, 1.5  # search range of t = b / s
_CHUNK = 512  # rows of the cosine matrix computed at once (512 x N float64)


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

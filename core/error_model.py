"""What a similarity means at every scale: one error model for a pair, a probe against an
identity of n templates, and an open-set search of a whole gallery. Pure numpy, no I/O;
``facegate calibrate`` fits it (``fit_error_model``) on training identities and writes it
into the bundle, the server's ``decisions`` evaluate it.

Why a model and not one threshold: the best of many impostor comparisons clears a pair
threshold far more often than one comparison does (a search of 273 people with 3 photos
each "found" 85% of strangers at the pair threshold). The model is probe-conditional:

    s_icj = mu_i + sigma_i * (sqrt(rho) * A_ic + sqrt(1 - rho) * E_icj),   A, E ~ N(0, 1)

the cosine of probe i with template j of impostor identity c. Each probe has its own
mean and spread of impostor scores (some faces sit nearer the centre of the cone that all
embeddings share, and meet more look-alikes); rho is the share of that spread which one
impostor identity's templates have in common. Then, with ``u_i = (t - mu_i) / sigma_i``,

    p_i(t, n) = P(max_j s_icj >= t) = 1 - E_A[ Phi((u_i - sqrt(rho) A) / sqrt(1 - rho))^n ]
    FAR(t, n) = mean_i p_i(t, n)                        (a probe against one identity)
    FPIR(t, G) = mean_i [1 - prod_c (1 - p_i(t, n_c))]  (the best of a gallery G)

so one function answers all three questions: a pair is a gallery of one identity with
one template. Impostor identities are independent given the probe; the average over
probes keeps their heterogeneity, which a global per-pair rate raised to the power G
would miss. The Gaussian tail is what extrapolates beyond the calibration set (ISO/IEC
5152 extrapolates FMR by a fitted tail too); ``fit_error_model`` matches it to the upper
quantiles of each probe's impostor scores, where decisions are made, not to the bulk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

FORM = "probe-gaussian-tail"
QUADRATURE_POINTS = 24
TAIL_QUANTILES = (0.90, 0.99)  # the two quantiles each probe's Gaussian tail is matched to
T_LOW, T_HIGH = -1.0, 1.0
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(QUADRATURE_POINTS)
_WEIGHTS = _WEIGHTS / math.sqrt(2.0 * math.pi)

Composition = Mapping[int, int]  # templates per identity -> how many identities have that many


def normal_sf(x: np.ndarray) -> np.ndarray:
    """1 - Phi(x), with relative error < 1.2e-7 in both tails (Numerical Recipes' erfcc):
    the server needs tail probabilities down to 1e-12 and numpy has no erfc."""
    z = np.abs(np.asarray(x, dtype=np.float64)) / math.sqrt(2.0)
    k = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + k * (1.00002368 + k * (0.37409196 + k * (0.09678418 + k * (
        -0.18628806 + k * (0.27886807 + k * (-1.13520398 + k * (1.48851587 + k * (
            -0.82215223 + k * 0.17087277))))))))
    erfc = k * np.exp(poly)
    return np.where(np.asarray(x) >= 0, 0.5 * erfc, 1.0 - 0.5 * erfc)


def _atanh(cos):
    """Where the Gaussian tails live: atanh(cosine), whose upper tail is closer to Gaussian
    than the cosine's (bounded by 1)."""
    return np.arctanh(np.clip(cos, -1 + 1e-12, 1 - 1e-12))


def normal_isf(p: float) -> float:
    """The x with normal_sf(x) = p (bisection; used only while fitting)."""
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if normal_sf(np.array(mid)) > p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _log_miss(u: np.ndarray, n: int, rho: float) -> np.ndarray:
    """log(1 - p(u, n)) elementwise, u the standardised threshold: the Gauss-Hermite average
    over the impostor identity's shared term A of log P(all n templates below)."""
    if n == 1 or rho == 0.0:
        return n * np.log1p(-np.minimum(normal_sf(u), 1.0 - 1e-16))
    x = (u[..., None] - math.sqrt(rho) * _NODES) / math.sqrt(1.0 - rho)
    below = n * np.log1p(-np.minimum(normal_sf(x), 1.0 - 1e-16))  # log Phi(x)^n per node
    hit = -np.expm1(below) @ _WEIGHTS  # p(u, n)
    return np.log1p(-np.clip(hit, 0.0, 1.0 - 1e-16))


class ErrorModelError(ValueError):
    """A manifest's error_model section that cannot be used."""


@dataclass(frozen=True)
class ErrorModel:
    """Per-probe impostor tails (representatives of the calibration probes) and rho."""

    mean: np.ndarray  # (P,) mu_i
    std: np.ndarray  # (P,) sigma_i > 0
    rho: float  # in [0, 1)

    # ------------------------------------------------------------ the three questions

    def log_miss(self, t: float, n: int) -> np.ndarray:
        """log(1 - p_i(t, n)) per representative probe: log P(no template of one impostor
        identity with n templates reaches t)."""
        return _log_miss((_atanh(t) - self.mean) / self.std, n, self.rho)

    def fpir(self, t: float, composition: Composition) -> float:
        """Share of unknown probes whose best gallery template reaches t, for a gallery of
        ``composition[n]`` identities with n templates each."""
        total = np.zeros_like(self.mean)
        for n, identities in composition.items():
            if identities > 0 and n > 0:
                total += identities * self.log_miss(t, int(n))
        return float(np.mean(-np.expm1(total)))

    def far(self, t: float, templates: int = 1) -> float:
        """False-accept rate of a probe against one identity of ``templates`` templates under
        max fusion (templates=1: a pair)."""
        return self.fpir(t, {templates: 1})

    def threshold(self, target: float, composition: Composition) -> float:
        """The smallest t whose FPIR for this gallery is at most ``target`` (FPIR falls as t
        rises; bisection to 1e-7 in cosine)."""
        if not 0.0 < target < 1.0:
            raise ValueError(f"target rate must be in (0, 1), got {target}")
        if not any(n > 0 and c > 0 for n, c in composition.items()):
            return T_LOW
        lo, hi = T_LOW, T_HIGH
        if self.fpir(hi, composition) > target:
            return hi
        while hi - lo > 1e-7:
            mid = 0.5 * (lo + hi)
            if self.fpir(mid, composition) > target:
                lo = mid
            else:
                hi = mid
        return hi

    # ------------------------------------------------------------ the manifest section

    def to_manifest(self, provenance: dict[str, Any]) -> dict[str, Any]:
        return {
            "form": FORM,
            "rho": self.rho,
            "probes": [[round(float(m), 7), round(float(s), 7)]
                       for m, s in zip(self.mean, self.std, strict=True)],
            **provenance,
        }

    @classmethod
    def from_manifest(cls, section: Any) -> ErrorModel:
        if not isinstance(section, dict) or section.get("form") != FORM:
            raise ErrorModelError(f"error_model: 'form' must be {FORM!r}")
        rho = section.get("rho")
        if not isinstance(rho, int | float) or isinstance(rho, bool) or not 0.0 <= rho < 1.0:
            raise ErrorModelError(f"error_model: 'rho' must be a number in [0, 1), got {rho!r}")
        try:
            probes = np.asarray(section.get("probes"), dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ErrorModelError("error_model: 'probes' must be [[mean, std], ...]") from exc
        if probes.ndim != 2 or probes.shape[1] != 2 or len(probes) == 0:
            raise ErrorModelError("error_model: 'probes' must be a non-empty [[mean, std], ...]")
        if not np.isfinite(probes).all() or (probes[:, 1] <= 0).any():
            raise ErrorModelError("error_model: every probe needs a finite mean and a std > 0")
        return cls(probes[:, 0].copy(), probes[:, 1].copy(), float(rho))


class ErrorCurves:
    """The model evaluated on a grid, for serving: log P(miss) per template count is
    tabulated once (lazily, per count), so a gallery's FPIR curve is a weighted sum of
    tables and any threshold or estimate is an interpolation, microseconds a call.
    Thread-safe: a table is computed at most a few times and never changes."""

    POINTS = 400

    def __init__(self, model: ErrorModel) -> None:
        self.model = model
        lo = float(np.min(model.mean))  # below it every rate is above ~0.5: never a target
        hi = float(np.max(model.mean + 12.0 * model.std))
        self._y = np.linspace(lo, hi, self.POINTS)  # transformed scores
        self.t = np.tanh(self._y)  # the same grid in cosine
        self._tables: dict[int, np.ndarray] = {}

    def log_miss(self, n: int) -> np.ndarray:
        """(P, POINTS) log(1 - p_i(t, n)) on the grid."""
        table = self._tables.get(n)
        if table is None:
            m = self.model
            table = _log_miss((self._y[None, :] - m.mean[:, None]) / m.std[:, None], n, m.rho)
            self._tables[n] = table
        return table

    def curve(self, composition: Composition) -> np.ndarray:
        """log FPIR on the grid for a gallery of this composition."""
        total = np.zeros((len(self.model.mean), self.POINTS))
        for n, identities in composition.items():
            if identities > 0 and n > 0:
                total += identities * self.log_miss(int(n))
        return np.log(np.maximum(np.mean(-np.expm1(total), axis=0), 1e-300))

    def rate(self, curve: np.ndarray, t: float) -> float:
        """The rate at cosine t, log-linear between grid points (1 below the grid)."""
        y = float(_atanh(np.asarray(t, dtype=np.float64)))
        return float(np.exp(np.interp(y, self._y, curve, left=curve[0], right=curve[-1])))

    def threshold(self, curve: np.ndarray, target: float) -> float:
        """The cosine where the curve falls to ``target`` (log-linear between grid points)."""
        log_target = math.log(target)
        below = np.nonzero(curve <= log_target)[0]
        if len(below) == 0:
            return float(self.t[-1])
        k = int(below[0])
        if k == 0:
            return float(self.t[0])
        a, b = curve[k - 1], curve[k]
        y = self._y[k - 1] + (self._y[k] - self._y[k - 1]) * (a - log_target) / max(a - b, 1e-300)
        return float(np.tanh(y))


# ---------------------------------------------------------------- fitting


def _impostor_rows(z: np.ndarray, codes: np.ndarray, chunk: int = 512):
    """(row indices, transformed cosines) blocks of probes against every sample, own class
    masked NaN."""
    for start in range(0, len(z), chunk):
        rows = np.arange(start, min(start + chunk, len(z)))
        cos = _atanh(z[rows] @ z.T)
        cos[codes[rows, None] == codes[None, :]] = np.nan
        yield rows, cos


def _rho(z: np.ndarray, codes: np.ndarray, mean: np.ndarray, std: np.ndarray) -> float:
    """Intra-class correlation of standardised impostor scores (one-way ANOVA over
    (probe, impostor identity) groups): how much one identity's templates move together."""
    classes = int(codes.max()) + 1
    counts = np.bincount(codes, minlength=classes).astype(np.float64)
    within_ss = between_ss = 0.0
    groups = samples = 0.0
    for rows, cos in _impostor_rows(z, codes):
        r = (cos - mean[rows, None]) / std[rows, None]
        r = np.nan_to_num(r, nan=0.0)
        own = codes[rows]
        sums = np.zeros((len(rows), classes))
        squares = np.zeros((len(rows), classes))
        np.add.at(sums.T, codes, r.T)
        np.add.at(squares.T, codes, (r * r).T)
        n = np.broadcast_to(counts, sums.shape).copy()
        n[np.arange(len(rows)), own] = 0.0
        keep = n > 1
        group_means = np.where(keep, sums / np.maximum(n, 1), 0.0)
        within_ss += float(np.sum(np.where(keep, squares - n * group_means**2, 0.0)))
        between_ss += float(np.sum(np.where(keep, n * group_means**2, 0.0)))
        groups += float(keep.sum())
        samples += float(n[keep].sum())
    msw = within_ss / max(samples - groups, 1.0)
    msb = between_ss / max(groups - 1.0, 1.0)
    n0 = samples / max(groups, 1.0)
    rho = (msb - msw) / (msb + (n0 - 1.0) * msw)
    return float(min(max(rho, 0.0), 0.95))


def fit_error_model(
    embeddings: np.ndarray, labels: np.ndarray, *, representatives: int = 256,
) -> tuple[ErrorModel, dict[str, Any]]:
    """The error model of L2-normalised ``embeddings`` of training identities ``labels``.

    Each probe's Gaussian is matched to the 90% and 99% quantiles of its impostor scores
    (every sample of every other identity); probes are then summarised by
    ``representatives`` equal-weight probes ordered by their tail at FAR 1e-4, so the
    server evaluates a few hundred tails, not thousands. Returns the model and the
    figures its provenance records.
    """
    z = np.asarray(embeddings, dtype=np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    if codes.max() < 2:
        raise ValueError("an error model needs at least 3 identities")
    lo_q, hi_q = TAIL_QUANTILES
    z_lo, z_hi = normal_isf(1 - lo_q), normal_isf(1 - hi_q)
    mean = np.empty(len(z))
    std = np.empty(len(z))
    for rows, cos in _impostor_rows(z, codes):
        q = np.nanquantile(cos, [lo_q, hi_q], axis=1)
        std[rows] = np.maximum((q[1] - q[0]) / (z_hi - z_lo), 1e-6)
        mean[rows] = q[0] - std[rows] * z_lo
    rho = _rho(z, codes, mean, std)
    order = np.argsort(mean + normal_isf(1e-4) * std)
    bins = np.array_split(order, min(representatives, len(order)))
    picks = np.array([b[len(b) // 2] for b in bins])
    model = ErrorModel(mean[picks], std[picks], rho)
    figures = {"identities": int(codes.max()) + 1, "samples": int(len(z)),
               "representatives": int(len(picks)), "tail_quantiles": list(TAIL_QUANTILES)}
    return model, figures

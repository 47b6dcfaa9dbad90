"""Which threshold is in force for each question, and what a score means there.

A pair, a probe against an identity of n templates and an open-set search of the whole
gallery each get the threshold that holds the operator's target error rate for that
question (``FACEGATE_TARGET_FAR`` for 1:1, ``FACEGATE_TARGET_FPIR`` for search), read off
the bundle's error model (``core.error_model``). The bundle's learned pair threshold stays
the 1:1 default unless a FAR target is set; ``FACEGATE_THRESHOLD`` pins every decision to
one number (the operator's word beats the model's). A bundle without an error model
decides everything at its pair threshold, as servers did before, and estimates nothing.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from facegate.core.bundle import Bundle
from facegate.core.error_model import Composition, ErrorCurves, ErrorModel
from facegate.server.settings import Settings

ERROR_MODEL_SOURCE = "error-model"
POINT_CACHE = 64  # (target, composition) pairs whose curve and threshold are remembered
# Template counts tabulated at start-up (off the request path), exported as metrics and
# listed in /v1/consistency.
REPORTED_TEMPLATE_COUNTS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and why: ``source`` is the bundle's provenance, "error-model",
    "operator" or "request"; ``target`` the rate it holds (None when it was not chosen for
    one)."""

    threshold: float
    source: str
    target: float | None


class Thresholds:
    """The operating points of one served bundle under one settings object; thread-safe."""

    def __init__(self, bundle: Bundle, settings: Settings) -> None:
        self.model: ErrorModel | None = bundle.error_model
        self._curves = None if self.model is None else ErrorCurves(self.model)
        self._bundle_point = OperatingPoint(bundle.threshold, bundle.threshold_source, None)
        self._operator = settings.threshold
        self._pair_target = settings.target_far if "target_far" in settings.model_fields_set \
            else None
        self.target_far = settings.target_far
        self.target_fpir = settings.target_fpir
        self._lock = threading.Lock()
        self._points: dict[tuple[float, tuple[tuple[int, int], ...]],
                           tuple[OperatingPoint, np.ndarray]] = {}
        if self._curves is not None:
            threading.Thread(target=self._warm, name="error-model", daemon=True).start()

    def _warm(self) -> None:
        for n in REPORTED_TEMPLATE_COUNTS:
            self._point({n: 1}, self.target_far)

    # ------------------------------------------------------------ thresholds

    def _fixed(self) -> OperatingPoint | None:
        """The one threshold for everything: the operator's, or the bundle's without a model."""
        if self._operator is not None:
            return OperatingPoint(self._operator, "operator", None)
        return self._bundle_point if self.model is None else None

    def pair(self) -> OperatingPoint:
        """1:1 of two probes: the bundle's learned threshold, or the model's at an explicit
        FACEGATE_TARGET_FAR."""
        fixed = self._fixed()
        if fixed is not None:
            return fixed
        if self._pair_target is None:
            return self._bundle_point
        return self.identity(1)

    def identity(self, templates: int) -> OperatingPoint:
        """A probe against an identity of ``templates`` templates (best template wins):
        the threshold whose FAR at that count is the target, so more enrolment photos buy
        recall without buying false accepts."""
        fixed = self._fixed()
        if fixed is not None:
            return fixed
        return self._point({max(1, int(templates)): 1}, self.target_far)[0]

    def search(self, composition: Composition) -> OperatingPoint:
        """Open-set search of a gallery of this composition ({n: identities with n
        templates}): the threshold whose FPIR (share of unknown people "found") is the target."""
        fixed = self._fixed()
        if fixed is not None:
            return fixed
        return self._point(composition or {1: 1}, self.target_fpir)[0]

    def _point(self, composition: Composition, target: float) -> tuple[OperatingPoint, np.ndarray]:
        """The operating point and log-rate curve of a gallery composition (cached)."""
        assert self._curves is not None
        bins = tuple(sorted((int(n), int(c)) for n, c in composition.items() if n > 0 and c > 0))
        key = (target, bins)
        with self._lock:
            hit = self._points.get(key)
        if hit is None:
            curve = self._curves.curve(dict(bins))
            point = OperatingPoint(self._curves.threshold(curve, target), ERROR_MODEL_SOURCE,
                                   target)
            hit = (point, curve)
            with self._lock:
                if len(self._points) >= POINT_CACHE:
                    self._points.pop(next(iter(self._points)))
                self._points[key] = hit
        return hit

    # ------------------------------------------------------------ estimates

    def far(self, similarity: float, templates: int = 1) -> float | None:
        """Estimated share of impostors (against an identity of ``templates``) who score at
        least ``similarity``; None without an error model."""
        if self._curves is None or not math.isfinite(similarity):
            return None
        _, curve = self._point({max(1, int(templates)): 1}, self.target_far)
        return self._curves.rate(curve, similarity)

    def fpir(self, similarity: float, composition: Composition) -> float | None:
        """Estimated share of unknown probes whose best score in this gallery reaches
        ``similarity``; None without an error model or with an empty gallery."""
        if self._curves is None or not composition or not math.isfinite(similarity):
            return None
        _, curve = self._point(composition, self.target_fpir)
        return self._curves.rate(curve, similarity)

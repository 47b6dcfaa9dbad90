"""Where a similarity becomes a decision: which threshold applies (``server.thresholds``:
one per question, from the bundle's error model), how a probe compares with an identity's
several templates, how search ranks, and what is recorded for the consistency monitor and
the metrics. The routes parse and shape; the rules live here, so a verify, a verify
against an identity and a search decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from facegate.core.error_model import Composition
from facegate.core.errors import ModelMismatch
from facegate.gallery import Candidate
from facegate.server import schemas
from facegate.server.errors import IdentityHasNoTemplates, ThresholdOverrideForbidden
from facegate.server.services import Services
from facegate.server.thresholds import OperatingPoint


@dataclass(frozen=True)
class Decision:
    match: bool
    similarity: float
    threshold: float
    threshold_source: str  # the bundle's provenance, "error-model", "operator" or "request"
    target: float | None  # the error rate the threshold holds
    estimated_far: float | None  # of this similarity, by the error model


def check_override(services: Services, override: float | None) -> None:
    """403 for a request's threshold on a server that does not allow overrides (checked
    before any photo is decoded)."""
    if override is not None and not services.settings.allow_threshold_override:
        raise ThresholdOverrideForbidden("this server does not allow threshold overrides")


def _decide(services: Services, similarity: float, templates: int | None,
            override: float | None = None) -> Decision:
    """At the request's threshold, else a pair's (templates None) or an identity's."""
    thresholds = services.thresholds
    if override is not None:
        point = OperatingPoint(override, "request", None)
    elif templates is None:
        point = thresholds.pair()
    else:
        point = thresholds.identity(templates)
    return Decision(similarity >= point.threshold, similarity, point.threshold, point.source,
                    point.target, thresholds.far(similarity, templates or 1))


def verify_pair(services: Services, vectors: np.ndarray, override: float | None) -> Decision:
    """Two unit vectors: accept when their cosine reaches the pair threshold."""
    decision = _decide(services, float(np.dot(vectors[0], vectors[1])), None, override)
    services.metrics.observe_decision("verify", decision.similarity, decision.match)
    return decision


async def identity_templates(services: Services, identity_id: str) -> np.ndarray:
    """The identity's template embeddings; 409 when none can be compared with a probe."""
    templates = await services.gallery.call(lambda g: g.identity_embeddings(identity_id))
    if len(templates):
        return templates
    identity = await services.gallery.call(lambda g: g.get_identity(identity_id))
    if identity.templates:  # all of them made by another model
        raise ModelMismatch(
            f"identity {identity_id!r} has {len(identity.templates)} templates of another model; "
            "re-embed them (facegate gallery reembed) or re-enrol the identity"
        )
    raise IdentityHasNoTemplates(
        f"identity {identity_id!r} has no templates; add photos with "
        f"POST /v1/identities/{identity_id}/templates"
    )


async def verify_identity(
    services: Services, identity_id: str, templates: np.ndarray, probe: np.ndarray
) -> tuple[Decision, np.ndarray]:
    """The decision on the best template, at the threshold for this many templates, and
    each template's similarity; recorded in the gallery for the consistency monitor.

    The max, not the mean, over templates: one bad template (blur, profile) cannot drag a
    genuine probe below the threshold, whereas the mean would. The max's false-accept rate
    grows with the count (1.0% -> 2.9% from 1 to 5 templates at one threshold), so the
    threshold rises with it to hold the target FAR at every count.
    """
    similarities = templates @ probe
    decision = _decide(services, float(similarities.max()), len(templates))
    await services.gallery.call(
        lambda g: g.record_decision(
            identity_id, decision.similarity, decision.match, "verify_identity"
        )
    )
    services.metrics.observe_decision("verify_identity", decision.similarity, decision.match)
    return decision, similarities


@dataclass(frozen=True)
class SearchDecision:
    candidates: list[schemas.Candidate]  # best first
    match: schemas.Candidate | None
    point: OperatingPoint | None  # None in investigation mode
    estimated_fpir: float | None  # of the best candidate's similarity
    identities: int
    templates: int


def rank_candidates(
    services: Services, hits: Sequence[Candidate], composition: Composition, decide: bool = True
) -> SearchDecision:
    """The gallery's hits (best first), each marked against the open-set threshold of a
    gallery of this composition, and the match: the best hit when it passes, else None.
    Investigation mode (``decide=False``) ranks and estimates, and decides nothing."""
    thresholds = services.thresholds
    point = thresholds.search(composition) if decide else None
    candidates = [
        schemas.Candidate(
            identity_id=h.identity_id,
            name=h.name,
            similarity=h.similarity,
            match=None if point is None else h.similarity >= point.threshold,
            estimated_fpir=thresholds.fpir(h.similarity, composition),
        )
        for h in hits
    ]
    best = candidates[0] if candidates and candidates[0].match else None
    if candidates and point is not None:
        services.metrics.observe_decision("search", candidates[0].similarity, best is not None)
    return SearchDecision(
        candidates, best, point, candidates[0].estimated_fpir if candidates else None,
        identities=sum(composition.values()),
        templates=sum(n * c for n, c in composition.items()),
    )

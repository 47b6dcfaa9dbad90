"""Where a similarity becomes a decision: which threshold applies, how a probe compares
with an identity's several templates, how search ranks, and what is recorded for the
consistency monitor and the metrics. The routes parse and shape; the rules live here,
so a verify, a verify against an identity and a search decide alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from facegate.core.errors import ModelMismatch
from facegate.gallery import Candidate
from facegate.server import schemas
from facegate.server.errors import IdentityHasNoTemplates, ThresholdOverrideForbidden
from facegate.server.services import Services


@dataclass(frozen=True)
class Decision:
    match: bool
    similarity: float
    threshold: float
    threshold_source: str  # the bundle's provenance, "operator" or "request"


def check_override(services: Services, override: float | None) -> None:
    """403 for a request's threshold on a server that does not allow overrides (checked
    before any photo is decoded)."""
    if override is not None and not services.settings.allow_threshold_override:
        raise ThresholdOverrideForbidden("this server does not allow threshold overrides")


def _decide(services: Services, similarity: float, override: float | None = None) -> Decision:
    if override is None:
        threshold, source = services.threshold, services.threshold_source
    else:
        threshold, source = override, "request"
    return Decision(similarity >= threshold, similarity, threshold, source)


def verify_pair(services: Services, vectors: np.ndarray, override: float | None) -> Decision:
    """Two unit vectors: accept when their cosine reaches the threshold."""
    decision = _decide(services, float(np.dot(vectors[0], vectors[1])), override)
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
    """The decision on the best template, and each template's similarity; recorded in the
    gallery for the consistency monitor.

    The max, not the mean, over templates: one bad template (blur, profile) cannot drag a
    genuine probe below the threshold, whereas the mean would (the mean is steadier
    against one lucky impostor match, at the cost of FRR).
    """
    similarities = templates @ probe
    decision = _decide(services, float(similarities.max()))
    await services.gallery.call(
        lambda g: g.record_decision(
            identity_id, decision.similarity, decision.match, "verify_identity"
        )
    )
    services.metrics.observe_decision("verify_identity", decision.similarity, decision.match)
    return decision, similarities


def rank_candidates(
    services: Services, hits: Sequence[Candidate]
) -> tuple[list[schemas.Candidate], schemas.Candidate | None]:
    """The gallery's hits (best first) each marked against the threshold, and the match:
    the best hit when it passes, else None."""
    threshold = services.threshold
    candidates = [
        schemas.Candidate(
            identity_id=h.identity_id,
            name=h.name,
            similarity=h.similarity,
            match=h.similarity >= threshold,
        )
        for h in hits
    ]
    best = candidates[0] if candidates and candidates[0].match else None
    if candidates:
        services.metrics.observe_decision("search", candidates[0].similarity, best is not None)
    return candidates, best

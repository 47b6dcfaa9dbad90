"""1:1 verification: two probes (``POST /v1/verify``), or one against an enrolled identity
(``POST /v1/verify/identity``). A probe is a photo or an embedding (see ``routers.embed``)."""

from __future__ import annotations

import time

import numpy as np
from facegate.core.errors import FacegateError, ModelMismatch
from facegate.server import schemas
from facegate.server.deps import ServicesDep, SettingsDep
from facegate.server.errors import ThresholdOverrideForbidden
from facegate.server.routers.common import ms, v1_router
from facegate.server.routers.embed import (
    Probe,
    conflicts,
    embed_probes,
    form_image,
    form_options,
    json_or_form,
    json_probe,
    request_body_openapi,
)
from facegate.server.services import Services
from fastapi import Request

router = v1_router(tags=["verify"])


class IdentityHasNoTemplates(FacegateError):
    """Every template of the identity was deleted: there is nothing to compare with (a
    similarity would be made up, and no decision can be right)."""

    code = "identity_has_no_templates"
    status = 409


async def _templates(services: Services, identity_id: str) -> np.ndarray:
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


async def _verify_inputs(request: Request) -> tuple[list[tuple[str, Probe]], float | None]:
    """The two probes and the optional threshold, from a JSON or a multipart body."""
    body = await json_or_form(request, schemas.VerifyJSON)
    if isinstance(body, schemas.VerifyJSON):
        sides = [
            json_probe(body.image1_b64, body.embedding1, "1"),
            json_probe(body.image2_b64, body.embedding2, "2"),
        ]
        return sides, body.threshold
    threshold = form_options(body, schemas.ThresholdOption).threshold
    return [(field, form_image(body, field)) for field in ("image1", "image2")], threshold


async def _identity_inputs(request: Request) -> tuple[str, tuple[str, Probe]]:
    """The identity id and the probe, from a JSON or a multipart body."""
    body = await json_or_form(request, schemas.VerifyIdentityJSON)
    if isinstance(body, schemas.VerifyIdentityJSON):
        return body.identity_id, json_probe(body.image_b64, body.embedding)
    identity_id = form_options(body, schemas.VerifyIdentityOptions).identity_id
    return identity_id, ("image", form_image(body, "image"))


@router.post(
    "/verify",
    response_model=schemas.VerifyResponse,
    summary="Do two photos (or embeddings) show the same person? (1:1)",
    responses=conflicts("an embedding of another model (model_mismatch)"),
    openapi_extra=request_body_openapi(
        ("image1", "image2"), schemas.ThresholdOption, schemas.VerifyJSON
    ),
)
async def verify(
    request: Request, services: ServicesDep, settings: SettingsDep
) -> schemas.VerifyResponse:
    """Multipart (files `image1`, `image2`) or JSON (per side `image<n>_b64` or
    `embedding<n>`, e.g. an embedding stored instead of a photo).

    The largest face of each image is compared (or the only one, with
    `FACEGATE_FACE_POLICY=strict`). A `threshold` must be finite and in [-1, 1] (else
    422) and is honoured only when the server allows overrides (else 403).
    """
    start = time.perf_counter()
    probes, override = await _verify_inputs(request)
    if override is not None and not settings.allow_threshold_override:
        raise ThresholdOverrideForbidden("this server does not allow threshold overrides")
    embedded = await embed_probes(services, probes)
    similarity = float(np.dot(embedded.vectors[0], embedded.vectors[1]))
    threshold = services.threshold if override is None else override
    source = services.threshold_source if override is None else "request"
    match = similarity >= threshold
    services.metrics.observe_decision("verify", similarity, match)
    return schemas.VerifyResponse(
        match=match,
        similarity=similarity,
        threshold=threshold,
        threshold_source=source,
        faces=embedded.faces,
        timings_ms=schemas.Timings(**embedded.timings_ms, total=ms(time.perf_counter() - start)),
    )


@router.post(
    "/verify/identity",
    response_model=schemas.VerifyIdentityResponse,
    summary="Is this photo (or embedding) the enrolled identity? (1:1 against its templates)",
    responses={
        404: {"model": schemas.ErrorResponse, "description": "unknown identity"},
        **conflicts(
            "an embedding of another model, or an identity whose templates are all of "
            "another model (model_mismatch)",
            "an identity with no templates left (identity_has_no_templates)",
        ),
    },
    openapi_extra=request_body_openapi(
        ("image",), schemas.VerifyIdentityOptions, schemas.VerifyIdentityJSON
    ),
)
async def verify_identity(
    request: Request, services: ServicesDep
) -> schemas.VerifyIdentityResponse:
    """Multipart (file `image`, field `identity_id`) or JSON (`identity_id` and `image_b64`
    or `embedding`).

    Similarity is the max over the identity's templates: one bad template (blur,
    profile) cannot drag a genuine probe below the threshold, whereas the mean would
    (the mean is steadier against one lucky impostor match, at the cost of FRR).
    The decision is recorded for the consistency monitor."""
    start = time.perf_counter()
    identity_id, probe = await _identity_inputs(request)
    templates = await _templates(services, identity_id)
    embedded = await embed_probes(services, [probe])
    sims = templates @ embedded.vectors[0]
    similarity = float(sims.max())
    threshold = services.threshold
    match = similarity >= threshold
    await services.gallery.call(
        lambda g: g.record_decision(identity_id, similarity, match, "verify_identity")
    )
    services.metrics.observe_decision("verify_identity", similarity, match)
    return schemas.VerifyIdentityResponse(
        match=match,
        identity_id=identity_id,
        similarity=similarity,
        similarities=[float(s) for s in sims],
        threshold=threshold,
        threshold_source=services.threshold_source,
        face=embedded.faces[0],
        timings_ms={**embedded.timings_ms, "total": ms(time.perf_counter() - start)},
    )

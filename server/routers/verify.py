"""1:1 verification: two probes (``POST /v1/verify``), or one against an enrolled identity
(``POST /v1/verify/identity``). A probe is a photo or an embedding (see ``routers.probes``)."""

from __future__ import annotations

import time

from facegate.server import decisions, schemas
from facegate.server.deps import ServicesDep
from facegate.server.routers.common import ms, v1_router
from facegate.server.routers.probes import (
    Probe,
    conflicts,
    embed_probes,
    form_image,
    form_options,
    json_or_form,
    json_probe,
    request_body_openapi,
)
from fastapi import Request

router = v1_router(tags=["verify"])


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
async def verify(request: Request, services: ServicesDep) -> schemas.VerifyResponse:
    """Multipart (files `image1`, `image2`) or JSON (per side `image<n>_b64` or
    `embedding<n>`, e.g. an embedding stored instead of a photo).

    The largest face of each image is compared (or the only one, with
    `FACEGATE_FACE_POLICY=strict`). A `threshold` must be finite and in [-1, 1] (else
    422) and is honoured only when the server allows overrides (else 403).
    """
    start = time.perf_counter()
    probes, override = await _verify_inputs(request)
    decisions.check_override(services, override)
    embedded = await embed_probes(services, probes)
    decision = decisions.verify_pair(services, embedded.vectors, override)
    return schemas.VerifyResponse(
        match=decision.match,
        similarity=decision.similarity,
        threshold=decision.threshold,
        threshold_source=decision.threshold_source,
        target_far=decision.target,
        estimated_far=decision.estimated_far,
        faces=embedded.faces,
        probe_quality=embedded.quality,
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
    profile) cannot drag a genuine probe below the threshold, whereas the mean would.
    The threshold is the one that holds `FACEGATE_TARGET_FAR` for an identity with this
    many templates. The decision is recorded for the consistency monitor."""
    start = time.perf_counter()
    identity_id, probe = await _identity_inputs(request)
    templates = await decisions.identity_templates(services, identity_id)
    embedded = await embed_probes(services, [probe])
    decision, similarities = await decisions.verify_identity(
        services, identity_id, templates, embedded.vectors[0]
    )
    return schemas.VerifyIdentityResponse(
        match=decision.match,
        identity_id=identity_id,
        similarity=decision.similarity,
        similarities=[float(s) for s in similarities],
        templates=len(similarities),
        threshold=decision.threshold,
        threshold_source=decision.threshold_source,
        target_far=decision.target,
        estimated_far=decision.estimated_far,
        face=embedded.faces[0],
        probe_quality=embedded.quality,
        timings_ms={**embedded.timings_ms, "total": ms(time.perf_counter() - start)},
    )

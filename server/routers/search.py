"""1:N search: who in the gallery is this (``POST /v1/search``)? The probe is a photo or an
embedding (see ``routers.probes``)."""

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


async def _search_inputs(request: Request) -> tuple[tuple[str, Probe], schemas.SearchOptions]:
    """The probe and the options (k, decide), from a JSON or a multipart body."""
    body = await json_or_form(request, schemas.SearchJSON)
    if isinstance(body, schemas.SearchJSON):
        return json_probe(body.image_b64, body.embedding), body
    return ("image", form_image(body, "image")), form_options(body, schemas.SearchOptions)


@router.post(
    "/search",
    response_model=schemas.SearchResponse,
    summary="Who is this? (1:N against the gallery)",
    responses=conflicts(
        "an embedding of another model, or a gallery with templates of another model "
        "(model_mismatch)"
    ),
    openapi_extra=request_body_openapi(("image",), schemas.SearchOptions, schemas.SearchJSON),
)
async def search(request: Request, services: ServicesDep) -> schemas.SearchResponse:
    """Multipart (file `image`, fields `k`, `decide`) or JSON (`image_b64` or `embedding`,
    `k`, `decide`).

    The k best identities; `match` is the best one if it passes the open-set threshold of
    a gallery of this size (the one that holds `FACEGATE_TARGET_FPIR`: the share of people
    never enrolled who would be "found"), else null. `decide=false` (investigation mode)
    returns the candidates with their estimated FPIR and decides nothing."""
    start = time.perf_counter()
    probe, options = await _search_inputs(request)
    embedded = await embed_probes(services, [probe])
    t0 = time.perf_counter()
    hits, composition = await services.gallery.call(
        lambda g: (g.search(embedded.vectors[0], options.k), g.composition())
    )
    search_s = time.perf_counter() - t0
    services.metrics.stage.labels("search").observe(search_s)
    ranked = decisions.rank_candidates(services, hits, composition, options.decide)
    point = ranked.point
    return schemas.SearchResponse(
        decision="not_decided" if point is None else "match" if ranked.match else "no_match",
        match=ranked.match,
        candidates=ranked.candidates,
        threshold=None if point is None else point.threshold,
        threshold_source=None if point is None else point.source,
        target_fpir=None if point is None else point.target,
        estimated_fpir=ranked.estimated_fpir,
        gallery=schemas.GallerySize(identities=ranked.identities, templates=ranked.templates),
        face=embedded.faces[0],
        probe_quality=embedded.quality,
        timings_ms={
            **embedded.timings_ms,
            "search": ms(search_s),
            "total": ms(time.perf_counter() - start),
        },
    )

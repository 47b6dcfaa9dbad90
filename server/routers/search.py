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


async def _search_inputs(request: Request) -> tuple[tuple[str, Probe], int]:
    """The probe and k, from a JSON or a multipart body."""
    body = await json_or_form(request, schemas.SearchJSON)
    if isinstance(body, schemas.SearchJSON):
        return json_probe(body.image_b64, body.embedding), body.k
    k = form_options(body, schemas.SearchOptions).k
    return ("image", form_image(body, "image")), k


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
    """Multipart (file `image`, field `k`) or JSON (`image_b64` or `embedding`, and `k`).

    The k best identities; `match` is the best one if it passes the threshold, else null."""
    start = time.perf_counter()
    probe, k = await _search_inputs(request)
    embedded = await embed_probes(services, [probe])
    t0 = time.perf_counter()
    hits = await services.gallery.call(lambda g: g.search(embedded.vectors[0], k))
    search_s = time.perf_counter() - t0
    services.metrics.stage.labels("search").observe(search_s)
    candidates, best = decisions.rank_candidates(services, hits)
    return schemas.SearchResponse(
        decision="match" if best else "no_match",
        match=best,
        candidates=candidates,
        threshold=services.threshold,
        face=embedded.faces[0],
        timings_ms={
            **embedded.timings_ms,
            "search": ms(search_s),
            "total": ms(time.perf_counter() - start),
        },
    )

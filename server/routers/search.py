"""1:N search: who in the gallery is this (``POST /v1/search``)?"""

from __future__ import annotations

import time
from typing import Annotated

from facegate.server import schemas
from facegate.server.deps import ServicesDep
from facegate.server.routers.common import ms, prepare, v1_router
from fastapi import File, Form, UploadFile

router = v1_router(tags=["verify"])


@router.post(
    "/search",
    response_model=schemas.SearchResponse,
    summary="Who is this? (1:N against the gallery)",
)
async def search(
    services: ServicesDep,
    image: Annotated[UploadFile, File(description="a photo")],
    k: Annotated[int, Form(ge=1, le=100)] = 5,
) -> schemas.SearchResponse:
    """The k best identities; `match` is the best one if it passes the threshold, else null."""
    start = time.perf_counter()
    prepared = await prepare(services, await image.read(), "image")
    embeddings, embed_s = await services.embed(prepared.crop[None])
    t0 = time.perf_counter()
    hits = await services.gallery.call(lambda g: g.search(embeddings[0], k))
    search_s = time.perf_counter() - t0
    services.metrics.stage.labels("search").observe(search_s)
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
    timings = {k_: ms(v) for k_, v in prepared.timings.items()}
    return schemas.SearchResponse(
        decision="match" if best else "no_match",
        match=best,
        candidates=candidates,
        threshold=threshold,
        face=schemas.FaceInfo(**prepared.face_dict()),
        timings_ms={
            **timings,
            "embed": ms(embed_s),
            "search": ms(search_s),
            "total": ms(time.perf_counter() - start),
        },
    )

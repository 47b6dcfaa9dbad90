"""What several routers share: the documented error statuses, timings, and preparing uploads."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from facegate.core.errors import FacegateError
from facegate.gallery import Identity
from facegate.server import schemas
from facegate.server.deps import authenticate, require
from facegate.server.pipeline import PreparedFace
from facegate.server.services import Services
from fastapi import APIRouter, Depends

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": text}
    for status, text in {
        400: "undecodable image",
        401: "missing API key",
        403: "wrong API key, or a key without the route's scope",
        429: "too many failed authentications, or the key is over its rate",
        413: "image or request too large",
        415: "unsupported image type",
        422: "no face, several faces (strict), or invalid request",
    }.items()
}


def v1_router(prefix: str = "", scope: str | None = "verify", **kwargs: Any) -> APIRouter:
    """A router under /v1 whose routes need ``scope`` (None: each route names its own;
    ``server.keys``). The full prefix is its own (not a parent's) because the request
    metrics label requests with the matched route's path."""
    return APIRouter(
        prefix=f"/v1{prefix}",
        dependencies=[Depends(require(scope) if scope else authenticate)],
        responses=ERROR_RESPONSES,
        **kwargs,
    )


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def sum_timings(prepared: Sequence[PreparedFace]) -> dict[str, float]:
    return {stage: sum(p.timings[stage] for p in prepared) for stage in ("decode", "detect", "align")}


def identity_info(identity: Identity) -> schemas.IdentityInfo:
    return schemas.IdentityInfo(
        identity_id=identity.identity_id,
        name=identity.name,
        metadata=identity.metadata,
        created_at=identity.created_at,
        templates=[
            schemas.TemplateInfo(
                template_id=t.template_id, source=t.source, score=t.score, created_at=t.created_at
            )
            for t in identity.templates
        ],
    )


async def prepare(
    services: Services, data: bytes, label: str, *, policy: str | None = None
) -> PreparedFace:
    """Prepare one image; errors name the image they are about."""
    try:
        prepared = await services.pipeline.prepare(data, policy=policy)
    except FacegateError as exc:
        raise type(exc)(f"{label}: {exc.message}") from exc
    services.metrics.observe_stages(prepared.timings)
    return prepared


async def prepare_every_face(
    services: Services, data: bytes, label: str, *, max_faces: int
) -> list[PreparedFace]:
    """Each face of one image, largest first; errors name the image they are about."""
    try:
        prepared = await services.pipeline.prepare_every_face(data, max_faces=max_faces)
    except FacegateError as exc:
        raise type(exc)(f"{label}: {exc.message}") from exc
    services.metrics.observe_stages(sum_timings(prepared))
    return prepared


async def prepare_all(
    services: Services, images: Sequence[tuple[str, bytes]], *, policy: str | None = None
) -> list[PreparedFace | FacegateError]:
    """Prepare images concurrently; each result is the face or the FacegateError it raised."""
    results = await asyncio.gather(
        *(prepare(services, data, label, policy=policy) for label, data in images),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, FacegateError):
            raise result
    return list(results)  # type: ignore[arg-type]

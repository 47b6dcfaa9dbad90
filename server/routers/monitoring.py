"""Monitoring: threshold consistency (/v1/consistency) and the unauthenticated probes
(/healthz, /readyz, /metrics)."""

from __future__ import annotations

from typing import Any

from facegate.gallery.consistency import consistency_report
from facegate.server import schemas
from facegate.server.deps import ServicesDep, SettingsDep
from facegate.server.routers.common import v1_router
from facegate.server.services import Services
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

router = v1_router(tags=["monitoring"])
probes = APIRouter(tags=["monitoring"])


@router.get(
    "/consistency",
    response_model=schemas.ConsistencyResponse,
    summary="Threshold consistency of the gallery (OPIS, worst identities)",
)
async def consistency(services: ServicesDep, settings: SettingsDep) -> dict[str, Any]:
    """Genuine and impostor scores from the enrolled templates give each identity its
    FRR/FAR at the bundle threshold and its own threshold at the target FAR; OPIS sums
    up how much the identities disagree. Refreshes the per-identity gauges of /metrics."""
    threshold = services.threshold
    report = await services.gallery.call(
        lambda g: consistency_report(
            g, threshold, target_far=settings.target_far, worst=settings.metrics_worst_n
        )
    )
    services.metrics.set_consistency(report["opis"], report["worst"])
    return report


# Each probe also answers HEAD (load balancers and uptime checks use it), through a
# second, undocumented route: one GET+HEAD route would document a duplicate operation.
# The HEAD decorator sits on top so GET is registered first and a 405 says "Allow: GET".
@probes.head("/healthz", include_in_schema=False)
@probes.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.head("/readyz", include_in_schema=False)
@probes.get(
    "/readyz",
    response_model=schemas.Ready,
    summary="Model, detector and gallery are loaded (503 until then)",
    responses={503: {"model": schemas.Ready}},
)
async def readyz(request: Request) -> JSONResponse:
    services: Services | None = request.app.state.services
    if services is None or services.gallery.gallery is None:
        return JSONResponse(schemas.Ready(ready=False).model_dump(), status_code=503)
    stats = await services.refresh_gallery_size()
    ready = schemas.Ready(
        ready=True,
        model_id=services.bundle.model_id,
        runtime=services.embedder.runtime,
        detector=services.settings.detector,
        gallery=True,
        identities=stats.get("identities"),
        templates=stats.get("templates"),
    )
    return JSONResponse(ready.model_dump())


@probes.head("/metrics", include_in_schema=False)
@probes.get("/metrics", summary="Prometheus metrics")
async def prometheus_metrics(request: Request) -> Response:
    return Response(
        request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )

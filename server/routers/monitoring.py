"""Monitoring: threshold consistency (/v1/consistency), the live scores behind it
(/v1/consistency/live) and the unauthenticated probes (/healthz, /readyz, /metrics)."""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
from facegate.gallery.consistency import consistency_report
from facegate.server import schemas
from facegate.server.deps import ServicesDep, SettingsDep, metrics_guard
from facegate.server.routers.common import v1_router
from facegate.server.services import Services
from facegate.server.thresholds import REPORTED_TEMPLATE_COUNTS, OperatingPoint
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

router = v1_router(tags=["monitoring"])
probes = APIRouter(tags=["monitoring"])
READY_PROBE_S = 0.5  # /readyz answers within a second, whatever the gallery database does


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
    services.metrics.gallery_quarantined.set(len(report["quarantined"]))
    composition = await services.gallery.call(lambda g: g.composition())
    return {**report, "operating_points": operating_points(services, composition)}


def operating_points(services: Services, composition: dict[int, int]) -> dict[str, Any]:
    """The thresholds in force and the rates they hold: 1:1, identity by template count
    (1..5 and each count enrolled now), and search of the gallery as it is."""
    thresholds = services.thresholds
    counts = sorted({*REPORTED_TEMPLATE_COUNTS, *composition})

    def point(p: OperatingPoint, **extra: Any) -> dict[str, Any]:
        return {"threshold": p.threshold, "source": p.source, "target": p.target, **extra}

    pair = thresholds.pair()
    search = thresholds.search(composition)
    return {
        "pair": point(pair, estimated_far=thresholds.far(pair.threshold)),
        "identity": [point(thresholds.identity(n), templates=n,
                           identities=composition.get(n, 0)) for n in counts],
        "search": point(search, identities=sum(composition.values()),
                        templates=sum(n * c for n, c in composition.items()),
                        estimated_fpir=thresholds.fpir(search.threshold, composition)),
    }


class ScoreBin(BaseModel):
    lo: float
    hi: float
    match: int = Field(description="decisions in [lo, hi) that were accepted")
    no_match: int = Field(description="decisions in [lo, hi) that were rejected")


class LiveScores(BaseModel):
    """A histogram of the similarities of recorded live decisions, split by outcome."""

    threshold: float = Field(description="the threshold decisions are made at now")
    decisions: int = Field(description="recorded decisions (the last ones kept per identity)")
    matches: int
    routes: list[str] = Field(description="the routes whose decisions are recorded")
    bins: list[ScoreBin] = Field(description="equal-width bins from the lowest score to the highest")


def score_histogram(
    decisions: list[tuple[float, bool]], threshold: float, bins: int
) -> list[ScoreBin]:
    """Equal bins over the scores and the threshold (rounded out to 0.01) so the threshold
    always falls on the chart; the last bin is closed."""
    if not decisions:
        return []
    scores = np.array([s for s, _ in decisions], dtype=np.float64)
    accepted = np.array([a for _, a in decisions], dtype=bool)
    lo = math.floor(min(scores.min(), threshold) * 100) / 100
    hi = math.ceil(max(scores.max(), threshold) * 100) / 100
    edges = np.linspace(lo, max(hi, lo + 0.01), bins + 1)
    match, _ = np.histogram(scores[accepted], edges)
    no_match, _ = np.histogram(scores[~accepted], edges)
    return [
        ScoreBin(lo=float(a), hi=float(b), match=int(m), no_match=int(n))
        for a, b, m, n in zip(edges[:-1], edges[1:], match, no_match, strict=True)
    ]


@router.get(
    "/consistency/live",
    response_model=LiveScores,
    summary="Histogram of live similarity scores, split by decision",
)
async def live_scores(
    services: ServicesDep, bins: Annotated[int, Query(ge=1, le=200)] = 30
) -> LiveScores:
    """The decisions the gallery records for the consistency report's `observed` figures
    (`POST /v1/verify/identity`: the probe's identity is known), as a histogram: where live
    scores fall against the threshold shows whether it separates real traffic."""
    per_identity = await services.gallery.call(lambda g: g.decisions())
    decisions = [d for rows in per_identity.values() for d in rows]
    return LiveScores(
        threshold=services.threshold,
        decisions=len(decisions),
        matches=sum(1 for _, accepted in decisions if accepted),
        routes=["verify_identity"],
        bins=score_histogram(decisions, services.threshold, bins),
    )


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
    summary="Model, detector and gallery are loaded, the gallery index has caught up "
    "with its database and the database answers (503 until then, and while a PostgreSQL "
    "gallery does not answer within 0.5 s)",
    responses={503: {"model": schemas.Ready}},
)
async def readyz(request: Request) -> JSONResponse:
    services: Services | None = request.app.state.services
    gallery = None if services is None else services.gallery.gallery
    if services is None or gallery is None:
        return JSONResponse(schemas.Ready(ready=False).model_dump(), status_code=503)
    stats = await services.gallery.probe(READY_PROBE_S) if gallery.ready else None
    if stats is not None:
        services.record_gallery_size(stats)
    ready = schemas.Ready(
        ready=stats is not None,
        model_id=services.bundle.model_id,
        runtime=services.embedder.runtime,
        detector=services.settings.detector,
        gallery=stats is not None,
        identities=None if stats is None else stats.get("identities"),
        templates=None if stats is None else stats.get("templates"),
    )
    return JSONResponse(ready.model_dump(), status_code=200 if ready.ready else 503)


@probes.head("/metrics", include_in_schema=False, dependencies=[Depends(metrics_guard)])
@probes.get(
    "/metrics", summary="Prometheus metrics (no identity ids unless FACEGATE_METRICS_IDENTITY_IDS)",
    dependencies=[Depends(metrics_guard)],
)
async def prometheus_metrics(request: Request) -> Response:
    services = request.app.state.services
    gallery = None if services is None else services.gallery.gallery
    request.app.state.metrics.unrecorded_decisions.set(getattr(gallery, "unrecorded_decisions", 0))
    return Response(
        request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )

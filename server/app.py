"""The FastAPI application: /v1 verification and gallery routes, health, readiness, metrics.

``create_app(settings)`` builds one app; its ``lifespan`` loads the bundle, detector,
embedder and gallery once and closes them on shutdown. Routes stay thin: parsing and
HTTP shape here, the work in `pipeline` (threads), `batching` (embedder) and the gallery.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from facegate.core.errors import DuplicateIdentity, FacegateError, ImageDecodeError
from facegate.gallery import Identity
from facegate.gallery.consistency import consistency_report
from facegate.server import schemas
from facegate.server.deps import (
    ServicesDep,
    SettingsDep,
    get_services,
    require_admin_key,
    require_api_key,
)
from facegate.server.errors import (
    InvalidRequest,
    NoUsableImage,
    ThresholdOverrideForbidden,
    UnsupportedBody,
    install_error_handlers,
)
from facegate.server.metrics import ServerMetrics
from facegate.server.middleware import BodyLimitMiddleware, RequestContextMiddleware
from facegate.server.pipeline import PreparedFace
from facegate.server.services import Services, start_services, stop_services
from facegate.server.settings import Settings
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from facegate import __version__

IDENTITY_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorResponse, "description": text}
    for status, text in {
        400: "undecodable image",
        401: "missing API key",
        403: "wrong API key",
        413: "image or request too large",
        415: "unsupported image type",
        422: "no face, several faces (strict), or invalid request",
    }.items()
}


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _sum_timings(prepared: Sequence[PreparedFace]) -> dict[str, float]:
    return {stage: sum(p.timings[stage] for p in prepared) for stage in ("decode", "detect", "align")}


def _identity_info(identity: Identity) -> schemas.IdentityInfo:
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


async def _prepare(services: Services, data: bytes, label: str) -> PreparedFace:
    """Prepare one image; errors name the image they are about."""
    try:
        prepared = await services.pipeline.prepare(data)
    except FacegateError as exc:
        raise type(exc)(f"{label}: {exc.message}") from exc
    services.metrics.observe_stages(prepared.timings)
    return prepared


async def _prepare_all(
    services: Services, images: Sequence[tuple[str, bytes]]
) -> list[PreparedFace | FacegateError]:
    """Prepare images concurrently; each result is the face or the FacegateError it raised."""
    results = await asyncio.gather(
        *(_prepare(services, data, label) for label, data in images), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, FacegateError):
            raise result
    return list(results)  # type: ignore[arg-type]


def _decode_b64(value: str, label: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"{label}: not valid base64") from None


async def _verify_inputs(request: Request) -> tuple[bytes, bytes, float | None]:
    """The two images and optional threshold, from a JSON or a multipart body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = schemas.VerifyJSON.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        return (
            _decode_b64(body.image1_b64, "image1"),
            _decode_b64(body.image2_b64, "image2"),
            body.threshold,
        )
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        images = []
        for field in ("image1", "image2"):
            upload = form.get(field)
            if not isinstance(upload, StarletteUploadFile):
                raise InvalidRequest(f"multipart field {field!r} must be an image file")
            images.append(await upload.read())
        raw = form.get("threshold")
        try:
            threshold = float(raw) if isinstance(raw, str) and raw != "" else None
        except ValueError:
            raise InvalidRequest("threshold must be a number") from None
        return images[0], images[1], threshold
    raise UnsupportedBody("send multipart/form-data or application/json")


def _verify_openapi() -> dict[str, Any]:
    json_schema = schemas.VerifyJSON.model_json_schema()
    multipart = {
        "type": "object",
        "required": ["image1", "image2"],
        "properties": {
            "image1": {"type": "string", "format": "binary"},
            "image2": {"type": "string", "format": "binary"},
            "threshold": {"type": "number"},
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": json_schema},
            },
        }
    }


def _parse_metadata(metadata: str | None) -> dict[str, Any]:
    if not metadata:
        return {}
    try:
        value = json.loads(metadata)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"metadata is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be a JSON object")
    return value


async def _read_uploads(images: Sequence[UploadFile]) -> list[tuple[str, bytes]]:
    if not images:
        raise InvalidRequest("at least one image is required")
    return [(f"image {i} ({u.filename or 'unnamed'})", await u.read()) for i, u in enumerate(images)]


async def _embed_accepted(
    services: Services, images: Sequence[UploadFile], results: list[PreparedFace | FacegateError]
) -> tuple[list[schemas.ImageResult], list[PreparedFace], np.ndarray]:
    """Per-image outcome, the accepted faces and their embeddings; 422 if none is usable."""
    accepted = [r for r in results if isinstance(r, PreparedFace)]
    report = [
        schemas.ImageResult(
            index=i,
            filename=upload.filename,
            accepted=isinstance(result, PreparedFace),
            face=result.face_dict() if isinstance(result, PreparedFace) else None,
            reason=None
            if isinstance(result, PreparedFace)
            else schemas.ErrorDetail(code=result.code, message=result.message),
        )
        for i, (upload, result) in enumerate(zip(images, results, strict=True))
    ]
    if not accepted:
        reasons = "; ".join(r.message for r in results if isinstance(r, FacegateError))
        raise NoUsableImage(f"no usable image: {reasons}")
    embeddings, _ = await services.embed(np.stack([p.crop for p in accepted]))
    return report, accepted, embeddings


def _attach_templates(report: list[schemas.ImageResult], template_ids: Sequence[str]) -> None:
    ids = iter(template_ids)
    for item in report:
        if item.accepted:
            item.template_id = next(ids)


def _template_kwargs(
    services: Services, images: Sequence[UploadFile], results: list, accepted: list[PreparedFace]
) -> dict[str, Any]:
    sources = [u.filename for u, r in zip(images, results, strict=True) if isinstance(r, PreparedFace)]
    return {
        "sources": sources,
        "scores": [p.face.score for p in accepted],
        "crops": np.stack([p.crop for p in accepted]) if services.settings.keep_crops else None,
    }


def _check_identity_id(identity_id: str | None) -> None:
    if identity_id is not None and not re.match(IDENTITY_ID_PATTERN, identity_id):
        raise InvalidRequest("identity_id must be 1-128 characters of A-Z a-z 0-9 . _ : -")


def build_v1_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
    admin = [Depends(require_admin_key)]

    @router.post(
        "/verify",
        response_model=schemas.VerifyResponse,
        summary="Do two photos show the same person? (1:1)",
        openapi_extra=_verify_openapi(),
        tags=["verify"],
    )
    async def verify(
        request: Request, services: ServicesDep, settings: SettingsDep
    ) -> schemas.VerifyResponse:
        """Multipart (files `image1`, `image2`) or JSON (`image1_b64`, `image2_b64`).

        The largest face of each image is compared (or the only one, with
        `FACEGATE_FACE_POLICY=strict`). A `threshold` is honoured only when the server
        allows overrides (else 403).
        """
        start = time.perf_counter()
        image1, image2, override = await _verify_inputs(request)
        if override is not None and not settings.allow_threshold_override:
            raise ThresholdOverrideForbidden("this server does not allow threshold overrides")
        results = await _prepare_all(services, [("image1", image1), ("image2", image2)])
        failures = [r for r in results if isinstance(r, FacegateError)]
        if failures:
            raise failures[0]
        prepared: list[PreparedFace] = results  # type: ignore[assignment]
        embeddings, embed_s = await services.embed(np.stack([p.crop for p in prepared]))
        similarity = float(np.dot(embeddings[0], embeddings[1]))
        threshold = services.threshold if override is None else override
        source = services.threshold_source if override is None else "request"
        match = similarity >= threshold
        services.metrics.observe_decision("verify", similarity, match)
        timings = {k: _ms(v) for k, v in _sum_timings(prepared).items()}
        return schemas.VerifyResponse(
            match=match,
            similarity=similarity,
            threshold=threshold,
            threshold_source=source,
            faces=[schemas.FaceInfo(**p.face_dict()) for p in prepared],
            timings_ms=schemas.Timings(
                **timings, embed=_ms(embed_s), total=_ms(time.perf_counter() - start)
            ),
        )

    @router.post(
        "/identities",
        status_code=201,
        response_model=schemas.EnrolResponse,
        dependencies=admin,
        summary="Enrol an identity from one or more photos",
        tags=["identities"],
        responses={409: {"model": schemas.ErrorResponse, "description": "duplicate identity_id"}},
    )
    async def enrol(
        services: ServicesDep,
        name: Annotated[str, Form(min_length=1, max_length=256)],
        images: Annotated[list[UploadFile], File(description="one or more photos")],
        identity_id: Annotated[str | None, Form(description="chosen id; generated if absent")] = None,
        metadata: Annotated[str | None, Form(description='JSON object, e.g. {"team": "a"}')] = None,
    ) -> schemas.EnrolResponse:
        """Each image is accepted (one template) or rejected with its reason; 422 if none is usable."""
        _check_identity_id(identity_id)
        meta = _parse_metadata(metadata)
        if identity_id is not None and await services.gallery.call(
            lambda g: _exists(g, identity_id)
        ):
            raise DuplicateIdentity(f"identity {identity_id!r} already exists")
        results = await _prepare_all(services, await _read_uploads(images))
        report, accepted, embeddings = await _embed_accepted(services, images, results)
        kwargs = _template_kwargs(services, images, results, accepted)
        identity = await services.gallery.call(
            lambda g: g.create_identity(
                identity_id, name=name, metadata=meta, embeddings=embeddings, **kwargs
            )
        )
        _attach_templates(report, [t.template_id for t in identity.templates])
        await services.refresh_gallery_size()
        return schemas.EnrolResponse(identity=_identity_info(identity), images=report)

    @router.post(
        "/identities/{identity_id}/templates",
        status_code=201,
        response_model=schemas.EnrolResponse,
        dependencies=admin,
        summary="Add photos to an enrolled identity",
        tags=["identities"],
    )
    async def add_templates(
        services: ServicesDep,
        identity_id: str,
        images: Annotated[list[UploadFile], File(description="one or more photos")],
    ) -> schemas.EnrolResponse:
        await services.gallery.call(lambda g: g.get_identity(identity_id))  # 404 before work
        results = await _prepare_all(services, await _read_uploads(images))
        report, accepted, embeddings = await _embed_accepted(services, images, results)
        kwargs = _template_kwargs(services, images, results, accepted)
        templates = await services.gallery.call(
            lambda g: g.add_templates(identity_id, embeddings, **kwargs)
        )
        _attach_templates(report, [t.template_id for t in templates])
        identity = await services.gallery.call(lambda g: g.get_identity(identity_id))
        await services.refresh_gallery_size()
        return schemas.EnrolResponse(identity=_identity_info(identity), images=report)

    @router.get(
        "/identities",
        response_model=schemas.IdentityList,
        summary="List enrolled identities (paginated)",
        tags=["identities"],
    )
    async def list_identities(
        services: ServicesDep,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> schemas.IdentityList:
        identities, total = await services.gallery.call(
            lambda g: g.list_identities(offset=offset, limit=limit)
        )
        return schemas.IdentityList(
            identities=[_identity_info(i) for i in identities], total=total, offset=offset, limit=limit
        )

    @router.get(
        "/identities/{identity_id}",
        response_model=schemas.IdentityInfo,
        summary="One identity and its templates",
        tags=["identities"],
    )
    async def get_identity(services: ServicesDep, identity_id: str) -> schemas.IdentityInfo:
        return _identity_info(await services.gallery.call(lambda g: g.get_identity(identity_id)))

    @router.delete(
        "/identities/{identity_id}",
        response_model=schemas.Deleted,
        dependencies=admin,
        summary="Delete an identity and all its templates",
        tags=["identities"],
    )
    async def delete_identity(services: ServicesDep, identity_id: str) -> schemas.Deleted:
        await services.gallery.call(lambda g: g.delete_identity(identity_id))
        await services.refresh_gallery_size()
        return schemas.Deleted(identity_id=identity_id)

    @router.delete(
        "/identities/{identity_id}/templates/{template_id}",
        response_model=schemas.Deleted,
        dependencies=admin,
        summary="Delete one template of an identity",
        tags=["identities"],
    )
    async def delete_template(
        services: ServicesDep, identity_id: str, template_id: str
    ) -> schemas.Deleted:
        await services.gallery.call(lambda g: g.delete_template(identity_id, template_id))
        await services.refresh_gallery_size()
        return schemas.Deleted(identity_id=identity_id, template_id=template_id)

    @router.post(
        "/search",
        response_model=schemas.SearchResponse,
        summary="Who is this? (1:N against the gallery)",
        tags=["verify"],
    )
    async def search(
        services: ServicesDep,
        image: Annotated[UploadFile, File(description="a photo")],
        k: Annotated[int, Form(ge=1, le=100)] = 5,
    ) -> schemas.SearchResponse:
        """The k best identities; `match` is the best one if it passes the threshold, else null."""
        start = time.perf_counter()
        prepared = await _prepare(services, await image.read(), "image")
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
        timings = {k_: _ms(v) for k_, v in prepared.timings.items()}
        return schemas.SearchResponse(
            decision="match" if best else "no_match",
            match=best,
            candidates=candidates,
            threshold=threshold,
            face=schemas.FaceInfo(**prepared.face_dict()),
            timings_ms={
                **timings,
                "embed": _ms(embed_s),
                "search": _ms(search_s),
                "total": _ms(time.perf_counter() - start),
            },
        )

    @router.post(
        "/verify/identity",
        response_model=schemas.VerifyIdentityResponse,
        summary="Is this photo the enrolled identity? (1:1 against its templates)",
        tags=["verify"],
    )
    async def verify_identity(
        services: ServicesDep,
        image: Annotated[UploadFile, File(description="a photo")],
        identity_id: Annotated[str, Form()],
    ) -> schemas.VerifyIdentityResponse:
        """Similarity is the max over the identity's templates: one bad template (blur,
        profile) cannot drag a genuine probe below the threshold, whereas the mean would
        (the mean is steadier against one lucky impostor match, at the cost of FRR).
        The decision is recorded for the consistency monitor."""
        start = time.perf_counter()
        templates = await services.gallery.call(lambda g: g.identity_embeddings(identity_id))
        prepared = await _prepare(services, await image.read(), "image")
        embeddings, embed_s = await services.embed(prepared.crop[None])
        sims = templates @ embeddings[0] if len(templates) else np.zeros(0, np.float32)
        similarity = float(sims.max()) if len(sims) else -1.0
        threshold = services.threshold
        match = similarity >= threshold
        await services.gallery.call(
            lambda g: g.record_decision(identity_id, similarity, match, "verify_identity")
        )
        services.metrics.observe_decision("verify_identity", similarity, match)
        timings = {k: _ms(v) for k, v in prepared.timings.items()}
        return schemas.VerifyIdentityResponse(
            match=match,
            identity_id=identity_id,
            similarity=similarity,
            similarities=[float(s) for s in sims],
            threshold=threshold,
            threshold_source=services.threshold_source,
            face=schemas.FaceInfo(**prepared.face_dict()),
            timings_ms={**timings, "embed": _ms(embed_s), "total": _ms(time.perf_counter() - start)},
        )

    @router.get(
        "/consistency",
        response_model=schemas.ConsistencyResponse,
        summary="Threshold consistency of the gallery (OPIS, worst identities)",
        tags=["monitoring"],
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

    return router


def _exists(gallery: Any, identity_id: str) -> bool:
    try:
        gallery.get_identity(identity_id)
    except FacegateError:
        return False
    return True


def create_app(settings: Settings | None = None) -> FastAPI:
    """One app for ``settings`` (read from ``FACEGATE_*`` when omitted)."""
    settings = settings or Settings()
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await start_services(settings, metrics)
        app.state.services = services
        try:
            yield
        finally:
            app.state.services = None
            await stop_services(services)

    app = FastAPI(
        title="facegate",
        version=__version__,
        summary="Face verification: 1:1 verify, enrol, 1:N search, consistency monitoring",
        lifespan=lifespan,
        responses={413: {"model": schemas.ErrorResponse, "description": "request too large"}},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.services = None
    install_error_handlers(app)
    app.include_router(build_v1_router())

    @app.get("/healthz", tags=["monitoring"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=schemas.Ready,
        tags=["monitoring"],
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
            detector=settings.detector,
            gallery=True,
            identities=stats.get("identities"),
            templates=stats.get("templates"),
        )
        return JSONResponse(ready.model_dump())

    @app.get("/metrics", tags=["monitoring"], summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", "X-Admin-Key", "X-Request-ID", "Content-Type"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


__all__ = ["create_app", "get_services"]

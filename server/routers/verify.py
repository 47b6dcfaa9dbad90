"""1:1 verification: two photos (``POST /v1/verify``), or a photo against an enrolled
identity (``POST /v1/verify/identity``)."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Annotated, Any

import numpy as np
from facegate.core.errors import FacegateError, ImageDecodeError
from facegate.server import schemas
from facegate.server.deps import ServicesDep, SettingsDep
from facegate.server.errors import InvalidRequest, ThresholdOverrideForbidden, UnsupportedBody
from facegate.server.pipeline import PreparedFace
from facegate.server.routers.common import ms, prepare, prepare_all, sum_timings, v1_router
from fastapi import File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

router = v1_router(tags=["verify"])


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


@router.post(
    "/verify",
    response_model=schemas.VerifyResponse,
    summary="Do two photos show the same person? (1:1)",
    openapi_extra=_verify_openapi(),
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
    results = await prepare_all(services, [("image1", image1), ("image2", image2)])
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
    timings = {k: ms(v) for k, v in sum_timings(prepared).items()}
    return schemas.VerifyResponse(
        match=match,
        similarity=similarity,
        threshold=threshold,
        threshold_source=source,
        faces=[schemas.FaceInfo(**p.face_dict()) for p in prepared],
        timings_ms=schemas.Timings(**timings, embed=ms(embed_s), total=ms(time.perf_counter() - start)),
    )


@router.post(
    "/verify/identity",
    response_model=schemas.VerifyIdentityResponse,
    summary="Is this photo the enrolled identity? (1:1 against its templates)",
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
    prepared = await prepare(services, await image.read(), "image")
    embeddings, embed_s = await services.embed(prepared.crop[None])
    sims = templates @ embeddings[0] if len(templates) else np.zeros(0, np.float32)
    similarity = float(sims.max()) if len(sims) else -1.0
    threshold = services.threshold
    match = similarity >= threshold
    await services.gallery.call(
        lambda g: g.record_decision(identity_id, similarity, match, "verify_identity")
    )
    services.metrics.observe_decision("verify_identity", similarity, match)
    timings = {k: ms(v) for k, v in prepared.timings.items()}
    return schemas.VerifyIdentityResponse(
        match=match,
        identity_id=identity_id,
        similarity=similarity,
        similarities=[float(s) for s in sims],
        threshold=threshold,
        threshold_source=services.threshold_source,
        face=schemas.FaceInfo(**prepared.face_dict()),
        timings_ms={**timings, "embed": ms(embed_s), "total": ms(time.perf_counter() - start)},
    )

"""The gallery as a resource: enrol, add templates, list, get and delete identities."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from facegate.core.errors import (
    DuplicateIdentity,
    FacegateError,
    MultipleFacesError,
    UnknownIdentity,
)
from facegate.gallery import Identity
from facegate.gallery.metadata import parse_metadata
from facegate.server import schemas
from facegate.server.deps import ServicesDep, require
from facegate.server.errors import InvalidRequest, NoUsableImage, TooManyImages
from facegate.server.pipeline import PreparedFace
from facegate.server.quality import face_info
from facegate.server.review import advice, review_photos
from facegate.server.routers.common import identity_info, prepare_all, v1_router
from facegate.server.services import Services
from fastapi import Depends, File, Form, Query, UploadFile

# "." and ".." are refused: clients normalise them out of URL paths, so they would be
# enrolled yet unreachable.
IDENTITY_ID_PATTERN = r"^(?!\.{1,2}$)[A-Za-z0-9._:\-]{1,128}$"
# SQLite binds 64-bit integers; a page offset beyond any gallery is refused, not a 500.
MAX_OFFSET = 2**31 - 1

router = v1_router("/identities", scope=None, tags=["identities"])
reader = [Depends(require("verify"))]
enroller = [Depends(require("enrol"))]
admin = [Depends(require("admin"))]


async def _read_uploads(
    services: Services, images: Sequence[UploadFile]
) -> list[tuple[str, bytes]]:
    """The uploads' bytes, refused before any is read or decoded when there are too many."""
    if not images:
        raise InvalidRequest("at least one image is required")
    limit = services.settings.max_images_per_request
    if len(images) > limit:
        raise TooManyImages(f"{len(images)} images in one request; the limit is {limit}")
    return [(f"image {i} ({u.filename or 'unnamed'})", await u.read()) for i, u in enumerate(images)]


async def _prepare_uploads(
    services: Services, images: Sequence[UploadFile]
) -> list[PreparedFace | FacegateError]:
    """Each upload's face by the enrolment policy (strict: exactly one face per photo)."""
    policy = services.settings.enrol_face_policy
    results = await prepare_all(services, await _read_uploads(services, images), policy=policy)
    return [
        type(r)(f"{r.message}; enrolment takes photos of one person (the server's "
                "FACEGATE_ENROL_FACE_POLICY=largest would take the largest face)")
        if isinstance(r, MultipleFacesError)
        else r
        for r in results
    ]


@dataclass
class _NewTemplates:
    """What an enrolment's photos gave: each photo's outcome, and the accepted faces'
    embeddings with what the store keeps beside them (source file, detector score, crop)."""

    report: list[schemas.ImageResult]
    embeddings: np.ndarray
    stored: dict[str, Any]

    def attach(self, template_ids: Sequence[str]) -> None:
        """Name each accepted photo's new template in the report."""
        ids = iter(template_ids)
        for item in self.report:
            if item.accepted:
                item.template_id = next(ids)

    def refused(self) -> list[str]:
        return [item.reason.code for item in self.report if item.reason is not None]


async def _templates_from(services: Services, images: Sequence[UploadFile],
                          identity_id: str | None = None) -> _NewTemplates:
    """Prepare and embed the uploads by the enrolment policy, review them
    (``server.review``, FACEGATE_ENROL_REVIEW); 422 if none is usable."""
    results = await _prepare_uploads(services, images)
    prepared = [r for r in results if isinstance(r, PreparedFace)]
    faces: dict[int, schemas.FaceInfo] = {}
    reasons: dict[int, schemas.ErrorDetail] = {
        i: schemas.ErrorDetail(code=r.code, message=r.message)
        for i, r in enumerate(results) if isinstance(r, FacegateError)}
    kept: list[int] = []
    if prepared:
        embeddings, stability, _ = await services.embed_with_stability(
            np.stack([p.crop for p in prepared]))
        rows = [i for i, r in enumerate(results) if isinstance(r, PreparedFace)]
        refusals = await review_photos(services, identity_id, prepared, embeddings, stability)
        for row, (i, p, stable, refusal) in enumerate(zip(rows, prepared, stability, refusals,
                                                          strict=True)):
            faces[i] = face_info(services.quality_model, p, float(stable))
            if refusal is None:
                kept.append(row)
            else:
                reasons[i] = schemas.ErrorDetail(code=refusal.code,
                                                 message=f"image {i}: {refusal.message}")
    report = [
        schemas.ImageResult(index=i, filename=upload.filename, accepted=i not in reasons,
                            face=faces.get(i), reason=reasons.get(i))
        for i, upload in enumerate(images)
    ]
    if not kept:
        listed = "; ".join(f"{r.message} ({r.code})" for r in reasons.values())
        raise NoUsableImage(f"no usable image: {listed}")
    accepted = [prepared[row] for row in kept]
    stored = {
        "sources": [item.filename for item in report if item.accepted],
        "scores": [p.face.score for p in accepted],
        "crops": np.stack([p.crop for p in accepted]) if services.settings.keep_crops else None,
    }
    return _NewTemplates(report, embeddings[kept], stored)


def _check_identity_id(identity_id: str | None) -> None:
    if identity_id is not None and not re.match(IDENTITY_ID_PATTERN, identity_id):
        raise InvalidRequest(
            "identity_id must be 1-128 characters of A-Z a-z 0-9 . _ : - and not '.' or '..' "
            "(which URL paths normalise away)"
        )


def _exists(gallery: Any, identity_id: str) -> bool:
    """Whether the id is taken; an unreachable gallery is 503 here, before any photo is
    processed (not a "no" that spends the photos' time and then fails anyway)."""
    try:
        gallery.get_identity(identity_id)
    except UnknownIdentity:
        return False
    return True


def _enrolled(services: Services, identity: Identity, new: _NewTemplates
              ) -> schemas.EnrolResponse:
    """The enrolment's answer: the identity, each photo's outcome, the threshold a
    verify against it now uses (it follows the template count) and the review's advice."""
    point = services.thresholds.identity(len(identity.templates))
    settings = services.settings
    return schemas.EnrolResponse(
        identity=identity_info(identity), images=new.report, templates=len(identity.templates),
        threshold=point.threshold, target_far=point.target,
        review=advice(settings.enrol_review, new.refused(), len(identity.templates),
                      settings.enrol_target_photos),
    )


@router.post(
    "",
    status_code=201,
    response_model=schemas.EnrolResponse,
    dependencies=enroller,
    summary="Enrol an identity from one or more photos",
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
    settings = services.settings
    meta = parse_metadata(
        metadata, max_bytes=settings.max_metadata_bytes, max_depth=settings.max_metadata_depth
    )
    if identity_id is not None and await services.gallery.call(lambda g: _exists(g, identity_id)):
        raise DuplicateIdentity(f"identity {identity_id!r} already exists")
    new = await _templates_from(services, images, identity_id)
    identity = await services.gallery.call(
        lambda g: g.create_identity(
            identity_id, name=name, metadata=meta, embeddings=new.embeddings, **new.stored
        )
    )
    new.attach([t.template_id for t in identity.templates])
    await services.refresh_gallery_size()
    return _enrolled(services, identity, new)


@router.post(
    "/{identity_id}/templates",
    status_code=201,
    response_model=schemas.EnrolResponse,
    dependencies=enroller,
    summary="Add photos to an enrolled identity",
)
async def add_templates(
    services: ServicesDep,
    identity_id: str,
    images: Annotated[list[UploadFile], File(description="one or more photos")],
) -> schemas.EnrolResponse:
    await services.gallery.call(lambda g: g.get_identity(identity_id))  # 404 before work
    new = await _templates_from(services, images, identity_id)
    templates = await services.gallery.call(
        lambda g: g.add_templates(identity_id, new.embeddings, **new.stored)
    )
    new.attach([t.template_id for t in templates])
    identity = await services.gallery.call(lambda g: g.get_identity(identity_id))
    await services.refresh_gallery_size()
    return _enrolled(services, identity, new)


@router.get(
    "", response_model=schemas.IdentityList, dependencies=reader,
    summary="List enrolled identities (paginated)",
)
async def list_identities(
    services: ServicesDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> schemas.IdentityList:
    identities, total = await services.gallery.call(
        lambda g: g.list_identities(offset=offset, limit=limit)
    )
    return schemas.IdentityList(
        identities=[identity_info(i) for i in identities], total=total, offset=offset, limit=limit
    )


@router.get(
    "/{identity_id}", response_model=schemas.IdentityInfo, dependencies=reader,
    summary="One identity and its templates",
)
async def get_identity(services: ServicesDep, identity_id: str) -> schemas.IdentityInfo:
    return identity_info(await services.gallery.call(lambda g: g.get_identity(identity_id)))


@router.delete(
    "/{identity_id}",
    response_model=schemas.Deleted,
    dependencies=admin,
    summary="Delete an identity and all its templates",
)
async def delete_identity(services: ServicesDep, identity_id: str) -> schemas.Deleted:
    await services.gallery.call(lambda g: g.delete_identity(identity_id))
    await services.refresh_gallery_size()
    return schemas.Deleted(identity_id=identity_id)


@router.delete(
    "/{identity_id}/templates/{template_id}",
    response_model=schemas.Deleted,
    dependencies=admin,
    summary="Delete one template of an identity",
)
async def delete_template(services: ServicesDep, identity_id: str, template_id: str) -> schemas.Deleted:
    await services.gallery.call(lambda g: g.delete_template(identity_id, template_id))
    await services.refresh_gallery_size()
    return schemas.Deleted(identity_id=identity_id, template_id=template_id)

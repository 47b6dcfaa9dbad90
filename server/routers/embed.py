"""Embeddings: ``POST /v1/embed`` turns a photo into the served model's embeddings, so an
integrator can keep photos out of this service: verify and search take such an
embedding in place of a photo (``routers.probes``), refused with 409 when another model
made it.
"""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from facegate.server import schemas
from facegate.server.deps import ServicesDep
from facegate.server.quality import face_info
from facegate.server.routers.common import ms, prepare_every_face, sum_timings, v1_router
from facegate.server.routers.probes import embed_probes
from fastapi import File, Form, UploadFile

router = v1_router(tags=["embeddings"])


@router.post(
    "/embed",
    response_model=schemas.EmbedResponse,
    summary="The embeddings of the faces in a photo",
)
async def embed(
    services: ServicesDep,
    image: Annotated[UploadFile, File(description="a photo")],
    all_faces: Annotated[
        bool,
        Form(
            description="every face (the largest FACEGATE_MAX_FACES_PER_IMAGE, largest first) "
            "instead of the one the face policy selects"
        ),
    ] = False,
) -> schemas.EmbedResponse:
    """The face the server's face policy selects (the largest, or with
    `FACEGATE_FACE_POLICY=strict` the only one), embedded by the served model; with
    `all_faces=true`, each face of the photo, largest first (`faces_in_image` says how many
    were found when more than the limit). Send a vector back with `model_id` to verify or
    search without sending the photo."""
    start = time.perf_counter()
    data = await image.read()
    if all_faces:
        prepared = await prepare_every_face(
            services, data, "image", max_faces=services.settings.max_faces_per_image
        )
        vectors, stability, embed_s = await services.embed_with_stability(
            np.stack([p.crop for p in prepared]))
        faces = [face_info(services.quality_model, p, float(stable))
                 for p, stable in zip(prepared, stability, strict=True)]
        timings = {stage: ms(s) for stage, s in sum_timings(prepared).items()}
        timings["embed"] = ms(embed_s)
    else:
        embedded = await embed_probes(services, [("image", data)])
        vectors, faces, timings = embedded.vectors, embedded.faces, embedded.timings_ms
    return schemas.EmbedResponse(
        model_id=services.bundle.model_id,
        embedding_size=services.bundle.embedding_size,
        faces=[
            schemas.EmbeddedFace(**face.model_dump(), embedding=vector.tolist())
            for face, vector in zip(faces, vectors, strict=True)
            if face is not None
        ],
        timings_ms=schemas.Timings(**timings, total=ms(time.perf_counter() - start)),
    )

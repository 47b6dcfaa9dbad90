"""What the routes that take a photo or an embedding (a *probe*) share: reading a JSON
or multipart body through the same pydantic models, documenting such a body in OpenAPI,
and turning probes into unit vectors of the served model.

An embedding travels with the id of the model that made it (``schemas.Embedding``):
vectors of different models are not comparable, so a foreign one is refused (409
``model_mismatch``) instead of yielding a meaningless similarity.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from facegate.core.errors import FacegateError, ImageDecodeError, ModelMismatch
from facegate.server import schemas
from facegate.server.errors import InvalidRequest, UnsupportedBody
from facegate.server.pipeline import PreparedFace
from facegate.server.quality import face_info, min_probe_quality, probe_verdict
from facegate.server.routers.common import ms, prepare_all, sum_timings
from facegate.server.services import Services
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

M = TypeVar("M", bound=BaseModel)
Probe = bytes | schemas.Embedding  # a photo file's bytes, or a client's embedding


@dataclass(frozen=True)
class EmbeddedProbes:
    vectors: np.ndarray  # (n, D) float32 unit rows, in the probes' order
    faces: list[schemas.FaceInfo | None]  # None where the probe was an embedding
    timings_ms: dict[str, float]  # decode, detect, align (summed over photos) and embed
    quality: schemas.ProbeQuality  # whether the photos are good enough to decide on


def unit_vector(services: Services, embedding: schemas.Embedding, label: str) -> np.ndarray:
    """``embedding`` as a unit float32 vector: 409 when another model made it, 422 for a
    wrong length or a zero vector (non-finite values already fail the schema)."""
    served = services.bundle.model_id
    if embedding.model_id != served:
        raise ModelMismatch(
            f"{label}: made by model {embedding.model_id!r}, but this server compares "
            f"{served!r} embeddings; embed the photo again with POST /v1/embed"
        )
    vector = np.asarray(embedding.vector, np.float64)
    size = services.bundle.embedding_size
    if vector.shape != (size,):
        raise InvalidRequest(f"{label}: the vector has {vector.size} values; {served} makes {size}")
    peak = np.abs(vector).max()
    if peak == 0:
        raise InvalidRequest(f"{label}: the vector has zero norm")
    vector /= peak  # scaled first, so the squares neither overflow nor underflow
    return (vector / np.linalg.norm(vector)).astype(np.float32)


async def embed_probes(services: Services, probes: Sequence[tuple[str, Probe]]) -> EmbeddedProbes:
    """Unit vectors of ``(label, probe)`` pairs. Sent embeddings are checked first, so a bad
    one costs no detection; the photos are prepared concurrently and embedded in one batch."""
    vectors: list[np.ndarray | None] = [
        unit_vector(services, p, label) if isinstance(p, schemas.Embedding) else None
        for label, p in probes
    ]
    photos = [(i, label, p) for i, (label, p) in enumerate(probes) if isinstance(p, bytes)]
    results = await prepare_all(services, [(label, data) for _, label, data in photos])
    failures = [r for r in results if isinstance(r, FacegateError)]
    if failures:
        raise failures[0]
    prepared: list[PreparedFace] = results  # type: ignore[assignment]
    faces: list[schemas.FaceInfo | None] = [None] * len(probes)
    embed_s = 0.0
    if prepared:
        embeddings, stability, embed_s = await services.embed_with_stability(
            np.stack([p.crop for p in prepared]))
        for (i, _, _), face, embedding, stable in zip(photos, prepared, embeddings, stability,
                                                      strict=True):
            vectors[i] = embedding
            faces[i] = face_info(services.quality_model, face, float(stable))
    timings = {stage: ms(s) for stage, s in sum_timings(prepared).items()}
    cut = min_probe_quality(services.quality_model, services.settings.probe_min_quality)
    return EmbeddedProbes(np.stack(vectors), faces, {**timings, "embed": ms(embed_s)},
                          probe_verdict(faces, cut))


def _decode_b64(value: str, label: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"{label}: not valid base64") from None


def json_probe(
    image_b64: str | None, embedding: schemas.Embedding | None, side: str = ""
) -> tuple[str, Probe]:
    """The labelled probe of a JSON body (whose validator demands exactly one of the two)."""
    if image_b64 is not None:
        return f"image{side}", _decode_b64(image_b64, f"image{side}")
    assert embedding is not None
    return f"embedding{side}", embedding


def _validated(model: type[M], data: bytes | dict[str, Any]) -> M:
    """``model`` from JSON bytes or form values; errors are the usual 422 validation_error."""
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


FormFields = dict[str, bytes | str]  # a multipart body: file fields as bytes, the others as text


async def json_or_form(request: Request, model: type[M]) -> M | FormFields:
    """The body as ``model`` (JSON) or as its multipart fields; 415 for any other type.
    The uploads are read and their spooled files closed here."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        return _validated(model, await request.body())
    if content_type.startswith("multipart/form-data"):
        async with request.form() as form:
            return {
                name: await value.read() if isinstance(value, StarletteUploadFile) else value
                for name, value in form.multi_items()
            }
    raise UnsupportedBody("send multipart/form-data or application/json")


def form_options(form: FormFields, model: type[M]) -> M:
    """``model`` from the form's fields of its names (an empty field counts as absent), so a
    multipart option obeys the same rules as its JSON twin."""
    values = {name: form[name] for name in model.model_fields if form.get(name) not in (None, "")}
    return _validated(model, values)


def form_image(form: FormFields, field: str) -> bytes:
    image = form.get(field)
    if not isinstance(image, bytes):
        raise InvalidRequest(f"multipart field {field!r} must be an image file")
    return image


def conflicts(*cases: str) -> dict[int | str, dict[str, Any]]:
    """The documented 409 answers of a route."""
    return {409: {"model": schemas.ErrorResponse, "description": "; ".join(cases)}}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` inlined: inside an OpenAPI document a ``$ref`` resolves
    from the document's root, where pydantic's ``#/$defs/...`` would not be found."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


def request_body_openapi(
    files: Sequence[str], options: type[BaseModel], json_model: type[BaseModel]
) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself: multipart (``files`` plus
    the fields of ``options``) or JSON (``json_model``, with its examples)."""
    fields = options.model_json_schema()
    multipart = {
        "type": "object",
        "required": [*files, *fields.get("required", [])],
        "properties": {
            **{name: {"type": "string", "format": "binary"} for name in files},
            **fields["properties"],
        },
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": _inline_refs(json_model.model_json_schema())},
            },
        }
    }

"""Typed request and response bodies of the /v1 API (pydantic only, so the client reuses them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(examples=["no_face"])
    message: str = Field(examples=["no face found in image1"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FaceInfo(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in image pixels", examples=[[52.0, 61.0, 148.0, 157.0]])
    score: float = Field(description="detector confidence")
    landmarks: list[list[float]] = Field(description="5 points (x, y): eyes, nose, mouth corners")
    faces_in_image: int = Field(description="faces the detector found; the largest was used")


class Timings(BaseModel):
    """Milliseconds; decode/detect/align summed over the request's images."""

    decode: float
    detect: float
    align: float
    embed: float
    total: float


class VerifyJSON(BaseModel):
    """JSON form of POST /v1/verify (the multipart form has files image1, image2)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"image1_b64": "/9j/4AAQ...", "image2_b64": "/9j/4AAQ..."}]}
    )

    image1_b64: str = Field(description="base64 of the first image file (JPEG, PNG, WebP, BMP)")
    image2_b64: str = Field(description="base64 of the second image file")
    threshold: float | None = Field(
        None, ge=-1, le=1, description="override (only when the server allows it)"
    )


class VerifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "match": True,
                    "similarity": 0.71,
                    "threshold": 0.35,
                    "threshold_source": "uss",
                    "faces": [],
                    "timings_ms": {"decode": 3.1, "detect": 40.2, "align": 0.4, "embed": 21.0, "total": 66.0},
                }
            ]
        }
    )

    match: bool
    similarity: float = Field(description="cosine similarity of the two embeddings")
    threshold: float
    threshold_source: str = Field(description="where the threshold came from (bundle or request)")
    faces: list[FaceInfo]
    timings_ms: Timings


class TemplateInfo(BaseModel):
    template_id: str
    source: str | None = None
    score: float | None = None
    created_at: float | None = Field(None, description="Unix time")


class IdentityInfo(BaseModel):
    identity_id: str
    name: str | None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float | None = Field(None, description="Unix time")
    templates: list[TemplateInfo] = Field(default_factory=list)


class ImageResult(BaseModel):
    """What became of one uploaded image: a template, or the reason it was rejected."""

    index: int
    filename: str | None = None
    accepted: bool
    template_id: str | None = None
    face: FaceInfo | None = None
    reason: ErrorDetail | None = None


class EnrolResponse(BaseModel):
    identity: IdentityInfo
    images: list[ImageResult]


class IdentityList(BaseModel):
    identities: list[IdentityInfo]
    total: int
    offset: int
    limit: int


class Deleted(BaseModel):
    deleted: bool = True
    identity_id: str
    template_id: str | None = None


class Candidate(BaseModel):
    identity_id: str
    name: str | None
    similarity: float
    match: bool = Field(description="similarity >= threshold")


class SearchResponse(BaseModel):
    decision: Literal["match", "no_match"]
    match: Candidate | None = Field(description="the best candidate if it passes the threshold, else null")
    candidates: list[Candidate] = Field(description="best first")
    threshold: float
    face: FaceInfo
    timings_ms: dict[str, float]


class VerifyIdentityResponse(BaseModel):
    match: bool
    identity_id: str
    similarity: float = Field(description="max over the identity's templates")
    similarities: list[float] = Field(description="one per template, in template order")
    threshold: float
    threshold_source: str
    face: FaceInfo
    timings_ms: dict[str, float]


class ObservedDecisions(BaseModel):
    count: int = Field(description="verify/identity decisions recorded for this identity")
    accept_rate: float | None
    mean_similarity: float | None


class IdentityConsistency(BaseModel):
    """One identity, from its enrolled templates: genuine = own pairs, impostor = vs others."""

    genuine_pairs: int
    impostor_pairs: int
    genuine_mean: float | None
    genuine_std: float | None
    impostor_mean: float | None
    impostor_std: float | None
    frr: float | None = Field(description="share of genuine pairs below the threshold")
    far: float | None = Field(description="share of impostor pairs at or above the threshold")
    own_threshold: float | None = Field(description="threshold giving this identity the target FAR")
    threshold_gap: float | None = Field(description="own_threshold - threshold")
    observed: ObservedDecisions


class WorstIdentity(IdentityConsistency):
    identity_id: str


class ConsistencyResponse(BaseModel):
    """How well one threshold serves every enrolled identity (see docs/server.md)."""

    threshold: float
    target_far: float
    identities: int
    opis_identities: int = Field(description="identities with genuine and impostor pairs")
    opis: float | None = Field(description="operating-point inconsistency score; lower is better")
    epsilon_opis: float | None
    opis_epsilon: float
    opis_range: list[float]
    opis_points: int
    utility: str
    per_identity: dict[str, IdentityConsistency]
    worst: list[WorstIdentity] = Field(description="largest |threshold_gap| first")


class Ready(BaseModel):
    ready: bool
    model_id: str | None = None
    runtime: str | None = None
    detector: str | None = None
    gallery: bool = False
    identities: int | None = None
    templates: int | None = None

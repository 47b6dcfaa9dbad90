"""Typed request and response bodies of the /v1 API (pydantic only, so the client reuses them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# One rule for a threshold override in every body type (multipart and JSON).
Threshold = Annotated[
    float,
    Field(
        ge=-1,
        le=1,
        allow_inf_nan=False,
        description="override of the accept threshold: finite, in [-1, 1] (only when the "
        "server allows overrides, else 403)",
    ),
]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["no_face"])
    message: str = Field(examples=["no face found in image1"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FaceQuality(BaseModel):
    """How likely the face is to be falsely rejected (core.quality, docs/server.md)."""

    score: float = Field(description="1 - the bundle's estimate of the share of this face's "
                         "genuine comparisons that fall below the served threshold; in [0, 1]")
    components: dict[str, float] = Field(
        description="the same estimate from one signal each: size, sharpness, brightness, "
        "pose, stability (the face against its mirror image)")


class FaceInfo(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in image pixels", examples=[[52.0, 61.0, 148.0, 157.0]])
    score: float = Field(description="detector confidence")
    landmarks: list[list[float]] = Field(description="5 points (x, y): eyes, nose, mouth corners")
    faces_in_image: int = Field(description="faces the detector found in the photo")
    stage: str | None = Field(None, description="detector step that found it: hog0, hog1, mmod")
    quality: FaceQuality | None = Field(
        None, description="recognition quality; null when the bundle has no quality model")


class ProbeQuality(BaseModel):
    """Whether the probe photos are good enough to decide on reliably."""

    sufficient: bool = Field(description="false: a probe's quality is below min_quality, so "
                             "the decision is unreliable (retake the photo), whatever it says")
    score: float | None = Field(description="the lowest probe photo's quality; null for embeddings")
    min_quality: float | None = Field(description="the operator's cut-off "
                                      "(FACEGATE_PROBE_MIN_QUALITY); null when off")


class Timings(BaseModel):
    """Milliseconds; decode/detect/align summed over the request's images."""

    decode: float
    detect: float
    align: float
    embed: float
    total: float


_EMBEDDING = {
    "model_id": "facegate-default@2026.11.23#00640158a069",
    "vector": [0.031, -0.104, 0.087],
}


class Embedding(BaseModel):
    """A face embedding and the model that made it: only the same model's vectors compare."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EMBEDDING]})

    model_id: str = Field(min_length=1, description="the model_id POST /v1/embed answered")
    vector: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        min_length=1, description="embedding_size finite values; the server L2-normalises them"
    )


def _one_of(body: BaseModel, image: str, embedding: str) -> None:
    if (getattr(body, image) is None) == (getattr(body, embedding) is None):
        raise ValueError(f"send exactly one of {image!r} and {embedding!r}")


class ThresholdOption(BaseModel):
    threshold: Threshold | None = None


class VerifyJSON(ThresholdOption):
    """JSON form of POST /v1/verify: each side a photo (base64) or an embedding."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"image1_b64": "/9j/4AAQ...", "image2_b64": "/9j/4AAQ..."},
                {"embedding1": _EMBEDDING, "image2_b64": "/9j/4AAQ..."},
            ]
        }
    )

    image1_b64: str | None = Field(
        None, description="base64 of the first image file (JPEG, PNG, WebP, BMP)"
    )
    embedding1: Embedding | None = Field(None, description="instead of image1_b64")
    image2_b64: str | None = Field(None, description="base64 of the second image file")
    embedding2: Embedding | None = Field(None, description="instead of image2_b64")

    @model_validator(mode="after")
    def _one_per_side(self) -> VerifyJSON:
        _one_of(self, "image1_b64", "embedding1")
        _one_of(self, "image2_b64", "embedding2")
        return self


class ProbeJSON(BaseModel):
    """The probe of a JSON body: a photo (base64) or an embedding."""

    image_b64: str | None = Field(None, description="base64 of an image file")
    embedding: Embedding | None = Field(None, description="instead of image_b64")

    @model_validator(mode="after")
    def _one_probe(self) -> ProbeJSON:
        _one_of(self, "image_b64", "embedding")
        return self


class SearchOptions(BaseModel):
    k: int = Field(5, ge=1, le=100, description="identities to return")
    decide: bool = Field(
        True, description="false: investigation mode, the k best candidates with their "
        "estimated FPIR and no match decision"
    )


class SearchJSON(ProbeJSON, SearchOptions):
    """JSON form of POST /v1/search (the multipart form has file image and field k)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"embedding": _EMBEDDING, "k": 5}]}
    )


class VerifyIdentityOptions(BaseModel):
    identity_id: str = Field(min_length=1, description="an enrolled identity")


class VerifyIdentityJSON(ProbeJSON, VerifyIdentityOptions):
    """JSON form of POST /v1/verify/identity (the multipart form has image and identity_id)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"identity_id": "alice", "embedding": _EMBEDDING}]}
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
    threshold_source: str = Field(
        description="where the threshold came from: the bundle's provenance (its learned "
        "threshold), error-model (at target_far), operator or request"
    )
    target_far: float | None = Field(description="the false-accept rate the threshold holds, "
                                     "when it was chosen for one")
    estimated_far: float | None = Field(
        description="share of impostor pairs that score at least this similarity, by the "
        "bundle's error model (null without one)"
    )
    faces: list[FaceInfo | None] = Field(
        description="one per side, in order; null for a side sent as an embedding"
    )
    probe_quality: ProbeQuality | None = Field(
        None, description="whether the probe photos were good enough to decide reliably")
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


class EnrolReview(BaseModel):
    """What enrolment review (FACEGATE_ENROL_REVIEW) made of the photos."""

    mode: Literal["off", "standard", "strict"]
    refused: int = Field(description="photos refused in this request (each says why)")
    more_photos: int = Field(description="good photos still to take: the identity has fewer "
                             "than FACEGATE_ENROL_TARGET_PHOTOS accepted templates")
    advice: str | None = Field(description="what to do next, for the person enrolling")


class EnrolResponse(BaseModel):
    identity: IdentityInfo
    images: list[ImageResult]
    review: EnrolReview | None = None
    templates: int = Field(description="the identity's templates now")
    threshold: float = Field(description="verify-against-identity threshold at that count")
    target_far: float | None = Field(description="the false-accept rate it holds")


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
    match: bool | None = Field(description="similarity >= threshold; null in investigation mode")
    estimated_fpir: float | None = Field(
        None, description="share of people not enrolled whose best score in this gallery "
        "reaches this similarity (error model; null without one)"
    )


class GallerySize(BaseModel):
    """The gallery a search was decided against (its threshold follows its size)."""

    identities: int
    templates: int


class SearchResponse(BaseModel):
    decision: Literal["match", "no_match", "not_decided"] = Field(
        description="not_decided: investigation mode (decide=false), candidates only"
    )
    match: Candidate | None = Field(description="the best candidate if it passes the threshold, else null")
    candidates: list[Candidate] = Field(description="best first")
    threshold: float | None = Field(description="open-set threshold for this gallery's size; "
                                    "null in investigation mode")
    threshold_source: str | None
    target_fpir: float | None = Field(description="the false-positive identification rate the "
                                      "threshold holds (share of unknown people 'found')")
    estimated_fpir: float | None = Field(description="estimated FPIR of the best candidate's "
                                         "similarity in this gallery")
    gallery: GallerySize
    face: FaceInfo | None = Field(description="the probe's face; null when it was an embedding")
    probe_quality: ProbeQuality | None = Field(
        None, description="whether the probe photos were good enough to decide reliably")
    timings_ms: dict[str, float]


class VerifyIdentityResponse(BaseModel):
    match: bool
    identity_id: str
    similarity: float = Field(description="max over the identity's templates")
    similarities: list[float] = Field(description="one per template, in template order")
    templates: int = Field(description="templates compared (the threshold follows this count)")
    threshold: float
    threshold_source: str
    target_far: float | None = Field(description="the false-accept rate the threshold holds at "
                                     "this template count")
    estimated_far: float | None = Field(
        description="share of impostors that score at least this similarity against an "
        "identity with this many templates (error model; null without one)"
    )
    face: FaceInfo | None = Field(description="the probe's face; null when it was an embedding")
    probe_quality: ProbeQuality | None = Field(
        None, description="whether the probe photos were good enough to decide reliably")
    timings_ms: dict[str, float]


class EmbeddedFace(FaceInfo):
    embedding: list[float] = Field(description="L2-normalised", examples=[_EMBEDDING["vector"]])


class EmbedResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": _EMBEDDING["model_id"],
                    "embedding_size": 128,
                    "faces": [
                        {
                            "box": [52.0, 61.0, 148.0, 157.0],
                            "score": 1.2,
                            "landmarks": [
                                [80.1, 95.3], [120.4, 94.8], [100.2, 118.0],
                                [84.5, 138.2], [116.0, 137.7],
                            ],
                            "faces_in_image": 1,
                            "embedding": _EMBEDDING["vector"],
                        }
                    ],
                    "timings_ms": {
                        "decode": 3.1, "detect": 40.2, "align": 0.4, "embed": 9.8, "total": 54.0
                    },
                }
            ]
        }
    )

    model_id: str = Field(description="send it back with a vector (as an Embedding) to compare it")
    embedding_size: int
    faces: list[EmbeddedFace] = Field(description="the face the server's face policy selects")
    timings_ms: Timings

    def embedding(self, face: int = 0) -> Embedding:
        """One face's embedding as the verify and search bodies take it."""
        return Embedding(model_id=self.model_id, vector=self.faces[face].embedding)


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


class QuarantinedTemplate(BaseModel):
    """A stored template whose vector failed the checks: never indexed, never compared."""

    identity_id: str
    template_id: str
    reason: str = Field(description="what is wrong with the stored vector")


class OperatingPointInfo(BaseModel):
    threshold: float
    source: str = Field(description="the bundle's provenance, error-model or operator")
    target: float | None = Field(description="the error rate the threshold holds")


class PairPoint(OperatingPointInfo):
    estimated_far: float | None


class IdentityPoint(OperatingPointInfo):
    templates: int
    identities: int = Field(description="enrolled identities with this many templates")


class SearchPoint(OperatingPointInfo):
    identities: int
    templates: int
    estimated_fpir: float | None


class OperatingPoints(BaseModel):
    """The thresholds in force: each question gets the one that holds its target rate."""

    pair: PairPoint
    identity: list[IdentityPoint]
    search: SearchPoint


class ConsistencyResponse(BaseModel):
    """How well one threshold serves every enrolled identity (see docs/server.md)."""

    operating_points: OperatingPoints

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
    quarantined: list[QuarantinedTemplate] = Field(
        default_factory=list, description="stored templates left out of the report and of "
        "every comparison because their vector is damaged (not finite, wrong size, not unit norm)",
    )


class Ready(BaseModel):
    ready: bool
    model_id: str | None = None
    runtime: str | None = None
    detector: str | None = None
    gallery: bool = False
    identities: int | None = None
    templates: int | None = None

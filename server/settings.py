"""Server settings, read once from ``FACEGATE_*`` environment variables (pydantic-settings).

One typed object instead of scattered ``os.environ`` look-ups, so the CLI, the tests
and a container all configure the server the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Everything an operator may tune; defaults serve ``models/default`` on CPU."""

    model_config = SettingsConfigDict(env_prefix="FACEGATE_", extra="ignore")

    bundle: Path = Field(Path("models/default"), description="model bundle folder")
    allow_unsealed: bool = Field(
        False, description="serve a bundle whose manifest has no seal (written before seals "
        "existed), with a warning; its decision settings are then unchecked (docs/export.md)",
    )
    trusted_keys: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="comma-separated Ed25519 public key PEM files; when "
        "set, only bundles signed by one of them are served (`facegate bundle sign`)",
    )
    gallery: Path | str = Field(
        Path("var/gallery.sqlite"), description="gallery: a SQLite file (one process), or a "
        "postgresql://user:password@host:port/db URL shared by replicas (docs/deploy.md)",
    )
    gallery_pool_size: int = Field(
        5, ge=2, le=100, description="PostgreSQL gallery: connections per replica (gallery "
        "threads + 1 for catching up; a LISTEN connection comes on top)",
    )
    gallery_timeout_s: float = Field(
        2.0, gt=0, le=60, description="PostgreSQL gallery: the most one use of the database "
        "may take, waiting for a connection included (statement_timeout, and a client-side "
        "cut for a database that answers nothing); past it 503 gallery_unavailable",
    )
    api_key: str | None = Field(None, description="X-API-Key required on /v1 when set")
    admin_key: str | None = Field(
        None, description="X-Admin-Key required to enrol and delete when set"
    )
    api_key_scopes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["verify"], description="comma-separated scopes of "
        "FACEGATE_API_KEY (verify, enrol, admin, metrics); verify only by default, so one "
        "shared key cannot enrol or delete (docs/server.md, keys and scopes)",
    )
    master_key: SecretStr | None = Field(
        None, description="base64 AES-256 key sealing the gallery at rest (prefer master_key_file)"
    )
    master_key_file: Path | None = Field(
        None, description="file of base64 AES-256 keys, one a line: the first seals, the others "
        "only open (rotation: `facegate gallery rotate-key`); never beside the gallery",
    )
    key_tree_file: Path | None = Field(
        None, description="writable key tree (`facegate gallery new-key-tree`): a delete "
        "punctures it, so every copy of the deleted identity's key is unreadable at once; "
        "one copy per replica",
    )
    retention_decisions_days: float | None = Field(
        None, gt=0, description="delete live decision records older than this (unset: keep)"
    )
    retention_crops_days: float | None = Field(
        None, gt=0, description="drop kept crops older than this (their templates stay)"
    )
    retention_audit_days: float | None = Field(
        None, gt=0, description="delete audit records older than this (unset: keep)"
    )
    retention_interval_s: float = Field(3600.0, gt=0, description="how often retention runs")
    keys_file: Path | None = Field(
        None, description="named keys with scopes, stored hashed (`facegate keys create`)"
    )
    auth_failure_limit: int = Field(
        20, ge=1, description="failed authentications from one client within "
        "auth_failure_window_s before it gets 429 for auth_lockout_s",
    )
    auth_failure_window_s: float = Field(60.0, gt=0)
    auth_lockout_s: float = Field(60.0, gt=0)
    max_connections: int = Field(
        1000, ge=1, description="open connections plus requests in progress; above it "
        "503 too_many_connections at once",
    )
    metrics_require_key: bool = Field(
        False, description="/metrics needs a key with the metrics scope"
    )
    metrics_identity_ids: bool = Field(
        False, description="label the worst identities' FRR/FAR gauges with their ids "
        "(personal data; by default they are labelled by rank)",
    )
    detector: Literal["dlib", "scrfd"] = "dlib"
    detector_model: Path | None = Field(None, description="SCRFD ONNX file (detector=scrfd)")
    detector_upsample: int = Field(1, ge=0, le=3, description="dlib upsampling steps")
    detector_boxes: Literal["hog", "mmod", "hog+mmod"] = Field(
        "hog+mmod", description="detector=dlib: HOG, dlib's MMOD CNN (ONNX Runtime), or HOG at "
        "upsampling 0 up to detector_upsample and the CNN where HOG finds no face (finds a face "
        "in 99.5% of the shared CelebA photos vs HOG's 95.7%, in less time; docs/mmod.md)",
    )
    detector_landmarks: Literal["auto", "5", "68"] = Field(
        "auto", description="dlib shape predictor: 5-point (public domain) or 68-point (trained "
        "on iBUG 300-W, whose licence excludes commercial use); auto: 5-point for dlib-chip "
        "bundles, 68-point for ArcFace-template bundles (trained on crops from measured "
        "68-point landmarks; see core.face.landmarks_for)",
    )
    face_policy: Literal["largest", "strict"] = Field(
        "largest", description="verify and search: largest face, or reject images with several faces"
    )
    enrol_face_policy: Literal["largest", "strict"] = Field(
        "strict", description="enrolment: exactly one face per photo (strict), or the largest "
        "(whose face gets enrolled from a group photo is otherwise a guess)",
    )
    max_images_per_request: int = Field(16, ge=1, description="photos per enrolment request")
    enrol_review: Literal["off", "standard", "strict"] = Field(
        "off", description="enrolment review (docs/server.md): standard refuses photos with a "
        "face too small, of low quality or in an extreme pose; strict also refuses an identity "
        "conflict (a photo nearer another enrolled identity than its own, or that would make "
        "two identities one person); off takes every photo with one face",
    )
    enrol_target_photos: int = Field(3, ge=1, description="good photos an identity should "
                                     "have; enrolment answers how many more to take")
    probe_min_quality: float | None = Field(
        None, ge=0, le=1, description="verify and search flag a probe photo scored below this "
        "as too poor to decide (probe_quality.sufficient=false); default: the score of the "
        "bundle's worst 2% of calibration photos; 0: never",
    )
    max_faces_per_image: int = Field(
        16, ge=1, description="POST /v1/embed with all_faces: the largest faces embedded per photo"
    )
    max_metadata_bytes: int = Field(
        16_384, ge=2, le=1_048_576, description="identity metadata, as JSON"
    )
    max_metadata_depth: int = Field(8, ge=1, le=64, description="nesting of identity metadata")
    runtime: str = Field("auto", description="embedder runtime: auto|tensorrt|onnxruntime-cuda|onnxruntime-cpu")
    max_image_bytes: int = Field(10_000_000, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0, description="refused above (from the header)")
    max_detect_pixels: int = Field(
        4_000_000, gt=0, description="larger images are decoded at reduced scale (JPEG draft) "
        "or downscaled before detection"
    )
    heavy_decode_slots: int = Field(
        2, ge=1, description="images over max_detect_pixels decoded and detected at once "
        "(bounds peak memory)"
    )
    detect_budget_s: float = Field(
        2.5, gt=0, description="seconds of decode and detection per photo: the CNN is skipped in "
        "large photos past it, and at 4x it the search down to the minimum face stops with 503 "
        "work_budget_exceeded (docs/pipeline.md)",
    )
    client_workers: int | None = Field(
        None, ge=1, description="cpu_workers one client (its authenticated key, else address) may hold at "
        "once; default cpu_workers - 1 (at least 1)",
    )
    queue_timeout_s: float = Field(
        120.0, gt=0, description="a photo waiting longer for a worker is answered 503 busy"
    )
    header_timeout_s: float = Field(10.0, gt=0, description="close a connection whose request "
                                    "headers take longer")
    shutdown_timeout_s: float = Field(
        10.0, gt=0, le=600, description="on SIGTERM: how long requests in flight may take to "
        "finish; then they are answered 503 shutting_down, and the process is gone within "
        "3 s more (docs/server.md)",
    )
    body_timeout_s: float = Field(30.0, gt=0, description="answer 408 when a request body "
                                  "takes longer to arrive")
    max_request_bytes: int = Field(25_000_000, gt=0, description="whole request body limit")
    threshold: float | None = Field(
        None, gt=-1.0, lt=1.0,
        description="one threshold for every decision (1:1, verify against an identity, search) "
        "instead of the bundle's learned one and its error model's; responses then say "
        "threshold_source 'operator'",
    )
    flip: bool = Field(
        True, description="embed each crop plus its mirror image (as training validation and "
        "facegate evaluate do, so served decisions match the reported figures); with a "
        "quality model the mirror is embedded either way (its stability signal)"
    )
    allow_threshold_override: bool = False
    batching: bool = Field(True, description="micro-batch embeddings across requests")
    batch_max_size: int = Field(32, ge=1)
    batch_max_wait_ms: float = Field(0.0, ge=0)
    cpu_workers: int = Field(4, ge=1, description="threads (or processes) for decode/detect/align")
    detect_processes: bool = Field(
        False, description="decode/detect/align in cpu_workers processes instead of threads: "
        "dlib's detectors hold Python's GIL, so threads share one core; processes use them "
        "all, each with its own models and memory (docs/server.md)",
    )
    index: str = Field(
        "auto", description="FAISS index of the gallery: flat, ivf, hnsw, or auto (exact flat "
        "up to 50,000 templates, then IVF tuned on real embeddings; docs/gallery.md)",
    )
    index_file: Path | None = Field(
        None, description="file of the IVF index's trained centroids, so a restart skips "
        "k-means (docs/gallery.md): default <gallery>.ivf beside a SQLite gallery; a "
        "PostgreSQL replica keeps one only where this names a local path",
    )
    keep_crops: bool = Field(False, description="store aligned crops with templates")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated allowed origins; empty = CORS off"
    )
    target_far: float = Field(
        0.01, gt=0, lt=1, description="false-accept rate that verify-against-identity holds at "
        "every template count (the bundle's error model gives the threshold), also 1:1 when set "
        "explicitly (else 1:1 uses the bundle's learned threshold), and the consistency report's",
    )
    target_fpir: float = Field(
        0.01, gt=0, lt=1, description="false-positive identification rate that search holds at "
        "the gallery's current size: the share of people not enrolled who would be 'found'",
    )
    metrics_worst_n: int = Field(10, ge=0, description="identities exported as FRR/FAR gauges")

    @field_validator("api_key_scopes", mode="before")
    @classmethod
    def _split_scopes(cls, value: object) -> object:
        if isinstance(value, str):
            return [scope.strip() for scope in value.split(",") if scope.strip()]
        return value

    @field_validator("gallery", mode="before")
    @classmethod
    def _gallery_location(cls, value: object) -> object:
        """A postgresql:// URL stays a string (a Path would fold its '//'); else a Path."""
        if isinstance(value, str) and not value.startswith(("postgresql://", "postgres://")):
            return Path(value)
        return value

    @field_validator("cors_origins", "trusted_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

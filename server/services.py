"""The long-lived parts the lifespan builds once: bundle, embedder, detector pool, gallery.

The gallery (SQLite file or PostgreSQL URL, ``FACEGATE_GALLERY``) is thread-safe and
its calls block (disk or network), so :class:`GalleryWorker` runs them on a small
dedicated pool: off the event loop, and never starved by the detector threads.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from facegate.core.align import Geometry
from facegate.core.bundle import Bundle, load_bundle
from facegate.core.detect import create_detector
from facegate.core.embed import Embedder, create_embedder, embed_with_stability
from facegate.core.face import landmarks_for
from facegate.core.quality import QualityModel
from facegate.core.seal import RESEAL_HINT, BundleSealError
from facegate.gallery.crypto import gallery_sealer
from facegate.gallery.pg_follow import GalleryUnavailable
from facegate.gallery.protocol import GalleryStore, is_postgres_url, open_gallery
from facegate.server.batching import MicroBatcher
from facegate.server.metrics import ServerMetrics
from facegate.server.pipeline import FacePipeline, map_large_allocations
from facegate.server.settings import Settings
from facegate.server.thresholds import Thresholds

T = TypeVar("T")
log = logging.getLogger(__name__)


class GalleryWorker:
    """Owns a :class:`GalleryStore`; ``await worker.call(fn)`` runs ``fn(gallery)`` on its pool."""

    def __init__(self, opener: Callable[[], GalleryStore], *, workers: int = 4) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gallery")
        # Health probes get their own thread, one at a time: they never queue behind
        # requests, and never pile up on a database that does not answer.
        self._probe_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gallery-probe")
        self._probe: asyncio.Future | None = None
        self._opener = opener
        self.gallery: GalleryStore | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.gallery = await loop.run_in_executor(self._executor, self._opener)

    async def call(self, fn: Callable[[GalleryStore], T]) -> T:
        gallery = self.gallery
        assert gallery is not None, "gallery is not open"
        loop = asyncio.get_running_loop()
        # In the caller's context: the store records which key asked (gallery.audit.CALLER).
        future = loop.run_in_executor(self._executor, contextvars.copy_context().run, fn, gallery)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Cancelled (shutdown past its graceful timeout) during a gallery call: the call
            # is never abandoned halfway, or a write could commit under a 503. It ends within
            # its own deadline; its request then goes on and answers what it did.
            await asyncio.wait([future])
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return future.result()

    async def probe(self, timeout_s: float) -> dict[str, Any] | None:
        """The gallery's stats if it answers within ``timeout_s``, else None. A probe still
        running is awaited rather than doubled; its own deadline (the PostgreSQL gallery's
        ``timeout_s``) ends it."""
        gallery = self.gallery
        if gallery is None:
            return None
        if self._probe is None or self._probe.done():
            probe = asyncio.get_running_loop().run_in_executor(self._probe_executor, gallery.stats)
            probe.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
            self._probe = probe
        try:
            return await asyncio.wait_for(asyncio.shield(self._probe), timeout_s)
        except (TimeoutError, GalleryUnavailable):
            return None

    async def close(self) -> None:
        if self.gallery is not None:
            gallery, self.gallery = self.gallery, None
            await asyncio.get_running_loop().run_in_executor(self._executor, gallery.close)
        self._executor.shutdown(wait=True)
        self._probe_executor.shutdown(wait=False)


@dataclass
class Services:
    settings: Settings
    bundle: Bundle
    embedder: Embedder
    pipeline: FacePipeline
    batcher: MicroBatcher
    gallery: GalleryWorker
    metrics: ServerMetrics

    @cached_property
    def thresholds(self) -> Thresholds:
        """The threshold of each question (pair, identity of n templates, gallery search)."""
        return Thresholds(self.bundle, self.settings)

    @property
    def threshold(self) -> float:
        """The 1:1 pair threshold (``thresholds.pair()``)."""
        return self.thresholds.pair().threshold

    async def embed(self, crops: np.ndarray) -> tuple[np.ndarray, float]:
        """L2-normalised embeddings of ``crops`` and the seconds spent waiting for them."""
        embeddings, _, seconds = await self.embed_with_stability(crops)
        return embeddings, seconds

    async def embed_with_stability(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Embeddings, each crop's stability (``core.quality``) and the seconds waited."""
        t0 = time.perf_counter()
        stacked = await self.batcher.embed(crops)
        seconds = time.perf_counter() - t0
        self.metrics.stage.labels("embed").observe(seconds)
        return np.ascontiguousarray(stacked[:, :-1]), stacked[:, -1].copy(), seconds

    @cached_property
    def quality_model(self) -> QualityModel | None:
        """The bundle's face-quality model (``core.quality``); None without one."""
        return self.bundle.quality_model

    async def refresh_gallery_size(self) -> dict[str, Any]:
        """Gallery stats, also exported as gauges; {} while the gallery database is down
        (a committed write must not turn into an error because its metrics refresh failed)."""
        try:
            stats = await self.gallery.call(lambda g: g.stats())
        except GalleryUnavailable:
            return {}
        self.record_gallery_size(stats)
        return stats

    def watch_thresholds(self) -> None:
        """Export the thresholds in force, read at each scrape (search's follows the
        gallery's size, also when another replica enrols)."""
        thresholds = self.thresholds

        def search() -> float:
            gallery = self.gallery.gallery
            return thresholds.search(gallery.composition() if gallery else {}).threshold

        self.metrics.watch_thresholds(
            pair=lambda: thresholds.pair().threshold, search=search,
            identity=lambda n: thresholds.identity(n).threshold,
        )

    def record_gallery_size(self, stats: dict[str, Any]) -> None:
        self.metrics.set_gallery_size(
            int(stats.get("identities", 0)), int(stats.get("templates", 0)),
            int(stats.get("quarantined_templates", 0)),
        )


def _detector_factory(settings: Settings, geometry: Geometry) -> Callable[[], Any]:
    """A picklable detector maker (worker processes build their own detector from it)."""
    if settings.detector == "scrfd":
        return partial(create_detector, "scrfd", path=settings.detector_model)
    landmarks = landmarks_for(geometry, settings.detector_landmarks)
    return partial(
        create_detector, "dlib", upsample=settings.detector_upsample,
        boxes=settings.detector_boxes, landmarks=landmarks,
    )


def load_served_bundle(settings: Settings) -> Bundle:
    """The bundle to serve, or ``BundleError``: files and seal checked (``load_bundle``), an
    unsealed one only with ``allow_unsealed``, and with ``trusted_keys`` a signature by one."""
    bundle = load_bundle(settings.bundle)
    if settings.trusted_keys:
        from facegate.core.signing import load_public_keys, verify_signature

        signer = verify_signature(bundle.signature, bundle.digest,
                                  load_public_keys(settings.trusted_keys), str(bundle.path))
        log.info("bundle %s signed by trusted key %s", bundle.model_id, signer)
    elif not bundle.sealed:
        if not settings.allow_unsealed:
            raise BundleSealError(
                f"{bundle.path}: manifest.json has no seal, so an edit to its threshold or "
                f"geometry would go unnoticed. {RESEAL_HINT} To serve it unchecked anyway, "
                "set FACEGATE_ALLOW_UNSEALED=true."
            )
        log.warning("SERVING AN UNSEALED BUNDLE %s (FACEGATE_ALLOW_UNSEALED): its decision "
                    "settings are not checked; seal it with `facegate bundle seal`", bundle.path)
    return bundle


async def start_services(settings: Settings, metrics: ServerMetrics) -> Services:
    """Load everything once; raises BundleError for a missing, tampered or untrusted bundle."""
    loop = asyncio.get_running_loop()
    bundle = await loop.run_in_executor(None, load_served_bundle, settings)
    embedder = await loop.run_in_executor(
        None, lambda: create_embedder(bundle, runtime=settings.runtime, flip=settings.flip)
    )
    map_large_allocations()  # decoded images' memory back to the OS when freed (pipeline.py)
    pipeline = FacePipeline(
        _detector_factory(settings, bundle.geometry),
        geometry=bundle.geometry,
        policy=settings.face_policy,
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        max_detect_pixels=settings.max_detect_pixels,
        heavy_decode_slots=settings.heavy_decode_slots,
        workers=settings.cpu_workers,
        processes=settings.detect_processes,
        detect_budget_s=settings.detect_budget_s,
        client_workers=settings.client_workers,
        queue_timeout_s=settings.queue_timeout_s,
    )
    await pipeline.warm_up()
    batcher = MicroBatcher(
        partial(_embed_stacked, embedder),
        max_batch=settings.batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        enabled=settings.batching,
        on_batch=metrics.batch_size.observe,
    )
    await batcher.start()
    size = bundle.geometry.size
    await batcher.embed(np.zeros((1, size, size, 3), np.uint8))  # warm the runtime
    if not is_postgres_url(settings.gallery):
        Path(settings.gallery).parent.mkdir(parents=True, exist_ok=True)
    gallery = GalleryWorker(
        lambda: open_gallery(
            settings.gallery,
            model_id=bundle.model_id,
            embedding_size=bundle.embedding_size,
            index=settings.index,
            index_file=settings.index_file,
            keep_crops=settings.keep_crops,
            geometry=bundle.geometry,
            pool_size=settings.gallery_pool_size,
            timeout_s=settings.gallery_timeout_s,
            sealer=gallery_sealer(settings),
        ),
        workers=max(1, settings.gallery_pool_size - 1),
    )
    await gallery.open()
    services = Services(settings, bundle, embedder, pipeline, batcher, gallery, metrics)
    await services.refresh_gallery_size()
    services.watch_thresholds()
    return services


def _embed_stacked(embedder: Embedder, crops: np.ndarray) -> np.ndarray:
    """(N, D + 1): the embeddings and, last, each crop's stability, in one array so the
    micro-batcher hands each request its rows of both."""
    vectors, stability = embed_with_stability(embedder, crops)
    return np.column_stack([vectors, stability.astype(np.float32)])


async def stop_services(services: Services) -> None:
    await services.batcher.stop()
    services.pipeline.close()
    await services.gallery.close()

"""Runs the core face path (decode -> detect -> select -> align) off the event loop.

:func:`facegate.core.face.prepare_face` does the work, with the geometry of the loaded
bundle, so a served crop is the crop training made. The steps are CPU-bound, so
:class:`FacePipeline` runs them on a bounded thread pool, never on the event loop.
Each worker thread owns its own detector, because the dlib and SCRFD detectors are
not documented as safe to share between threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from facegate.core.align import Geometry
from facegate.core.detect import Detector
from facegate.core.face import PreparedFace, prepare_face

__all__ = ["FacePipeline", "PreparedFace", "prepare_face"]


class FacePipeline:
    """Runs :func:`prepare_face` on ``workers`` threads, each with its own detector,
    cropping by ``geometry`` (the bundle's)."""

    def __init__(
        self,
        make_detector: Callable[[], Detector],
        *,
        geometry: Geometry,
        policy: str,
        max_bytes: int,
        max_pixels: int,
        workers: int = 4,
    ) -> None:
        self._make_detector = make_detector
        self._local = threading.local()
        self.geometry = geometry
        self.policy = policy
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="face")

    def _detector(self) -> Detector:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = self._make_detector()
        return detector

    def _prepare(self, data: bytes, policy: str) -> PreparedFace:
        return prepare_face(
            data,
            self._detector(),
            self.geometry,
            policy=policy,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
        )

    async def prepare(self, data: bytes, *, policy: str | None = None) -> PreparedFace:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._prepare, data, policy or self.policy)

    async def warm_up(self) -> None:
        """Create a detector and run it once, so the first request does not pay for it."""
        loop = asyncio.get_running_loop()
        blank = np.zeros((64, 64, 3), np.uint8)
        await loop.run_in_executor(self._executor, lambda: self._detector().detect(blank))

    def close(self) -> None:
        self._executor.shutdown(wait=True)

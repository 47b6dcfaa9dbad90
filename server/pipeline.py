"""Runs the core face path (decode -> detect -> select -> align) off the event loop.

:func:`facegate.core.face.prepare_face` does the work, with the geometry of the loaded
bundle, so a served crop is the crop training made. The steps are CPU-bound, so
:class:`FacePipeline` runs them on a bounded thread pool, never on the event loop.
Each worker thread owns its own detector, because the dlib and SCRFD detectors are
not documented as safe to share between threads. Photos over ``max_detect_pixels``
are decoded at reduced scale, and at most ``heavy_decode_slots`` of them at a time:
a PNG of 100 KB can hold 36 M pixels (150 MB decoded), so without the bound a burst
of such uploads multiplies the server's memory by the worker count.
"""

from __future__ import annotations

import asyncio
import ctypes
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from facegate.core.align import Geometry
from facegate.core.detect import Detector
from facegate.core.face import PreparedFace, prepare_face, prepare_faces

__all__ = ["FacePipeline", "PreparedFace", "map_large_allocations"]

# mallopt's parameter number for the mmap threshold (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Give each allocation of ``threshold`` bytes or more its own mmap (glibc), so a
    decoded image's memory goes back to the OS when it is freed. False where it cannot
    be set (another C library).

    glibc otherwise raises its mmap threshold to the largest block freed so far (up to
    32 MB); image buffers then come from per-thread arenas, which keep their pages, so
    each decode worker holds on to the largest images it has decoded whatever the
    number of heavy-decode slots (tests/test_memory_budget.py measures the difference).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))


class FacePipeline:
    """Runs :func:`prepare_face` on ``workers`` threads, each with its own detector,
    cropping by ``geometry`` (the bundle's); ``heavy_decode_slots`` of them at most
    decode a photo over ``max_detect_pixels`` at once."""

    def __init__(
        self,
        make_detector: Callable[[], Detector],
        *,
        geometry: Geometry,
        policy: str,
        max_bytes: int,
        max_pixels: int,
        max_detect_pixels: int | None = None,
        heavy_decode_slots: int = 2,
        workers: int = 4,
    ) -> None:
        self._make_detector = make_detector
        self._local = threading.local()
        self.geometry = geometry
        self.policy = policy
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_detect_pixels = max_detect_pixels
        self._heavy_decodes = threading.BoundedSemaphore(heavy_decode_slots)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="face")

    def _detector(self) -> Detector:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = self._make_detector()
        return detector

    def _limits(self) -> dict:
        return {
            "max_bytes": self.max_bytes,
            "max_pixels": self.max_pixels,
            "max_detect_pixels": self.max_detect_pixels,
            "decode_slot": self._heavy_decodes,
        }

    def _prepare(self, data: bytes, policy: str) -> PreparedFace:
        return prepare_face(data, self._detector(), self.geometry, policy=policy, **self._limits())

    def _prepare_every_face(self, data: bytes, max_faces: int) -> list[PreparedFace]:
        return prepare_faces(data, self._detector(), self.geometry, max_faces=max_faces, **self._limits())

    async def prepare(self, data: bytes, *, policy: str | None = None) -> PreparedFace:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._prepare, data, policy or self.policy)

    async def prepare_every_face(self, data: bytes, *, max_faces: int) -> list[PreparedFace]:
        """Each face of the photo, largest first, ``max_faces`` at most (``prepare_faces``)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._prepare_every_face, data, max_faces)

    async def warm_up(self) -> None:
        """Create a detector and run it once, so the first request does not pay for it."""
        loop = asyncio.get_running_loop()
        blank = np.zeros((64, 64, 3), np.uint8)
        await loop.run_in_executor(self._executor, lambda: self._detector().detect(blank))

    def close(self) -> None:
        self._executor.shutdown(wait=True)

"""From uploaded bytes to an aligned face: decode -> detect -> select -> align.

The steps are CPU-bound, so :class:`FacePipeline` runs them on a bounded thread pool,
never on the event loop. Each worker thread owns its own detector, because the dlib
and SCRFD detectors are not documented as safe to share between threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from facegate.core.align import align
from facegate.core.detect import Detector, Face, select_face
from facegate.core.image import decode


@dataclass(frozen=True)
class PreparedFace:
    """One image's chosen face, its aligned crop and what each step cost (seconds)."""

    face: Face
    faces_in_image: int
    crop: np.ndarray
    timings: dict[str, float]

    def face_dict(self) -> dict:
        return {**self.face.to_dict(), "faces_in_image": self.faces_in_image}


def prepare_face(
    data: bytes,
    detector: Detector,
    *,
    policy: str = "largest",
    max_bytes: int = 10_000_000,
    max_pixels: int = 40_000_000,
) -> PreparedFace:
    """Decode, detect, select one face by ``policy`` and align it (raises FacegateError)."""
    t0 = time.perf_counter()
    image = decode(data, max_bytes=max_bytes, max_pixels=max_pixels)
    t1 = time.perf_counter()
    faces = detector.detect(image)
    face = select_face(faces, policy=policy)
    t2 = time.perf_counter()
    crop = align(image, face.landmarks)
    t3 = time.perf_counter()
    return PreparedFace(
        face=face,
        faces_in_image=len(faces),
        crop=crop,
        timings={"decode": t1 - t0, "detect": t2 - t1, "align": t3 - t2},
    )


class FacePipeline:
    """Runs :func:`prepare_face` on ``workers`` threads, each with its own detector."""

    def __init__(
        self,
        make_detector: Callable[[], Detector],
        *,
        policy: str,
        max_bytes: int,
        max_pixels: int,
        workers: int = 4,
    ) -> None:
        self._make_detector = make_detector
        self._local = threading.local()
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

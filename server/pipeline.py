"""Runs the core face path (decode -> detect -> select -> align) off the event loop.

:func:`facegate.core.face.prepare_face` does the work, with the geometry of the loaded
bundle, so a served crop is the crop training made. The steps are CPU-bound, so
:class:`FacePipeline` runs them on a bounded thread pool, never on the event loop.
Each worker thread owns its own detector, because the dlib and SCRFD detectors are
not documented as safe to share between threads. Photos over ``max_detect_pixels``
are decoded at reduced scale, and at most ``heavy_decode_slots`` of them at a time:
a PNG of 100 KB can hold 36 M pixels (150 MB decoded), so without the bound a burst
of such uploads multiplies the server's memory by the worker count; a heavy photo
holds its slot for its whole decode and detection (``core.plan``).
Photos are admitted to the workers by a :class:`~facegate.server.fair.FairGate`, so one
client's uploads cannot take every worker.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import platform
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from facegate.core.align import Geometry
from facegate.core.detect import Detector
from facegate.core.face import DEFAULT_DETECT_BUDGET_S, PreparedFace, prepare_face, prepare_faces
from facegate.core.plan import warm_up as warm_up_band_helper
from facegate.gallery.audit import CALLER
from facegate.server.fair import CLIENT, FairGate, client_key

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


@dataclass(frozen=True)
class _Job:
    """What a worker needs to prepare faces; picklable, so worker processes get it too."""

    make_detector: Callable[[], Detector]  # a module-level function or a partial of one
    geometry: Geometry
    max_bytes: int
    max_pixels: int
    max_detect_pixels: int | None
    detect_budget_s: float = DEFAULT_DETECT_BUDGET_S


_worker = threading.local()  # per worker thread, or the one thread of a worker process


def _start_worker(job: _Job, heavy_decodes: Any, own_process: bool) -> None:
    _worker.job, _worker.heavy_decodes, _worker.detector = job, heavy_decodes, None
    if own_process:
        map_large_allocations()


def _detector() -> Detector:
    if _worker.detector is None:
        _worker.detector = _worker.job.make_detector()
    return _worker.detector


def _limits() -> dict[str, Any]:
    job = _worker.job
    return {"max_bytes": job.max_bytes, "max_pixels": job.max_pixels,
            "max_detect_pixels": job.max_detect_pixels, "decode_slot": _worker.heavy_decodes,
            "detect_budget_s": job.detect_budget_s}


def _prepare(data: bytes, policy: str) -> PreparedFace:
    return prepare_face(data, _detector(), _worker.job.geometry, policy=policy, **_limits())


def _prepare_every_face(data: bytes, max_faces: int) -> list[PreparedFace]:
    return prepare_faces(data, _detector(), _worker.job.geometry, max_faces=max_faces, **_limits())


def _warm_up() -> None:
    _detector().detect(np.zeros((64, 64, 3), np.uint8))
    warm_up_band_helper()  # core.plan's helper thread for banded scans, and its detector


class FacePipeline:
    """Runs :func:`prepare_face` on ``workers`` threads, or with ``processes`` on that many
    worker processes, each with its own detector, cropping by ``geometry`` (the
    bundle's); ``heavy_decode_slots`` of them at most decode a photo over
    ``max_detect_pixels`` at once. Photos wait their turn per client (``client_workers``
    of the workers at most for one client, ``queue_timeout_s`` at most in the queue:
    :class:`~facegate.server.fair.FairGate`); each has ``detect_budget_s`` of detection.

    Why processes: dlib's detectors and shape predictors hold Python's GIL while they
    run, so detector threads take turns on one core (two threads detected 0.66x as fast
    as one: ``python -m bench.gil``, docs/server.md). Worker processes use every core, at the price of their
    own memory (models and decode buffers per process) and a start-up of a few seconds.
    ``make_detector`` must then be picklable (a module-level function or a partial).
    """

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
        processes: bool = False,
        detect_budget_s: float = DEFAULT_DETECT_BUDGET_S,
        client_workers: int | None = None,
        queue_timeout_s: float = 120.0,
    ) -> None:
        self.geometry = geometry
        self.policy = policy
        self.workers = workers
        self.gate = FairGate(workers, client_workers or max(1, workers - 1), queue_timeout_s)
        job = _Job(make_detector, geometry, max_bytes, max_pixels, max_detect_pixels, detect_budget_s)
        self._executor: Executor
        if processes:
            context = multiprocessing.get_context("spawn")  # no fork of a threaded server
            self._executor = ProcessPoolExecutor(
                max_workers=workers, mp_context=context, initializer=_start_worker,
                initargs=(job, context.BoundedSemaphore(heavy_decode_slots), True),
            )
        else:
            self._executor = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="face", initializer=_start_worker,
                initargs=(job, threading.BoundedSemaphore(heavy_decode_slots), False),
            )

    async def prepare(self, data: bytes, *, policy: str | None = None) -> PreparedFace:
        loop = asyncio.get_running_loop()
        async with self.gate.slot(client_key(CALLER.get(), CLIENT.get())):
            return await loop.run_in_executor(self._executor, _prepare, data, policy or self.policy)

    async def prepare_every_face(self, data: bytes, *, max_faces: int) -> list[PreparedFace]:
        """Each face of the photo, largest first, ``max_faces`` at most (``prepare_faces``)."""
        loop = asyncio.get_running_loop()
        async with self.gate.slot(client_key(CALLER.get(), CLIENT.get())):
            return await loop.run_in_executor(self._executor, _prepare_every_face, data, max_faces)

    async def warm_up(self) -> None:
        """Start every worker and run its detector once, so requests do not pay for it."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, _warm_up) for _ in range(self.workers))
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)

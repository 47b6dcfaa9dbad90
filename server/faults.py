"""Storage and resource faults answered for what they are, not as 500s.

A full disk (SQLite's SQLITE_FULL, PostgreSQL's disk_full, ``ENOSPC``/``EDQUOT``) is 507
``storage_full``: nothing was written (every write is one transaction, rolled back),
retry once space is freed. Exhausted file descriptors (``EMFILE``/``ENFILE``) are 503
``resources_exhausted``. Each kind is counted in ``facegate_storage_faults_total`` and
logged at most once a minute (a fault that repeats per request must not fill the disk
with tracebacks). Anything else goes on to the 500 of ``RequestContextMiddleware``.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time

from facegate.core.errors import FacegateError
from facegate.gallery.pg_follow import GalleryUnavailable
from facegate.server.errors import error_response
from facegate.server.metrics import ServerMetrics
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("facegate.server")
LOG_EVERY_S = 60.0


class StorageFull(FacegateError):
    code = "storage_full"
    status = 507


class ResourcesExhausted(FacegateError):
    code = "resources_exhausted"
    status = 503


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlstate", None) == "53100"  # psycopg: disk_full


def storage_fault(exc: BaseException) -> FacegateError | None:
    """The fault ``exc`` (or an exception it was raised from) stands for, if any."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if _is_disk_full(seen):
            return StorageFull("the gallery's storage is full; nothing was written. Free space "
                               "and retry (reads and verifications still answer)")
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return ResourcesExhausted("the server is out of file descriptors; retry shortly")
        seen = seen.__cause__ or seen.__context__
    return None


def install_fault_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    last_logged: dict[str, float] = {}

    def answer(exc: BaseException) -> JSONResponse:
        fault = storage_fault(exc)
        if fault is None:
            raise exc
        metrics.storage_faults.labels(fault.code).inc()
        if time.monotonic() - last_logged.get(fault.code, -LOG_EVERY_S) >= LOG_EVERY_S:
            last_logged[fault.code] = time.monotonic()
            log.error("%s: %s (logged at most once a minute; see facegate_storage_faults_total)",
                      fault.code, exc)
        return error_response(fault.status, fault.code, fault.message)

    async def handle(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, FacegateError) and storage_fault(exc) is None:
            return error_response(exc.status, exc.code, exc.message)
        return answer(exc)

    for kind in (sqlite3.Error, OSError, GalleryUnavailable):
        app.add_exception_handler(kind, handle)

"""The retention loop: every ``retention_interval_s`` (and once at start) it purges live
decision records, kept crops and audit records older than their configured ages
(``FACEGATE_RETENTION_*_DAYS``; unset keeps them for ever). Counted in
``facegate_retention_purged_total{what}``; a failed purge is logged and retried next time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from facegate.gallery.retention import purge
from facegate.server.audit import AuditTrail
from facegate.server.metrics import ServerMetrics
from facegate.server.services import GalleryWorker
from facegate.server.settings import Settings

log = logging.getLogger("facegate.server")
DAY_S = 86400.0


def _cut(now: float, days: float | None) -> float | None:
    return None if days is None else now - days * DAY_S


async def purge_once(settings: Settings, gallery: GalleryWorker, audit: AuditTrail,
                     metrics: ServerMetrics) -> dict[str, int]:
    now = time.time()
    decisions, crops = _cut(now, settings.retention_decisions_days), _cut(now, settings.retention_crops_days)
    done = await gallery.call(lambda g: purge(g, decisions_before=decisions, crops_before=crops))
    audit_cut = _cut(now, settings.retention_audit_days)
    if audit_cut is not None:
        done["audit"] = await audit.call("purge", older_than=audit_cut)
    for what, n in done.items():
        metrics.retention_purged.labels(what).inc(n)
    return done


async def retention_loop(settings: Settings, gallery: GalleryWorker, audit: AuditTrail,
                         metrics: ServerMetrics) -> None:
    if (settings.retention_decisions_days, settings.retention_crops_days,
            settings.retention_audit_days) == (None, None, None):
        return
    while True:
        try:
            done = await purge_once(settings, gallery, audit, metrics)
            if any(done.values()):
                log.info("retention purged %s", done)
        except Exception as e:  # the database down or full: the next round retries
            log.warning("retention purge failed (%s); retrying in %g s", e,
                        settings.retention_interval_s)
        await asyncio.sleep(settings.retention_interval_s)

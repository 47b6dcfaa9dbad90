"""Retention on real stores: decision records, kept crops and audit records older than
their configured age go (SQLite in-process, PostgreSQL on the real cluster, and the
server's own loop); younger ones and the templates stay."""

from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest
from facegate.core.align import ARCFACE_112
from facegate.gallery.retention import purge
from facegate.gallery.store import Gallery
from facegate.server.app import create_app
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from server_support import default_bundle

DAY = 86400.0


def fill(g, rng) -> None:
    v = rng.standard_normal((2, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    crops = rng.integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    g.create_identity("p", embeddings=v, crops=crops)
    for _ in range(3):
        g.record_decision("p", 0.9, True, "verify_identity")


def test_sqlite_purges_old_decisions_and_crops_only(tmp_path):
    path = tmp_path / "g.sqlite"
    with Gallery(path, model_id="m", embedding_size=8, keep_crops=True, geometry=ARCFACE_112) as g:
        fill(g, np.random.default_rng(0))
        with sqlite3.connect(path) as db:  # make one decision and one crop 40 days old
            db.execute("UPDATE decisions SET created_at = created_at - ? WHERE row_id ="
                       " (SELECT MIN(row_id) FROM decisions)", (40 * DAY,))
            db.execute("UPDATE templates SET created_at = created_at - ? WHERE row_id ="
                       " (SELECT MIN(row_id) FROM templates)", (40 * DAY,))
        now = time.time()
        done = purge(g, decisions_before=now - 30 * DAY, crops_before=now - 30 * DAY)
        assert done == {"decisions": 1, "crops": 1}
        assert len(g.decisions()["p"]) == 2
        assert len(g.get_identity("p").templates) == 2  # the template itself stays
        assert purge(g, decisions_before=None, crops_before=None) == {}
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(crop) FROM templates").fetchone() == (1,)


def test_postgres_purges_old_decisions_and_crops(single_threaded_faiss):
    from facegate.gallery.postgres import PostgresGallery
    from postgres_support import cluster

    url = cluster().create_database()
    with PostgresGallery(url, model_id="m", embedding_size=8, keep_crops=True,
                         geometry=ARCFACE_112, poll_s=0.5) as g:
        fill(g, np.random.default_rng(1))
        future = time.time() + 1
        assert purge(g, decisions_before=future, crops_before=future) == {"decisions": 3, "crops": 2}
        assert g.decisions() == {} and len(g.get_identity("p").templates) == 2


def test_the_server_purges_audit_records_past_their_age(tmp_path):
    settings = Settings(bundle=default_bundle(), gallery=tmp_path / "g.sqlite", cpu_workers=1,
                        retention_audit_days=1.5 / DAY, retention_interval_s=0.3)
    with TestClient(create_app(settings)) as c:
        for _ in range(3):
            c.get("/v1/identities")
        assert len(c.get("/v1/audit").json()["records"]) >= 3
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.5)
            kept = c.get("/v1/audit").json()["records"]
            if all(r["action"] != "list_identities" for r in kept):
                break
        else:
            pytest.fail("audit records older than the retention age were not purged")
        assert 'facegate_retention_purged_total{what="audit"}' in c.get("/metrics").text

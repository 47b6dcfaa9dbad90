"""Issue 23 on a real PostgreSQL server (tests/postgres_support.py): one audit trail shared
by replicas, and per-caller bounds on the live decisions."""

from __future__ import annotations

import time

import numpy as np
import pytest
from facegate.gallery.audit import CALLER, DECISIONS_PER_CALLER, AuditRecord, PostgresAudit
from facegate.gallery.postgres import PostgresGallery
from postgres_support import cluster

DIM = 8
pytestmark = pytest.mark.usefixtures("single_threaded_faiss")


@pytest.fixture
def url() -> str:
    return cluster().create_database()


def record(at: float, action: str, identity_id: str, key: str = "ops") -> AuditRecord:
    return AuditRecord(at, key, f"req-{action}", "127.0.0.1", "POST", "/v1/x", action,
                       identity_id, 200, "ok")


def test_replicas_write_and_read_one_audit_trail_and_purge_old_records(url):
    gallery = PostgresGallery(url, model_id="m", embedding_size=DIM, poll_s=0.5)  # makes the table
    a, b = PostgresAudit(url), PostgresAudit(url)
    try:
        now = time.time()
        a.append([record(now - 100 * 86400, "enrol", "p1"), record(now, "verify", "p1", "kiosk")])
        b.append([record(now + 1, "delete_identity", "p1")])
        assert [r.action for r in a.query(identity_id="p1")] == ["delete_identity", "verify", "enrol"]
        assert [r.key_name for r in b.query(key_name="kiosk")] == ["kiosk"]
        assert b.purge(now - 30 * 86400) == 1
        assert [r.action for r in a.query()] == ["delete_identity", "verify"]
    finally:
        a.close()
        b.close()
        gallery.close()


def test_one_caller_keeps_at_most_its_share_of_an_identitys_decisions(url):
    with PostgresGallery(url, model_id="m", embedding_size=DIM, poll_s=0.5) as g:
        v = np.zeros((1, DIM), np.float32)
        v[0, 0] = 1
        g.create_identity("p", embeddings=v)
        for caller, times in (("flood", 40), ("door", 3)):
            token = CALLER.set(caller)
            try:
                for _ in range(times):
                    g.record_decision("p", 0.5, caller == "door", "verify_identity")
            finally:
                CALLER.reset(token)
        assert len(g.decisions()["p"]) == DECISIONS_PER_CALLER + 3

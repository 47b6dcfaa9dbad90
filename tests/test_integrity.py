"""Stored vectors are checked where they are read (gallery/integrity.py): a planted x100,
NaN, infinite or short template is quarantined, never matched, never a 5xx, and reported.
Real SQLite files, the real app on real photos."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pytest
from facegate.gallery import Gallery, consistency_report
from facegate.gallery.integrity import (
    GalleryIntegrityError,
    QuarantinedTemplates,
    vector_problems,
)
from facegate.server.app import create_app
from facegate.server.settings import Settings
from fastapi.testclient import TestClient
from server_support import default_bundle, people

DIM = 16


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def plant(path: Path, identity_id: str, blob: bytes, model_id: str) -> str:
    """Write a template row behind the gallery's back, as anyone with the file could."""
    template_id = uuid.uuid4().hex
    with sqlite3.connect(path) as db:
        db.execute("INSERT OR IGNORE INTO identities(identity_id, name, metadata, created_at)"
                   " VALUES (?, ?, '{}', 0)", (identity_id, identity_id))
        db.execute("INSERT INTO templates(template_id, identity_id, model_id, dim, embedding,"
                   " created_at) VALUES (?, ?, ?, ?, ?, 0)",
                   (template_id, identity_id, model_id, len(blob) // 4, blob))
    return template_id


def test_vector_problems_names_each_fault():
    good = unit(np.random.default_rng(0), 1)[0]
    blobs = [good.tobytes(), (good * 100).tobytes(), np.full(DIM, np.nan, np.float32).tobytes(),
             np.full(DIM, np.inf, np.float32).tobytes(), good[:-1].tobytes()]
    vectors, problems = vector_problems(blobs, DIM)
    assert problems[0] is None and np.allclose(vectors[0], good)
    assert problems[1].startswith("norm 100")
    assert problems[2] == problems[3] == "not finite (NaN or infinity)"
    assert problems[4] == f"{4 * DIM - 4} bytes, expected {4 * DIM} ({DIM} float32)"


def test_planted_rows_are_quarantined_at_load_and_at_read(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "g.sqlite"
    honest = unit(rng, 3)
    with Gallery(path, model_id="m", embedding_size=DIM) as g:
        g.create_identity("honest", embeddings=honest)
    scaled = plant(path, "x100", (honest[0] * 100).tobytes(), "m")
    nan = plant(path, "nan", np.full(DIM, np.nan, np.float32).tobytes(), "m")
    with Gallery(path, model_id="m", embedding_size=DIM) as g:
        assert g.stats()["quarantined_templates"] == 2 and g.stats()["indexed_templates"] == 3
        hits = g.search(honest[0], k=5)
        assert [h.identity_id for h in hits] == ["honest"]
        for who in ("x100", "nan"):
            with pytest.raises(QuarantinedTemplates, match="quarantined"):
                g.identity_embeddings(who)
        # planted while open: the index never sees it, a read finds and records it
        late = plant(path, "honest", np.ones(DIM, np.float32).tobytes(), "m")
        assert len(g.identity_embeddings("honest")) == 3
        report = consistency_report(g, 0.5)
        reasons = {q["template_id"]: q["reason"] for q in report["quarantined"]}
        assert set(reasons) == {scaled, nan, late}
        assert reasons[scaled].startswith("norm 100") and report["identities"] == 1
        g.delete_identity("x100")
        assert scaled not in {q.template_id for q in g.quarantined()}


def test_a_failed_constraint_is_reported_as_what_it_is(tmp_path):
    with Gallery(tmp_path / "g.sqlite", model_id="m", embedding_size=DIM) as g:
        g.create_identity("a", embeddings=unit(np.random.default_rng(2), 1))
        with pytest.raises(GalleryIntegrityError, match="violates its own constraints"):
            g.record_decision("a", float("nan"), True, "verify_identity")  # NOT NULL, not FK


@pytest.fixture(scope="module")
def cast(celeba_index) -> dict[str, list[bytes]]:
    chosen = dict(list(people(celeba_index).items())[:2])
    return {who: [p.read_bytes() for p in paths[:2]] for who, paths in chosen.items()}


def test_planted_templates_never_match_and_never_5xx_on_the_server(tmp_path, cast):
    (alice, alice_photos), (_, bob_photos) = cast.items()
    path = tmp_path / "g.sqlite"
    settings = Settings(bundle=default_bundle(), gallery=path, cpu_workers=2)
    with TestClient(create_app(settings)) as c:
        enrolled = c.post("/v1/identities", data={"identity_id": alice, "name": alice},
                          files=[("images", ("a.jpg", alice_photos[0], "image/jpeg"))])
        assert enrolled.status_code == 201, enrolled.text
        model_id = c.get("/readyz").json()["model_id"]
        probe = c.post("/v1/embed", files=[("image", ("b.jpg", bob_photos[0], "image/jpeg"))])
        bob = np.asarray(probe.json()["faces"][0]["embedding"], np.float32)
    plant(path, "universal", (bob * 100).tobytes(), model_id)  # would score ~100 x cosine
    plant(path, "nan", np.full(len(bob), np.nan, np.float32).tobytes(), model_id)
    with TestClient(create_app(settings)) as c:
        photo = ("image", ("b.jpg", bob_photos[1], "image/jpeg"))
        found = c.post("/v1/search", data={"k": "5"}, files=[photo])
        assert found.status_code == 200, found.text
        assert found.json()["match"] is None
        assert {h["identity_id"] for h in found.json()["candidates"]} == {alice}
        for who in ("universal", "nan"):
            answer = c.post("/v1/verify/identity", data={"identity_id": who}, files=[photo])
            assert answer.status_code == 409, answer.text
            assert answer.json()["error"]["code"] == "templates_quarantined"
        report = c.get("/v1/consistency")
        assert report.status_code == 200, report.text
        assert {q["identity_id"] for q in report.json()["quarantined"]} == {"universal", "nan"}
        assert "facegate_gallery_quarantined_templates 2.0" in c.get("/metrics").text


def test_postgres_replicas_quarantine_planted_rows_and_name_integrity_errors(single_threaded_faiss):
    from facegate.gallery.postgres import PostgresGallery
    from postgres_support import cluster

    rng = np.random.default_rng(3)
    url = cluster().create_database()
    honest = unit(rng, 2)
    with PostgresGallery(url, model_id="m", embedding_size=DIM, poll_s=0.2) as g:
        g.create_identity("honest", embeddings=honest)
        with g._connection() as conn, conn.transaction():  # planted behind the replica's back
            conn.execute("INSERT INTO identities (identity_id, metadata, created_at)"
                         " VALUES ('x100', '{}', 0)")
            (row_id,) = conn.execute(
                "INSERT INTO templates (template_id, identity_id, model_id, dim, embedding,"
                " created_at) VALUES ('t-x100', 'x100', 'm', %s, %s, 0) RETURNING row_id",
                (DIM, (honest[0] * 100).tobytes())).fetchone()
            conn.execute("INSERT INTO changes (op, identity_id, row_id) VALUES"
                         " ('identity', 'x100', NULL), ('template', 'x100', %s)", (row_id,))
        g._follower.catch_up()  # the catch-up screens the row it reads
        assert [q.template_id for q in g.quarantined()] == ["t-x100"]
        assert [h.identity_id for h in g.search(honest[0], k=5)] == ["honest"]
        with pytest.raises(QuarantinedTemplates):
            g.identity_embeddings("x100")
        with PostgresGallery(url, model_id="m", embedding_size=DIM) as fresh:  # and the build
            assert fresh.stats()["quarantined_templates"] == 1
        with g._connection() as conn:
            conn.execute("ALTER TABLE decisions ADD CONSTRAINT sane CHECK (similarity <= 1)")
        with pytest.raises(GalleryIntegrityError, match="violates its own constraints"):
            g.record_decision("honest", 5.0, True, "verify_identity")

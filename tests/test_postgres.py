"""The PostgreSQL gallery on a real PostgreSQL server (tests/postgres_support.py): schema
migrations, the SQLite gallery's behaviour, two replicas (two PostgresGallery objects,
each with its own pool, listener and FAISS cache) kept current by the change sequence,
and a database restart."""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg
import pytest
from facegate.core.align import ARCFACE_112
from facegate.core.bundle import load_bundle
from facegate.core.errors import DuplicateIdentity, ModelMismatch, UnknownIdentity, UnknownTemplate
from facegate.gallery import consistency_report
from facegate.gallery.pg_follow import GalleryUnavailable
from facegate.gallery.pg_schema import SCHEMA_VERSION
from facegate.gallery.postgres import PostgresGallery
from facegate.gallery.protocol import open_gallery
from facegate.server.settings import Settings
from postgres_support import cluster
from server_support import default_bundle

from facegate.cli import main

DIM = 32
pytestmark = pytest.mark.usefixtures("single_threaded_faiss")


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def url() -> str:
    return cluster().create_database()


def open_replica(url: str, model_id: str = "m1", **kwargs) -> PostgresGallery:
    return PostgresGallery(url, model_id=model_id, embedding_size=DIM, poll_s=0.5, **kwargs)


def wait_for(predicate, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.005)
    return time.monotonic() - start


def indexed(g: PostgresGallery) -> set[str]:
    """Template ids in this replica's index cache."""
    return {template_id for _, template_id in dict(g._cache._rows).values()}


def test_migrations_run_once_when_replicas_start_together(url):
    galleries: list[PostgresGallery] = []
    errors: list[BaseException] = []

    def start():
        try:
            galleries.append(open_replica(url))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(galleries) == 4
    with psycopg.connect(url) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM facegate_migrations ORDER BY 1")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        conn.execute("INSERT INTO facegate_migrations (version, name) VALUES (%s, 'future')",
                     (SCHEMA_VERSION + 1,))
        conn.commit()
    for g in galleries:
        g.close()
    with pytest.raises(RuntimeError, match="newer than this facegate"):
        open_replica(url)


def test_behaves_like_the_sqlite_gallery(url):
    rng = np.random.default_rng(0)
    with open_gallery(url, model_id="m1", embedding_size=DIM, decisions_per_identity=3) as g:
        assert isinstance(g, PostgresGallery)
        a = g.create_identity("a", name="Ada", metadata={"team": ["x", 1.5]}, embeddings=unit(rng, 2),
                              sources=["one.jpg", "two.jpg"], scores=[0.9, None])
        with pytest.raises(DuplicateIdentity):
            g.create_identity("a", embeddings=unit(rng, 1))
        b = g.create_identity(None, embeddings=unit(rng, 1))
        added = g.add_templates("a", unit(rng, 1))
        with pytest.raises(UnknownIdentity):
            g.add_templates("nobody", unit(rng, 1))
        with pytest.raises(ValueError):
            g.create_identity("bad", embeddings=np.ones((1, DIM), np.float32))
        got = g.get_identity("a")
        assert (got.name, got.metadata) == ("Ada", {"team": ["x", 1.5]})
        assert [t.source for t in got.templates] == ["one.jpg", "two.jpg", None]
        page, total = g.list_identities(offset=0, limit=1)
        assert total == 2 and [i.identity_id for i in page] == ["a"]
        query = g.identity_embeddings("a")[0]
        hits = g.search(query, k=2)
        assert hits[0].identity_id == "a" and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert {h.identity_id for h in hits} == {"a", b.identity_id}
        # decisions: only the last 3 per identity are kept
        for i in range(5):
            g.record_decision("a", 0.1 * i, i % 2 == 0, "verify_identity")
        with pytest.raises(UnknownIdentity):
            g.record_decision("nobody", 0.5, True, "verify_identity")
        assert [s for s, _ in g.decisions()["a"]] == pytest.approx([0.2, 0.3, 0.4])
        report = consistency_report(g, 0.5)
        assert report["identities"] == 2 and report["per_identity"]["a"]["observed"]["count"] == 3
        with pytest.raises(UnknownTemplate):
            g.delete_template("a", "nope")
        g.delete_template("a", added[0].template_id)
        assert added[0].template_id not in indexed(g)
        g.delete_identity("a")
        with pytest.raises(UnknownIdentity):
            g.get_identity("a")
        assert [h.identity_id for h in g.search(query, k=2)] == [b.identity_id]
        assert g.decisions() == {}
        stats = g.stats()
        assert (stats["identities"], stats["templates"], stats["indexed_templates"]) == (1, 1, 1)
        assert a.templates and stats["backend"] == "postgresql" and g.ready


def test_writes_on_one_replica_reach_the_other(url):
    rng = np.random.default_rng(1)
    with open_replica(url) as a, open_replica(url) as b:
        vectors = unit(rng, 3)
        made = a.create_identity("p", name="P", embeddings=vectors)
        ids = {t.template_id for t in made.templates}
        assert ids <= indexed(a)  # the acknowledging replica has it at once
        wait_for(lambda: ids <= indexed(b), timeout=5)
        assert b.search(vectors[0], 1)[0].identity_id == "p"
        b.delete_template("p", made.templates[0].template_id)
        wait_for(lambda: made.templates[0].template_id not in indexed(a), timeout=5)
        a.delete_identity("p")
        wait_for(lambda: not b.search(vectors[1], 1), timeout=5)


def test_notifications_wake_the_other_replica_long_before_its_poll(url):
    rng = np.random.default_rng(8)
    with PostgresGallery(url, model_id="m1", embedding_size=DIM, poll_s=60) as a, \
            PostgresGallery(url, model_id="m1", embedding_size=DIM, poll_s=60) as b:
        time.sleep(0.5)  # both listeners are waiting in LISTEN
        made = a.create_identity("n", embeddings=unit(rng, 1))
        assert wait_for(lambda: made.templates[0].template_id in indexed(b), timeout=5) < 5


def test_catch_up_by_sequence_without_notifications(url):
    """A replica that heard nothing (follower stopped: as a dropped NOTIFY) catches up
    from the change sequence alone."""
    rng = np.random.default_rng(2)
    with open_replica(url) as a, open_replica(url) as b:
        b._follower.stop()
        keep = a.create_identity("keep", embeddings=unit(rng, 2))
        gone = a.create_identity("gone", embeddings=unit(rng, 1))
        a.delete_identity("gone")
        time.sleep(0.3)
        assert indexed(b) == set()
        assert b._follower.catch_up() > 0
        assert indexed(b) == {t.template_id for t in keep.templates}
        assert gone.templates[0].template_id not in indexed(b)
        assert b.applied_seq == a.applied_seq


def test_pruned_changes_make_a_lagging_replica_rebuild_not_miss_them(url):
    rng = np.random.default_rng(9)
    with open_replica(url) as a, open_replica(url) as b:
        b._follower.stop()  # b lags from here on
        first = a.create_identity("first", embeddings=unit(rng, 1))
        a.delete_identity("first")
        kept = a.create_identity("kept", embeddings=unit(rng, 2))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE changes SET created_at = created_at - interval '2 days'")
        assert a._follower.prune() > 0
        with psycopg.connect(url) as conn:
            (left,) = conn.execute("SELECT COUNT(*) FROM changes").fetchone()
        assert left == 1  # the newest change is always kept
        b._follower.catch_up()  # its next change was pruned: rebuild from the tables
        assert indexed(b) == {t.template_id for t in kept.templates}
        assert first.templates[0].template_id not in indexed(b)
        assert a._follower.catch_up() == 0 and indexed(a) == indexed(b)


def test_concurrent_writers_leave_every_replica_equal_to_the_database(url):
    rng = np.random.default_rng(3)
    vectors = unit(rng, 80)
    with open_replica(url) as a, open_replica(url) as b:
        def writer(g: PostgresGallery, prefix: str, rows: np.ndarray) -> None:
            for i, v in enumerate(rows):
                g.create_identity(f"{prefix}{i}", embeddings=v[None])
                if i % 3 == 0:
                    g.delete_identity(f"{prefix}{i}")

        threads = [
            threading.Thread(target=writer, args=(g, p, vectors[k::4]))
            for k, (g, p) in enumerate([(a, "a"), (b, "b"), (a, "c"), (b, "d")])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with psycopg.connect(url) as conn:
            truth = {t for (t,) in conn.execute("SELECT template_id FROM templates")}
        wait_for(lambda: indexed(a) == truth and indexed(b) == truth, timeout=10)
        assert len(truth) == 80 - sum(len(range(0, 20, 3)) for _ in range(4))


def test_database_restart(url):
    """Writes answer GalleryUnavailable while PostgreSQL is down (nothing half-written);
    the replicas reconnect, catch up and become ready again; every acknowledged template
    is still there."""
    rng = np.random.default_rng(4)
    db = cluster()
    with open_replica(url, timeout_s=1.0) as a, open_replica(url, timeout_s=1.0) as b:
        before_vectors = unit(rng, 2)
        before_vector = before_vectors[0]
        before = a.create_identity("before", embeddings=before_vectors)
        db.stop()
        try:
            with pytest.raises(GalleryUnavailable, match="unavailable"):
                a.create_identity("during", embeddings=unit(rng, 1))
            wait_for(lambda: not a.ready and not b.ready, timeout=10)
            assert len(a.search(before_vector, 1)) == 1  # search still answers from the cache
        finally:
            db.start()
        wait_for(lambda: a.ready and b.ready, timeout=20)
        after = b.create_identity("after", embeddings=unit(rng, 1))
        expected = {t.template_id for t in before.templates + after.templates}
        wait_for(lambda: indexed(a) == expected, timeout=10)
        with pytest.raises(UnknownIdentity):
            a.get_identity("during")


def test_model_change_and_reembed_run_once_for_all_replicas(url):
    rng = np.random.default_rng(5)
    crops = rng.integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    with open_replica(url, "m1", keep_crops=True, geometry=ARCFACE_112) as old:
        old.create_identity("k", embeddings=unit(rng, 2), crops=crops)
        old.create_identity("n", embeddings=unit(rng, 1))  # no kept crop: must re-enrol
    with open_replica(url, "m2", keep_crops=True, geometry=ARCFACE_112) as new, \
            open_replica(url, "m2", geometry=ARCFACE_112) as peer:
        with pytest.raises(ModelMismatch, match="reembed .*once"):
            peer.search(unit(rng, 1)[0])
        status = new.reembed_status()
        assert (status.reembeddable, status.without_crop) == (2, 1)
        fixed = unit(rng, 2)
        report = new.reembed(lambda batch: fixed[: len(batch)])
        assert (report.reembedded, report.without_crop, report.blocked_identities) == (2, 1, 1)
        wait_for(lambda: len(peer._cache) == 2, timeout=5)  # moved into the other replica too
        new.delete_identity("n")
        wait_for(lambda: peer._follower.stale[0] == 0, timeout=5)
        assert peer.search(fixed[0], 1)[0].identity_id == "k"


def test_settings_keep_a_postgres_url_intact_and_a_path_a_path(tmp_path):
    url = "postgresql://facegate:secret@db.internal:5432/facegate"
    assert Settings(gallery=url).gallery == url  # a Path would fold "//" into "/"
    assert Settings(gallery=str(tmp_path / "g.sqlite")).gallery == tmp_path / "g.sqlite"


def test_reembed_cli_takes_the_database_url(url, capsys):
    """`facegate gallery reembed --gallery postgresql://...`: the kept crops of an older
    model go through the default bundle's real embedder; credentials are not printed."""
    bundle = load_bundle(default_bundle())
    size = bundle.geometry.size
    crops = np.random.default_rng(6).integers(0, 255, (2, size, size, 3), dtype=np.uint8)
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((2, bundle.embedding_size)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with PostgresGallery(url, model_id="old", embedding_size=bundle.embedding_size,
                         keep_crops=True, geometry=bundle.geometry) as old:
        old.create_identity("kept", embeddings=vectors, crops=crops)
    secret_url = url.replace("postgres@", "postgres:hunter2@")  # trust auth ignores it
    args = ["gallery", "reembed", "--bundle", str(default_bundle()), "--gallery", secret_url]
    assert main([*args, "--dry-run"]) == 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "re-embedded 2 templates" in out and "hunter2" not in out
    with PostgresGallery(url, model_id=bundle.model_id, embedding_size=bundle.embedding_size,
                         geometry=bundle.geometry) as g:
        assert g.stats()["stale_templates"] == 0 and len(g._cache) == 2
        assert g.search(g.identity_embeddings("kept")[0], 1)[0].identity_id == "kept"

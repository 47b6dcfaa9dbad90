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


def test_postgres_holds_only_ciphertext_of_a_deleted_identity(url, tmp_path):
    """After the delete, neither the data directory (heap, TOAST, pg_wal) nor a pg_dump
    holds the name, metadata, crop or vector in the clear; the dump has not even its
    ciphertext or wrapped key. (What the heap and WAL keep is sealed under the master
    key until it is rotated out, as the end of this test shows: docs/deploy.md.)"""
    import base64
    import os
    import subprocess

    import psycopg
    from facegate.core.align import ARCFACE_112
    from facegate.gallery.crypto import Sealer, SealError
    from facegate.gallery.records import encode_png
    from facegate.gallery.sealed_rows import rotate

    master = os.urandom(32)
    name, badge = "Yorick Rarename-0420", "ZK-55501-badge"
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    v = rng.standard_normal((1, DIM)).astype(np.float32)
    v /= np.linalg.norm(v)
    with PostgresGallery(url, model_id="m", embedding_size=DIM, poll_s=0.5, keep_crops=True,
                         geometry=ARCFACE_112, sealer=Sealer([master])) as g:
        g.create_identity("y", name=name, metadata={"badge": badge}, embeddings=v, crops=[crop],
                          sources=["yorick-passport.jpg"])
        g.create_identity("z", name="Kept Person", embeddings=v)
        assert g.get_identity("y").name == name and g.search(v[0], 1)[0].identity_id == "y"
        assert g.get_identity("y").templates[0].source == "yorick-passport.jpg"
        with psycopg.connect(url, autocommit=True) as conn:
            (sealed,) = conn.execute("SELECT embedding FROM templates WHERE identity_id = 'y'").fetchone()
            (wrapped,) = conn.execute("SELECT sealed_key FROM identities WHERE identity_id = 'y'").fetchone()
            conn.execute("CHECKPOINT")
        g.delete_identity("y")
        assert g.get_identity("z").name == "Kept Person"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    c = cluster()
    stored = b"".join(p.read_bytes() for p in c.data.rglob("*") if p.is_file())
    assert bytes(sealed)[16:48] in stored  # the scan reaches the rows (their ciphertext)
    png = encode_png(crop, ARCFACE_112)
    clear = [name.encode(), badge.encode(), v.tobytes()[:32], png[200:232], png[-100:-68],
             b"yorick-passport.jpg"]
    assert not any(s in stored for s in clear)
    dump = subprocess.run([str(c.bin / "pg_dump"), url], capture_output=True, check=True).stdout
    assert not any(s in dump for s in clear)
    assert base64.b16encode(bytes(sealed)[16:48]).lower() not in dump.lower()
    assert b"Kept Person" not in dump  # names are sealed in the dump too

    # What the heap and WAL may still hold of "y" is sealed under its data key, wrapped by
    # the master key: rotate, destroy the old key, and that wrapping opens no more.
    new = os.urandom(32)
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        assert rotate(conn, "%s", Sealer([new, master])) == (1, 0)  # "z" re-wrapped
    with pytest.raises(SealError):
        Sealer([new]).remember("y", bytes(wrapped))
    with PostgresGallery(url, model_id="m", embedding_size=DIM, poll_s=0.5,
                         sealer=Sealer([new])) as g:
        assert g.get_identity("z").name == "Kept Person"


def test_with_a_key_tree_a_deleted_identity_leaves_only_ciphertext_whose_key_is_gone(url, tmp_path):
    """The bar without waiting for a rotation: right after the delete returns, what the
    heap and pg_wal still hold of the person (their sealed rows and wrapped key) opens
    with nothing that exists, on the replica that deleted and on one that follows it;
    everyone else opens as before, also from a pg_dump taken before the delete."""
    import os
    import shutil
    import subprocess

    import psycopg
    from facegate.gallery.crypto import Sealer, SealError, leaf_of
    from facegate.gallery.key_tree import KeyTreeFile

    master = os.urandom(32)
    KeyTreeFile.create(tmp_path / "a.tree")
    shutil.copy(tmp_path / "a.tree", tmp_path / "b.tree")  # one copy per replica, made at setup
    rng = np.random.default_rng(1)
    v = rng.standard_normal((2, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    c = cluster()

    def replica(tree: str) -> PostgresGallery:
        return PostgresGallery(url, model_id="m", embedding_size=DIM, poll_s=0.2,
                               sealer=Sealer([master], KeyTreeFile(tmp_path / tree)))

    a, b = replica("a.tree"), replica("b.tree")
    try:
        a.create_identity("y", name="Yara Leftover", embeddings=v[:1])
        a.create_identity("z", name="Kept Person", embeddings=v[1:])
        with psycopg.connect(url, autocommit=True) as conn:
            (sealed,) = conn.execute("SELECT embedding FROM templates WHERE identity_id = 'y'").fetchone()
            (wrapped,) = conn.execute("SELECT sealed_key FROM identities WHERE identity_id = 'y'").fetchone()
            conn.execute("CHECKPOINT")
        before = subprocess.run([str(c.bin / "pg_dump"), url], capture_output=True, check=True).stdout
        leaf = leaf_of(wrapped)
        assert leaf is not None
        a.delete_identity("y")
        stored = b"".join(p.read_bytes() for p in c.data.rglob("*") if p.is_file())
        assert bytes(sealed)[16:48] in stored  # the heap or WAL still holds the ciphertext...
        for tree in ("a.tree", "b.tree"):  # ...and its key is gone from every copy of the tree
            deadline = time.monotonic() + 10
            while KeyTreeFile(tmp_path / tree).covers(leaf) and time.monotonic() < deadline:
                time.sleep(0.1)
            with pytest.raises(SealError, match="shredded"):
                Sealer([master], KeyTreeFile(tmp_path / tree)).remember("y", bytes(wrapped))
        assert b.get_identity("z").name == "Kept Person"
    finally:
        a.close()
        b.close()
    # A database restored from the dump taken before the delete: the delete is finished
    # at open, the kept person opens.
    restored = c.create_database()
    subprocess.run([str(c.bin / "psql"), "-q", "-v", "ON_ERROR_STOP=1", restored], input=before,
                   capture_output=True, check=True)
    with PostgresGallery(restored, model_id="m", embedding_size=DIM, poll_s=0.2,
                         sealer=Sealer([master], KeyTreeFile(tmp_path / "a.tree"))) as g:
        assert g.get_identity("z").name == "Kept Person"
        assert [i.identity_id for i in g.list_identities()[0]] == ["z"]
